"""The fused Triton encoder against the torch path, in Triton's CPU interpreter.

triton is a test dependency: if it cannot be imported this module fails at collection (no
silent skip). ``triton.jit`` reads TRITON_INTERPRET when it decorates, including triton's own
standard library at ``import triton`` (which other tests may trigger first, e.g. through
transformers), so the kernel runs in a worker subprocess started with the variable set: the
rest of the suite never sees it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import triton  # noqa: F401  (fail loudly when missing)

REPO_ROOT = Path(__file__).resolve().parents[2]
D_IN, K, ROWS = 72, 40, 37  # not multiples of the tiles: exercises the masks
ACTIVATIONS = ("relu", "jumprelu", "identity")
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
DTYPES = ("float32", "bfloat16", "float16")
CASES = [f"{a}-{n}-{d}" for a in ACTIVATIONS for n in NORMALIZATIONS for d in DTYPES]
EXTRA = ["strided-input", "zero-rows", "available", "unnormalised-fp32"]


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, __file__], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES + EXTRA)
def test_kernel_matches_torch_path(results: dict[str, str], case: str) -> None:
    assert results[case] == "ok", results[case]


# --- worker (runs in the subprocess, with TRITON_INTERPRET=1) ------------------------------


def _encoder(activation: str, normalization: str) -> Any:
    from monitor.features import RestrictedEncoder

    g = torch.Generator().manual_seed(2)
    floor = {
        "relu": torch.zeros(K),
        "jumprelu": 0.05 + 0.5 * torch.rand(K, generator=g),
        "identity": torch.full((K,), -math.inf),
    }[activation]
    return RestrictedEncoder(
        weight=torch.randn(D_IN, K, generator=g) / D_IN**0.5,
        bias=torch.randn(K, generator=g) * 0.3,
        floor=floor,
        normalization=normalization,
    )


def _check(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert out.dtype == torch.float32 and out.shape == expected.shape
    scale = max(float(expected.abs().max()), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * scale)


def _case(name: str) -> None:
    from monitor.features import triton_encoder as kernel

    if name == "available":
        assert kernel.triton_available()
        return
    if name in EXTRA:
        enc = _encoder("relu", "none")
        x = {
            "strided-input": torch.randn(D_IN, ROWS).to(torch.bfloat16).T,  # transposed view
            "zero-rows": torch.zeros(0, D_IN),
            "unnormalised-fp32": torch.randn(ROWS, D_IN),
        }[name]
        out = kernel.triton_encode(x, enc.weight, enc.bias, enc.floor, "none")
        _check(out, enc.encode_torch(x))
        return
    activation, normalization, dtype = name.split("-")
    enc = _encoder(activation, normalization)
    g = torch.Generator().manual_seed(3)
    x = (2.0 * torch.randn(ROWS, D_IN, generator=g) + 0.7).to(getattr(torch, dtype))
    out = kernel.triton_encode(x, enc.weight, enc.bias, enc.floor, normalization)
    expected = enc.encode_torch(x)
    _check(out, expected)
    if activation != "identity":
        assert 0 < int((out > 0).sum()) < out.numel(), "fixture exercises one side only"


def _worker() -> None:
    results = {}
    for name in CASES + EXTRA:
        try:
            _case(name)
            results[name] = "ok"
        except Exception:
            results[name] = " | ".join(traceback.format_exc().splitlines()[-3:])
    print(json.dumps(results))


if __name__ == "__main__":
    _worker()
