"""`pack search` over Neuronpedia explanation exports, and `pack build --explanations`, on an
export file the test writes in the public format (gzipped JSON lines, ``modelId``, ``layer``,
``index`` as a string, ``description``)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from monitor.cli import main
from monitor.features import load_pack
from monitor.features.build.neuronpedia import read_explanations, search
from monitor.features.errors import FeatureError
from monitor.fixtures import write_saelens_sae

MODEL, SOURCE = "demo-llama", "2-res-demo"


def write_export(directory: Path) -> Path:
    rows = [
        (3, "references to lying or deceiving someone"),
        (3, "deception and dishonest statements"),
        (17, "cooking recipes and kitchen tools"),
        (42, "instructions for building weapons"),
        (99, "deceptive marketing claims\u0007 in online ads"),  # a control character to clean
    ]
    path = directory / MODEL / SOURCE / "explanations"
    path.mkdir(parents=True)
    for batch, chunk in enumerate((rows[:3], rows[3:])):
        lines = [
            json.dumps(
                {
                    "modelId": MODEL,
                    "layer": SOURCE,
                    "index": str(index),
                    "description": text,
                    "typeName": "oai_token-act-pair",
                    "explanationModelName": "gpt-4o-mini",
                    "embedding": None,
                }
            )
            for index, text in chunk
        ]
        with gzip.open(path / f"batch-{batch}.jsonl.gz", "wt") as handle:
            handle.write("\n".join(lines) + "\n")
    return directory


def test_search_finds_features_by_every_word_as_a_prefix(tmp_path: Path) -> None:
    features = read_explanations([write_export(tmp_path)])
    assert len(features) == 4 and len(features[(MODEL, SOURCE, 3)].descriptions) == 2
    hits = search(features.values(), "decept")
    assert [h.index for h in hits] == [3, 99]  # shortest matching description first
    assert hits[1].descriptions == ["deceptive marketing claims in online ads"]
    assert [h.index for h in search(features.values(), "weapons building")] == [42]
    assert search(features.values(), "decept", source="other") == []
    assert hits[0].neuronpedia_id == f"{MODEL}/{SOURCE}/3"


def test_search_cli_prints_ids_and_descriptions(tmp_path: Path, capsys) -> None:
    export = write_export(tmp_path / "export")
    assert main(["pack", "search", "lying", "--explanations", str(export), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["neuronpedia_id"] for r in rows] == [f"{MODEL}/{SOURCE}/3"]


def test_a_bad_export_line_is_a_located_error(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "batch-0.jsonl"
    bad.write_text('{"modelId": "m", "layer": "l", "index": "x", "description": "d"}\n')
    with pytest.raises(FeatureError, match=r"batch-0\.jsonl:1"):
        read_explanations([bad])
    assert main(["pack", "search", "d", "--explanations", str(bad)]) == 2
    assert "batch-0.jsonl:1" in capsys.readouterr().err


def test_pack_build_records_descriptions_and_neuronpedia_ids(tmp_path: Path, capsys) -> None:
    sae = write_saelens_sae(tmp_path / "sae", d_in=16, d_sae=128, seed=0)
    export = write_export(tmp_path / "export")
    out = tmp_path / "p.safetensors"
    argv = ["pack", "build", "--sae", str(sae), "--features", "3,42,7", "--name", "np"]
    assert main([*argv, "--explanations", str(export), "--out", str(out)]) == 0
    assert "feature 7 (index 7) has no explanation" in capsys.readouterr().err
    features = {f.sae_index: f for f in load_pack(out).features()}
    assert features[3].description == (
        "references to lying or deceiving someone | deception and dishonest statements"
    )
    assert features[3].neuronpedia_id == f"{MODEL}/{SOURCE}/3"
    assert features[42].label == "instructions for building weapons"
    assert features[7].description == ""
    wrong = ["--explanations", str(export), "--neuronpedia-source", "x/y", "--out", str(out)]
    assert main([*argv, *wrong]) == 2
