"""`safety-monitor bench encoder`: the restricted encoder vs the full-SAE encode, side by side.

One run measures, on the same activations: the machine's own fp32 GEMM rate (a plain
``torch.mm`` of the full-SAE problem), the full reference encode, and the restricted encoder,
so the ratios are meaningful whatever machine this runs on.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from monitor.bench.machine import describe, render
from monitor.features.build.sae import SAE

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_bench_encoder_command(bench_subparsers: Any) -> None:
    """Register ``encoder`` under ``safety-monitor bench``."""
    p = bench_subparsers.add_parser("encoder", help="restricted vs full-SAE encode, same run")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--d-model", type=int, default=2304)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--k", type=int, default=256, help="selected features")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="activation dtype")
    p.add_argument("--repeats", type=int, help="timed repeats per measurement")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_run_command)


def _run_command(args: argparse.Namespace) -> int:
    sizes = (args.rows, args.d_model, args.d_sae, args.k)
    if min(sizes) <= 0 or args.k > args.d_sae:
        print("safety-monitor: error: sizes must be positive and --k <= --d-sae", file=sys.stderr)
        return 2
    machine = describe()
    result = run_encoder_bench(*sizes, dtype=args.dtype, repeats=args.repeats)
    print(render(result, args.json, format_table, machine))
    return 0


def run_encoder_bench(
    rows: int = 512,
    d_model: int = 2304,
    d_sae: int = 16384,
    k: int = 256,
    dtype: str = "bf16",
    repeats: int | None = None,
) -> dict[str, Any]:
    """Measure and return rows/s, GFLOP/s, ratios and the max abs difference."""
    generator = torch.Generator().manual_seed(0)
    sae = _random_sae(d_model, d_sae, generator)
    x = (torch.randn(rows, d_model, generator=generator) * 3.0).to(DTYPES[dtype])
    indices = torch.randperm(d_sae, generator=generator)[:k].tolist()
    encoder = sae.restrict(indices)

    full_flop = 2.0 * rows * d_model * d_sae
    restricted_flop = 2.0 * rows * d_model * k
    a, b = torch.randn(rows, d_model), torch.randn(d_model, d_sae)
    c = torch.empty(rows, d_sae)
    gemm_s = _time(lambda: torch.mm(a, b, out=c), repeats or 5)
    full_s = _time(lambda: sae.encode(x), repeats or 5)
    restricted_s = _time(lambda: encoder.encode(x), repeats or 200)

    reference = sae.encode(x)[:, indices]
    restricted = encoder.encode(x)
    scale = max(float(reference.abs().max()), 1e-12)
    max_abs = float((restricted - reference).abs().max())
    restricted_gflops = restricted_flop / restricted_s / 1e9
    gemm_gflops = full_flop / gemm_s / 1e9
    return {
        "shape": {"rows": rows, "d_model": d_model, "d_sae": d_sae, "k": k, "dtype": dtype},
        "threads": torch.get_num_threads(),
        "gemm_fp32": {"seconds": gemm_s, "gflops": gemm_gflops},
        "full": {
            "seconds": full_s,
            "rows_per_s": rows / full_s,
            "gflops": full_flop / full_s / 1e9,
        },
        "restricted": {
            "seconds": restricted_s,
            "rows_per_s": rows / restricted_s,
            "gflops": restricted_gflops,
        },
        "speedup_restricted_vs_full": full_s / restricted_s,
        "restricted_fraction_of_gemm_rate": restricted_gflops / gemm_gflops,
        "max_abs_diff": max_abs,
        "feature_scale": scale,
        "max_abs_diff_relative": max_abs / scale,
        "active_fraction": float((reference > 0).float().mean()),
    }


def _random_sae(d_model: int, d_sae: int, generator: torch.Generator) -> SAE:
    """A JumpReLU SAE at a realistic scale (pre-activations O(1), some above threshold)."""
    return SAE(
        W_enc=torch.randn(d_model, d_sae, generator=generator) / d_model**0.5,
        b_enc=torch.randn(d_sae, generator=generator) * 0.2,
        b_dec=torch.randn(d_model, generator=generator) * 0.5,
        threshold=0.5 + torch.rand(d_sae, generator=generator),
        architecture="jumprelu",
        apply_b_dec_to_input=True,
        normalize_activations="none",
        hook_point="layers.12",
        source="bench",
        neuronpedia_id=None,
    )


def _time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one warm-up call."""
    fn()
    samples = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def format_table(result: dict[str, Any]) -> str:
    """The report as a table."""
    shape = result["shape"]
    lines = [
        f"encoder bench: {shape['rows']} rows x d_model {shape['d_model']}, "
        f"{shape['k']} of {shape['d_sae']} latents, {shape['dtype']} input, "
        f"{result['threads']} threads",
        f"{'':<26}{'rows/s':>12}{'GFLOP/s':>10}{'ms':>10}",
        f"{'machine fp32 GEMM (full)':<26}{'':>12}{result['gemm_fp32']['gflops']:>10.1f}"
        f"{result['gemm_fp32']['seconds'] * 1e3:>10.2f}",
    ]
    for key, label in (("full", "full-SAE encode"), ("restricted", "restricted encode")):
        r = result[key]
        lines.append(
            f"{label:<26}{r['rows_per_s']:>12,.0f}{r['gflops']:>10.1f}{r['seconds'] * 1e3:>10.2f}"
        )
    lines += [
        f"restricted / full speedup: {result['speedup_restricted_vs_full']:.1f}x",
        f"restricted GFLOP/s / machine GEMM: {result['restricted_fraction_of_gemm_rate']:.0%}",
        f"max abs diff: {result['max_abs_diff']:.3g} "
        f"({result['max_abs_diff_relative']:.2g} of feature scale {result['feature_scale']:.3g})",
    ]
    return "\n".join(lines)
