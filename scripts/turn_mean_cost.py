"""What the turn-mean candidate adds to `pack fit`, for the README: seconds per candidate.

Replays one shipped set's fit and calibrate splits on MiniLM at one layer, then times, in
alternating rounds, training each of `pack fit`'s three candidates through its pooling from
its starting fit, as `fit_layers` does: the turn mean (the pooled-vector fit, then
``max_rolling_mean:512,roles,turn_end``), the role-masked whole-turn mean
(``max_rolling_mean:512,for:K,roles``, K given) and the window (``max_rolling_mean:W``). The
replay and the per-token fit are shared by all three and not timed. Prints one JSON line per
round. Run from the repository root:
``OMP_NUM_THREADS=1 python scripts/turn_mean_cost.py --dataset misuse --layer 3 --window 8
--guard 4`` (about 5 minutes on a quiet 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from monitor.features.build import token_probes as tp
from monitor.features.build.conversations import load_model, replay
from monitor.features.build.labeled import fit_and_heldout, load_dataset


def main() -> None:
    """Time the three candidates' training, alternately, and print the seconds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="misuse")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--window", type=int, default=8, help="the windowed candidate's W")
    parser.add_argument("--guard", type=int, default=4, help="the whole-turn candidate's K")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model()
    fit, heldout = fit_and_heldout(load_dataset(args.dataset))
    fit_tokens = replay(model, tokenizer, fit, [args.layer])
    heldout_tokens = replay(model, tokenizer, heldout, [args.layer])
    hp = f"layers.{args.layer}"
    per_token = tp.fit_token_probe(fit_tokens, hp)
    for round_ in range(args.rounds):
        started = time.perf_counter()
        pooled = tp.fit_pooled_probe(fit_tokens, hp)
        turn = tp.fit_through_aggregation(
            fit_tokens, heldout_tokens, pooled, tp.WHOLE_TURN, masked=True, turn_end=True
        )
        turn_seconds = time.perf_counter() - started
        started = time.perf_counter()
        whole = tp.fit_through_aggregation(
            fit_tokens, heldout_tokens, per_token, tp.WHOLE_TURN, guard=args.guard, masked=True
        )
        whole_seconds = time.perf_counter() - started
        started = time.perf_counter()
        windowed = tp.fit_through_aggregation(fit_tokens, heldout_tokens, per_token, args.window)
        windowed_seconds = time.perf_counter() - started
        print(
            json.dumps(
                {
                    "round": round_,
                    "turn_mean_s": round(turn_seconds, 1),
                    "whole_turn_s": round(whole_seconds, 1),
                    "windowed_s": round(windowed_seconds, 1),
                    "auroc_turn_mean": round(turn.auroc, 4),
                    "auroc_whole_turn": round(whole.auroc, 4),
                    "auroc_windowed": round(windowed.auroc, 4),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
