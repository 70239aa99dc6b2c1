"""scripts/pool_vllm_rounds.py: several vLLM bench runs pooled, runs then rounds resampled."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from monitor.bench.intervals import median_ci
from tests.conftest import load_script


@pytest.fixture(scope="module")
def pool():
    yield from load_script("pool_vllm_rounds")


def test_differences_between_runs_widen_the_interval(pool):
    rng = np.random.default_rng(1)
    # Three runs whose rounds agree within each run but whose levels differ by run.
    runs = [list(level + rng.normal(0, 0.5, 60)) for level in (1.0, 5.0, 9.0)]
    median, low, high = pool.pooled_median_ci(runs, resamples=2000)
    flat_low, flat_high = median_ci([v for run in runs for v in run], resamples=2000)
    assert median == pytest.approx(np.median(np.concatenate(runs)))
    # Taking the 180 rounds as one sample ignores the runs' spread: a narrower interval.
    assert high - low > 2 * (flat_high - flat_low)
    assert pool.pooled_median_ci(runs, resamples=2000) == (median, low, high)  # seeded
    with pytest.raises(ValueError):
        pool.pooled_median_ci([[1.0], []])


def test_round_losses_pair_each_round(pool, tmp_path, capsys, monkeypatch):
    def rows(seconds):
        return {"per_round": {"tokens": [128, 128], "seconds": seconds}}

    result = {
        "new_tokens": 32,
        "execution": {"compiled": {"sidecar-up": rows([1.1, 0.5]), "up-paused": rows([1.0, 0.5])}},
    }
    losses = pool.round_losses(result, "compiled", "sidecar-up", "up-paused")
    assert losses == pytest.approx([100 * (1 - 1.0 / 1.1), 0.0])
    path = tmp_path / "run.json"
    path.write_text(json.dumps(result))
    monkeypatch.setattr(sys, "argv", ["pool_vllm_rounds.py", str(path)])
    pool.main()
    out = capsys.readouterr().out
    assert "sidecar-up against up-paused (compiled), 1 runs, 2 rounds" in out
    assert "likely too narrow with under 10 runs" in out and "the runs' medians" in out
