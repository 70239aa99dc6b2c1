"""Deception AUROC split by kind, for the README: does a pooling learn the prompt?

The shipped deception set has two kinds of pairs: instructed contrast pairs (group
``deception-fact-*``: the system prompt or user turn says "be honest" or "lie") and dialogues
(``deception-scene-*``: both halves share the whole context and differ only in the answer).
A pooling that reads the prompt separates the instructed pairs by the instruction and the
dialogues not at all. This trains, on MiniLM at one layer, the per-token probe through three
poolings exactly as `pack fit` does (window chosen on the calibrate split; whole-turn guard
chosen on it) and prints calibrate- and test-split AUROC per kind for each:

- ``windowed``: the chosen ``max_rolling_mean:W`` (what the shipped pack serves);
- ``whole_turn``: the unmasked ``max_rolling_mean:512,for:K`` (reads the prompt);
- ``masked``: the role-masked ``max_rolling_mean:512,for:K,roles`` (reads the answer alone).

Nothing here is chosen by the test split. Run from the repository root:
``OMP_NUM_THREADS=1 python scripts/deception_by_kind.py --layer 3`` (about 2 minutes).
"""

from __future__ import annotations

import argparse
import json

import torch

from monitor import datasets
from monitor.features.build.conversations import load_model, replay
from monitor.features.build.scoring import (
    aggregation_guard,
    aggregation_masked,
    auroc,
    parse_aggregation,
)
from monitor.features.build.token_probes import (
    GUARDS,
    WINDOWS,
    choose_aggregation,
    fit_through_aggregation,
    fit_token_probe,
    score_conversations,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(None)
    data = datasets.load("deception")
    splits = {s: [c for c in data if c.split == s] for s in ("fit", "calibrate", "test")}
    tokens = {s: replay(model, tokenizer, c, [args.layer]) for s, c in splits.items()}
    hp = f"layers.{args.layer}"
    fit = fit_token_probe(tokens["fit"], hp)
    windowed, _ = choose_aggregation(tokens["calibrate"], hp, fit, 0.01, WINDOWS)
    labels = [c.label for c in tokens["calibrate"]]

    def guarded(suffix: str) -> str:
        """The whole-turn mean with the guard of best calibrate AUROC (as `pack fit`)."""
        options = [f"max_rolling_mean:512,for:{k}{suffix}" for k in GUARDS]
        scored = [
            auroc(score_conversations(tokens["calibrate"], hp, fit, a), labels) for a in options
        ]
        return options[max(range(len(options)), key=lambda i: (scored[i], -i))]

    candidates = {"windowed": windowed, "whole_turn": guarded(""), "masked": guarded(",roles")}
    report = {}
    for name, aggregation in candidates.items():
        _, window = parse_aggregation(aggregation)
        trained = fit_through_aggregation(
            tokens["fit"], tokens["calibrate"], fit, window,
            guard=aggregation_guard(aggregation), masked=aggregation_masked(aggregation),
        )  # fmt: skip
        row: dict[str, object] = {"aggregation": aggregation, "steps": trained.steps}
        for split in ("calibrate", "test"):
            for kind in ("fact", "scene", "all"):
                chosen = [
                    (t, c)
                    for t, c in zip(tokens[split], splits[split], strict=True)
                    if kind == "all" or c.group.startswith(f"deception-{kind}-")
                ]
                scores = score_conversations([t for t, _ in chosen], hp, trained.fit, aggregation)
                row[f"{split}_{kind}"] = round(auroc(scores, [t.label for t, _ in chosen]), 3)
                row[f"{split}_{kind}_n"] = len(chosen)
        report[name] = row
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
