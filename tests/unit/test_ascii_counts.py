"""Numbers read from config files and exports are ASCII digits: ``str.isdigit()`` also takes
"²" (which ``int()`` refuses, a traceback instead of a located error) and "٣" (which ``int()``
reads as 3, a silently wrong value)."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.audit.review.config import ReviewConfigError, parse_review_config
from monitor.features.build.neuronpedia import _index, _natural
from monitor.features.errors import FeatureError
from monitor.sidecar.config import ConfigError, parse_config


@pytest.mark.parametrize("port", ["²", "٣", "8O"])
def test_a_listen_port_must_be_ascii_digits(tmp_path: Path, port: str) -> None:
    (tmp_path / "p.pack").write_bytes(b"")  # exists: only the port is wrong
    with pytest.raises(ConfigError, match="listen"):
        parse_config({"packs": ["p.pack"], "listen": f"127.0.0.1:{port}"}, tmp_path, "cfg.yaml")
    with pytest.raises(ReviewConfigError, match="listen"):
        parse_review_config(
            {"store": "sqlite:///a.db", "listen": f"127.0.0.1:{port}"}, tmp_path, "review.yaml"
        )


def test_an_ascii_port_is_taken(tmp_path: Path) -> None:
    (tmp_path / "p.pack").write_bytes(b"")
    config = parse_config({"packs": ["p.pack"], "listen": "127.0.0.1:8080"}, tmp_path, "cfg.yaml")
    assert config.listen == "127.0.0.1:8080"


@pytest.mark.parametrize("index", ["²", "٣", "-1", ""])
def test_a_neuronpedia_index_must_be_ascii_digits(index: str) -> None:
    with pytest.raises(FeatureError, match="index"):
        _index({"index": index}, "batch-0.jsonl.gz:1")
    assert _index({"index": "12"}, "batch-0.jsonl.gz:1") == 12


def test_export_files_sort_naturally_by_ascii_numbers() -> None:
    names = ["batch-10.jsonl.gz", "batch-2.jsonl.gz", "batch-²", "batch-٣.jsonl.gz"]
    ordered = sorted((Path(n) for n in names), key=_natural)
    assert [p.name for p in ordered][:2] == ["batch-2.jsonl.gz", "batch-10.jsonl.gz"]
