"""`bench sidecar --sidecar-set KEY=VALUE`: parsed, validated by the sidecar's config loader."""

from __future__ import annotations

import argparse

import pytest

from monitor.bench.sidecar import add_bench_sidecar_command, sidecar_settings
from monitor.sidecar.config import ConfigError


def test_pairs_become_a_config_mapping_with_yaml_values() -> None:
    got = sidecar_settings(
        ["single_thread_rows=0", "limits.max_streams=8", "log_level=info", "device=cpu"]
    )
    assert got == {
        "single_thread_rows": 0,
        "limits": {"max_streams": 8},
        "log_level": "info",
        "device": "cpu",
    }
    assert sidecar_settings([]) == {}


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("single_thread_rows", "expected KEY=VALUE"),
        ("=3", "expected KEY=VALUE"),
        ("single_thread_row=0", "single_thread_row"),  # a typo: the loader's unknown key
        ("single_thread_rows=-1", "single_thread_rows"),  # out of range
        ("single_thread_rows=many", "single_thread_rows"),  # not an integer
        ("limits.max_stream=8", "max_stream"),
        ("packs=/tmp/x", "set by the bench itself"),
        ("listen=127.0.0.1:1", "set by the bench itself"),
        ("device=[1", "invalid YAML"),
    ],
)
def test_a_bad_pair_is_a_clear_error(pair: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        sidecar_settings([pair])


def test_the_option_repeats_and_a_bad_key_exits_before_any_run(capsys) -> None:
    parser = argparse.ArgumentParser()
    add_bench_sidecar_command(parser.add_subparsers())
    args = parser.parse_args(
        ["sidecar", "--sidecar-set", "single_thread_rows=0", "--sidecar-set", "device=cpu"]
    )
    assert args.sidecar_set == ["single_thread_rows=0", "device=cpu"]
    bad = parser.parse_args(["sidecar", "--sidecar-set", "single_thread_row=0"])
    assert bad.handler(bad) == 2
    assert "single_thread_row" in capsys.readouterr().err
