"""The prefill's window kernels (doubling max/min and sums, per-row correlation for ewma)
against the direct definition over every window, on shapes and windows where a mistake in
the doubling (a window one short, an odd power of two, a misplaced block) would show."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.rules import engine
from monitor.rules.engine import _ewma_weights, _weighted_sums, _window_reduce, _window_sum

WINDOWS = [1, 2, 3, 5, 8, 13, 16, 31, 64, 100, 213]


def _reference(ext: np.ndarray, n: int, width: int, reduce) -> np.ndarray:
    return np.stack(
        [np.array([reduce(row[t : t + n]) for t in range(width)]) for row in ext]
    ).reshape(ext.shape[0], width)


def _ext(rng: np.random.Generator, rows: int, n: int, width: int) -> np.ndarray:
    # Integers scaled by a power of two: float64 sums of them are exact in any order, so
    # the reference's order of summation does not matter and equality is exact.
    values = rng.integers(-1000, 1000, size=(rows, n - 1 + width)) / 8.0
    return values.astype(np.float32)


@pytest.mark.parametrize("n", WINDOWS)
@pytest.mark.parametrize("rows,width", [(1, 1), (1, 300), (3, 7), (5, 64)])
def test_doubling_windows_equal_the_definition(n: int, rows: int, width: int) -> None:
    rng = np.random.default_rng(n * 1000 + rows * 10 + width)
    ext = _ext(rng, rows, n, width)
    assert np.array_equal(
        _window_reduce(ext, n, width, np.maximum), _reference(ext, n, width, np.max)
    )
    assert np.array_equal(
        _window_reduce(ext, n, width, np.minimum), _reference(ext, n, width, np.min)
    )
    ext64 = ext.astype(np.float64)
    assert np.array_equal(_window_sum(ext64, n, width), _reference(ext64, n, width, np.sum))


def test_doubling_windows_propagate_non_finite_values_like_the_definition() -> None:
    rng = np.random.default_rng(7)
    with np.errstate(invalid="ignore"):  # inf - inf is NaN, as the program allows
        _check_non_finite(rng)


def _check_non_finite(rng: np.random.Generator) -> None:
    for n in (3, 8, 21):
        ext = _ext(rng, 2, n, 40)
        ext[0, 5] = np.nan
        ext[1, 10] = np.inf
        ext[1, 30] = -np.inf
        for op, ref in ((np.maximum, np.max), (np.minimum, np.min)):
            got, want = _window_reduce(ext, n, 40, op), _reference(ext, n, 40, ref)
            assert np.array_equal(got, want, equal_nan=True)
        ext64 = ext.astype(np.float64)
        got, want = _window_sum(ext64, n, 40), _reference(ext64, n, 40, np.sum)
        assert np.array_equal(got, want, equal_nan=True)


@pytest.mark.parametrize("rows,width", [(1, 500), (2, 3), (8, 10), (8, 100)])
def test_weighted_sums_match_the_definition_both_ways(
    rows: int, width: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 40
    weights, _ = _ewma_weights(n, 3.0)
    ext = np.random.default_rng(rows * width).normal(size=(rows, n - 1 + width))
    want = _reference(ext, n, width, lambda w: float(np.dot(w, weights)))
    np.testing.assert_allclose(_weighted_sums(ext, n, width, weights), want, rtol=1e-13)
    # The other branch (blocked weighted view) for the same input, blocks smaller than L.
    monkeypatch.setattr(engine, "_CORRELATE_ROWS", 0)
    monkeypatch.setattr(engine, "_SUM_BLOCK", rows * n * 3)
    if width < 64:
        np.testing.assert_allclose(_weighted_sums(ext, n, width, weights), want, rtol=1e-13)
