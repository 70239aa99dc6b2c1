"""The fused GPU encoder: one Triton kernel per message for a sliced (restricted) encoder.

Fused in one launch: the per-token input normalisation prologue (row statistics, then the
normalised tile feeds the GEMM, so normalised activations never touch memory), the GEMM over
the selected columns, the bias (decoder bias already folded in), and the floor epilogue that
covers ReLU, JumpReLU, gated and identity activations. Input is read in its wire dtype
(BF16/FP16/FP32) and converted to FP32 in registers; the dot runs in IEEE FP32 (no TF32), so
the result matches the torch path to FP32 rounding.

Tested on CPU with ``TRITON_INTERPRET=1``. Exact TopK encoders stay on the torch path (cuBLAS
GEMM + ``torch.topk``), which is already the fastest way to rank all latents.
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional at run time: the torch path serves CPU and GPU
    triton = None
    tl = None

from monitor.features.encoder import LAYER_NORM_EPS, RUNTIME_NORMALIZATIONS

NORM_CODES = {name: code for code, name in enumerate(RUNTIME_NORMALIZATIONS)}


def triton_available() -> bool:
    """Triton is importable and has somewhere to run (a GPU, or the CPU interpreter)."""
    if triton is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _encode_kernel(
        x_ptr, w_ptr, b_ptr, f_ptr, out_ptr,
        M, N, K,
        stride_xm, stride_xk, stride_wk, stride_wn, stride_om, stride_on,
        NORM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = rm < M, rn < N
        # Prologue: per-row (shift, scale) so the normalised row is (x - shift) * scale.
        shift = tl.zeros([BLOCK_M], dtype=tl.float32)
        scale = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
        if NORM != 0:
            total = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                mask = mask_m[:, None] & (rk < K)[None, :]
                ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk
                x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                if NORM == 1:
                    total += tl.sum(x * x, axis=1)
                else:
                    total += tl.sum(x, axis=1)
            if NORM == 1:  # constant_norm_rescale: x * sqrt(d) / ||x||
                scale = tl.where(mask_m, tl.sqrt(K * 1.0) / tl.sqrt(total), 1.0)
            else:  # layer_norm: (x - mean) / (unbiased std + eps); two passes, no cancellation
                shift = total / K
                sq = tl.zeros([BLOCK_M], dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    rk = k0 + tl.arange(0, BLOCK_K)
                    mask = mask_m[:, None] & (rk < K)[None, :]
                    ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk
                    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                    d = tl.where(mask, x - shift[:, None], 0.0)
                    sq += tl.sum(d * d, axis=1)
                scale = 1.0 / (tl.sqrt(sq / (K - 1)) + LAYER_NORM_EPS)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask_k = rk < K
            x_mask = mask_m[:, None] & mask_k[None, :]
            x = tl.load(
                x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=x_mask, other=0.0
            ).to(tl.float32)
            x = tl.where(x_mask, (x - shift[:, None]) * scale[:, None], 0.0)
            w = tl.load(
                w_ptr + rk[:, None] * stride_wk + rn[None, :] * stride_wn,
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            )
            acc += tl.dot(x, w, input_precision="ieee")
        bias = tl.load(b_ptr + rn, mask=mask_n, other=0.0)
        floor = tl.load(f_ptr + rn, mask=mask_n, other=0.0)
        h = acc + bias[None, :]
        h = tl.where(h > floor[None, :], h, 0.0)
        out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
        tl.store(out_ptrs, h, mask=mask_m[:, None] & mask_n[None, :])


def triton_encode(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    floor: torch.Tensor,
    normalization: str,
) -> torch.Tensor:
    """``[rows, k]`` float32 features of ``x [rows, d_in]`` (BF16/FP16/FP32) in one launch."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    rows, d_in = x.shape
    k = weight.shape[1]
    out = torch.empty(rows, k, dtype=torch.float32, device=x.device)
    if rows == 0:
        return out
    # Bigger tiles on a GPU; small ones keep the CPU interpreter quick.
    block_m, block_n, block_k = (64, 64, 32) if x.is_cuda else (16, 32, 32)
    grid = (math.ceil(rows / block_m), math.ceil(k / block_n))
    _encode_kernel[grid](
        x, weight, bias, floor, out,
        rows, k, d_in,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        NORM=NORM_CODES[normalization],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out
