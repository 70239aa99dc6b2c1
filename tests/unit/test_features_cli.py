"""`pack build | fit | calibrate | inspect` through add_pack_commands, as the main CLI wires it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from monitor.features import load_pack
from monitor.features.build.cli import add_pack_commands
from monitor.fixtures import write_saelens_sae, write_sparsify
from tests.unit.test_features_probes import tiny_model_and_tokenizer, write_dataset

D_IN, D_SAE = 32, 96


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="safety-monitor")
    commands = parser.add_subparsers()
    add_pack_commands(commands.add_parser("pack").add_subparsers())
    args = parser.parse_args(["pack", *argv])
    code = args.handler(args)
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(result: tuple[int, str, str], *needles: str) -> None:
    code, _, err = result
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("safety-monitor: error: "), err
    for needle in needles:
        assert needle in lines[-1], (needle, err)


def test_build_and_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sae = write_saelens_sae(tmp_path / "sae", D_IN, D_SAE, architecture="jumprelu")
    out = tmp_path / "p.safetensors"
    code, stdout, _ = run(
        ["build", "--sae", str(sae), "--features", "3,17,42", "--out", str(out)], capsys
    )
    assert code == 0 and "3 features at layers.1" in stdout
    assert load_pack(out).name == "sae"
    code, stdout, _ = run(["inspect", str(out)], capsys)
    assert code == 0
    for needle in ("pack 'sae': 3 features", "layers.1 (d_model 32", "jumprelu", "sha256", "bytes"):
        assert needle in stdout
    code, stdout, _ = run(["inspect", str(out), "--json"], capsys)
    info = json.loads(stdout)
    assert info["feature_count"] == 3 and info["hook_points"]["layers.1"]["d_model"] == D_IN
    assert info["size_bytes"] == out.stat().st_size


def test_build_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.safetensors"
    assert_error(
        run(
            ["build", "--sae", str(tmp_path / "nope"), "--features", "1", "--out", str(out)], capsys
        ),
        "nope",
    )
    sae = write_saelens_sae(tmp_path / "sae", D_IN, D_SAE)
    assert_error(
        run(["build", "--sae", str(sae), "--features", "1,x", "--out", str(out)], capsys),
        "--features",
    )
    assert_error(
        run(["build", "--sae", str(sae), "--features", "1,1", "--out", str(out)], capsys), "twice"
    )
    assert_error(
        run(["build", "--sae", str(sae), "--features", "96", "--out", str(out)], capsys),
        "out of range",
    )
    assert_error(run(["build", "--out", str(out)], capsys), "--selection")
    topk = write_sparsify(tmp_path / "ck", D_IN, 3, 5)
    assert_error(
        run(["build", "--sae", str(topk), "--features", "1", "--out", str(out)], capsys),
        "not exact",
        "--topk-mode",
    )
    assert not out.exists()


def test_topk_approx_build_and_calibrate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    topk = write_sparsify(tmp_path / "ck", D_IN, 3, 5, "layers.6")
    acts = tmp_path / "acts.safetensors"
    save_file({"layers.6": torch.randn(800, D_IN) * 2 + 0.3}, str(acts))
    out = tmp_path / "p.safetensors"
    code, _, err = run(
        [
            "build",
            "--sae",
            str(topk),
            "--features",
            "1,5,7",
            "--topk-mode",
            "approx",
            "--calibration-activations",
            str(acts),
            "--name",
            "tk",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0 and "not exact" in err and "disagree" in err
    code, stdout, _ = run(
        ["calibrate", str(out), "--topk-sae", str(topk), "--activations", str(acts), "--json"],
        capsys,
    )
    report = json.loads(stdout)["topk"]["layers.6"]
    assert code == 0 and report["rows"] == 800 and 0 <= report["disagreement_rate"] < 0.1
    code, _, err = run(
        ["build", "--sae", str(topk), "--features", "1", "--topk-mode", "exact", "--out", str(out)],
        capsys,
    )
    assert code == 0 and "full encoder" in err


def test_calibrate_with_activations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sae = write_saelens_sae(tmp_path / "sae", D_IN, D_SAE)
    pack = tmp_path / "p.safetensors"
    run(["build", "--sae", str(sae), "--features", "1,2", "--out", str(pack)], capsys)
    acts = tmp_path / "benign.safetensors"
    save_file({"layers.1": torch.randn(1000, D_IN) * 2}, str(acts))
    out = tmp_path / "calibrated.safetensors"
    code, stdout, _ = run(
        ["calibrate", str(pack), "--fpr", "0.05", "--activations", str(acts), "--out", str(out)],
        capsys,
    )
    assert code == 0 and "alert threshold" in stdout
    features = load_pack(out).hook_points["layers.1"].features
    assert all(f.target_fpr == 0.05 and f.alert_threshold is not None for f in features)
    assert_error(run(["calibrate", str(pack)], capsys), "nothing to do")
    assert_error(run(["calibrate", str(pack), "--fpr", "0.05"], capsys), "benign samples")


def test_build_from_selection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_saelens_sae(tmp_path / "a", D_IN, D_SAE)
    selection = tmp_path / "sel.yaml"
    selection.write_text(
        yaml.safe_dump(
            {"name": "sel", "sources": [{"sae": "a", "features": [{"index": 2, "name": "two"}]}]}
        )
    )
    out = tmp_path / "p.safetensors"
    code, _, _ = run(["build", "--selection", str(selection), "--out", str(out)], capsys)
    assert code == 0 and load_pack(out).qualified_names("layers.1") == ["sel/two"]
    selection.write_text("sources: {")
    assert_error(
        run(["build", "--selection", str(selection), "--out", str(out)], capsys), "sel.yaml", "YAML"
    )


def test_fit_and_calibrate_on_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, tokenizer = tiny_model_and_tokenizer()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)  # type: ignore[attr-defined]
    data = write_dataset(tmp_path / "train.jsonl")
    out = tmp_path / "probes.safetensors"
    code, stdout, err = run(
        [
            "fit",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--layers",
            "1",
            "--name",
            "probes",
            "--feature-name",
            "secrecy",
            "--pooling",
            "max",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    assert "probes/secrecy at layers.1" in stdout
    code, stdout, err = run(
        ["calibrate", str(out), "--fpr", "0.1", "--model", str(model_dir), "--data", str(data)],
        capsys,
    )
    assert code == 0, err
    info = load_pack(out).hook_points["layers.1"].features[0]
    assert info.target_fpr == 0.1
    assert info.labeled_roles == ("user",)  # text lines are one user turn each; kept by calibrate
    one_class = tmp_path / "one.jsonl"
    one_class.write_text('{"text": "the cat", "label": 1}\n')
    assert_error(
        run(
            [
                "fit",
                "--model",
                str(model_dir),
                "--data",
                str(one_class),
                "--layers",
                "1",
                "--name",
                "p",
                "--out",
                str(out),
            ],
            capsys,
        ),
        "both labels",
    )
    assert_error(
        run(
            [
                "fit",
                "--model",
                str(tmp_path / "none"),
                "--data",
                str(data),
                "--layers",
                "1",
                "--name",
                "p",
                "--out",
                str(out),
            ],
            capsys,
        ),
        "none",
    )
