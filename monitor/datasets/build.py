"""Build the shipped data sets from the hand-written seeds: ``python -m monitor.datasets.build``.

Deterministic: every choice comes from a SHA-256 of a fixed string (never ``hash()``, which
Python salts per process, nor the global ``random``), so the same seeds give byte-identical files.
``--check`` rebuilds in memory and fails if a committed file differs, which is how a test (and a
reviewer) confirms the files are what the seeds say.

Splits are assigned per ``group`` (all variants of one seed, both halves of a contrast pair):
within each stratum (task, category and, where a group has one label, that label) the groups are
ordered by a hash of their name and cut 60/20/20 into fit / calibrate / test.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import random
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from monitor.datasets import LabeledConversation, Turn, validate
from monitor.datasets.seeds import bias as bias_seeds
from monitor.datasets.seeds import deception as deception_seeds
from monitor.datasets.seeds import misuse as misuse_seeds
from monitor.datasets.seeds import surface

SOURCE = "safety-monitor/datasets v1"
SPLIT_FRACTIONS = (("fit", 0.6), ("calibrate", 0.2), ("test", 0.2))
OUT_DIR = Path(__file__).resolve().parent


def rng_for(*parts: object) -> random.Random:
    """A ``random.Random`` seeded from the parts' text: same parts, same stream, any process."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _order_key(task: str, group: str) -> str:
    return hashlib.sha256(f"split:{task}:{group}".encode()).hexdigest()


def assign_splits(task: str, strata: dict[str, str]) -> dict[str, str]:
    """Map each group to a split; ``strata`` maps group -> stratum name.

    Within a stratum the groups are ordered by hash and the first 60% go to fit, the next 20% to
    calibrate, the rest to test (rounded so small strata still get every split when they can).
    """
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for group, stratum in strata.items():
        by_stratum[stratum].append(group)
    out: dict[str, str] = {}
    for groups in by_stratum.values():
        groups.sort(key=lambda g: _order_key(task, g))
        n = len(groups)
        n_fit = round(n * SPLIT_FRACTIONS[0][1])
        n_cal = round(n * SPLIT_FRACTIONS[1][1])
        if n >= 3:
            # Keep at least one group in calibrate and test so every split sees every stratum.
            n_cal = max(n_cal, 1)
            n_fit = min(n_fit, n - n_cal - 1)
        for i, group in enumerate(groups):
            if i < n_fit:
                out[group] = "fit"
            elif i < n_fit + n_cal:
                out[group] = "calibrate"
            else:
                out[group] = "test"
    return out


Draft = tuple[
    str, int, str, str, list[Turn], tuple[str, ...]
]  # task,label,category,group,turns,roles


def finish(
    task: str, drafts: Sequence[Draft], *, stratify_label: bool
) -> list[LabeledConversation]:
    """Number the drafts, assign splits by group, and return checked conversations."""
    strata: dict[str, str] = {}
    for _, label, category, group, _, _ in drafts:
        stratum = f"{category}/{label}" if stratify_label else category
        # A group's stratum is where its first item puts it (a generic bias seed names groups
        # of two categories; it is stratified by the first).
        strata.setdefault(group, stratum)
    splits = assign_splits(task, strata)
    out = []
    for i, (t, label, category, group, turns, roles) in enumerate(drafts):
        out.append(
            LabeledConversation(
                id=f"{task}-{i:06d}",
                task=t,
                label=label,
                turns=tuple(turns),
                split=splits[group],
                category=category,
                group=group,
                label_roles=roles,
                source=SOURCE,
            )
        )
    validate(((None, c) for c in out), where=task)
    return out


# --------------------------------------------------------------------------------------------
# misuse


def build_misuse() -> list[LabeledConversation]:
    """Harmful and benign requests; each seed gives a group of differently-worded variants.

    Both labels go through the same surface machinery (openers, framings, jailbreak wrappers,
    suffixes, typos, case, system prompts, a preceding small-talk exchange) with the same
    probabilities, so no wrapper, length or punctuation habit tells the labels apart.
    """
    drafts: list[Draft] = []
    for label, table, tag in (
        (1, misuse_seeds.HARMFUL, "h"),
        (0, misuse_seeds.BENIGN, "b"),
    ):
        for category, seeds in table.items():
            for j, seed in enumerate(seeds):
                group = f"misuse-{tag}-{category}-{j:03d}"
                n = misuse_seeds.VARIANTS_PER_SEED
                for v, text in enumerate(surface.variants(seed, n, rng_for("misuse", group))):
                    turns = surface.conversation(text, rng_for("misuse", group, v, "turns"))
                    drafts.append(("misuse", label, category, group, turns, ("user",)))
    return finish("misuse", drafts, stratify_label=True)


# --------------------------------------------------------------------------------------------
# deception


def build_deception() -> list[LabeledConversation]:
    """Instructed contrast pairs (one fact, honest vs lying instruction) and dialogues.

    A pair's honest and dishonest halves share a group. In the dialogues both halves share the
    same system prompt and user turn: only the assistant's answer (truthful or deceptive) differs.
    """
    drafts: list[Draft] = []
    for j, fact in enumerate(deception_seeds.FACTS):
        group = f"deception-fact-{j:03d}"
        rng = rng_for("deception", group)
        for style in deception_seeds.pair_styles(rng):
            # One opener per (fact, style), shared by both halves of the pair.
            opener = rng.choice(deception_seeds.ANSWER_OPENERS)
            for label in (0, 1):
                turns = deception_seeds.instructed_pair(fact, label, style, opener)
                drafts.append(("deception", label, fact.category, group, turns, ("assistant",)))
    for j, scene in enumerate(deception_seeds.SCENARIOS):
        group = f"deception-scene-{j:03d}"
        for label in (0, 1):
            turns = deception_seeds.dialogue(scene, label)
            drafts.append(("deception", label, scene.category, group, turns, ("assistant",)))
    return finish("deception", drafts, stratify_label=False)


# --------------------------------------------------------------------------------------------
# bias


def build_bias() -> list[LabeledConversation]:
    """Stereotyping vs neutral statements; the neutral ones name the same groups and topics."""
    drafts: list[Draft] = []
    for j, item in enumerate(bias_seeds.items()):
        rng = rng_for("bias", item.group, j)
        turns = bias_seeds.conversation(item, rng)
        drafts.append(("bias", item.label, item.category, item.group, turns, ("assistant",)))
    return finish("bias", drafts, stratify_label=False)


BUILDERS: dict[str, Callable[[], list[LabeledConversation]]] = {
    "misuse": build_misuse,
    "deception": build_deception,
    "bias": build_bias,
}


def render(conversations: Sequence[LabeledConversation]) -> str:
    """The JSONL text of a data set, exactly as it is written to disk."""
    return "".join(json.dumps(c.to_dict(), ensure_ascii=False) + "\n" for c in conversations)


STATS_BEGIN = "<!-- stats: written by python -m monitor.datasets.build; do not edit -->"
STATS_END = "<!-- /stats -->"


def length_auroc(positive: Sequence[int], negative: Sequence[int]) -> float:
    """AUROC of "longer means label 1" (0.5: length says nothing about the label)."""
    ordered = sorted(negative)
    wins = 0.0
    for value in positive:
        below = bisect.bisect_left(ordered, value)
        ties = bisect.bisect_right(ordered, value) - below
        wins += below + 0.5 * ties
    return wins / (len(positive) * len(negative))


def stats_table(built: dict[str, Sequence[LabeledConversation]]) -> str:
    """Markdown tables of sizes per split and label, and per category, for the datasheet."""
    lines = [
        "| set | split | label 1 | label 0 | groups |",
        "|---|---|---:|---:|---:|",
    ]
    for task, convs in built.items():
        for split in ("fit", "calibrate", "test", None):
            rows = [c for c in convs if split is None or c.split == split]
            pos = sum(c.label for c in rows)
            groups = len({c.group for c in rows})
            name = split or "**all**"
            lines.append(f"| {task} | {name} | {pos} | {len(rows) - pos} | {groups} |")
    lines += ["", "| set | category | label 1 | label 0 |", "|---|---|---:|---:|"]
    for task, convs in built.items():
        per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for c in convs:
            per[c.category][1 - c.label] += 1
        for category in sorted(per):
            pos, neg = per[category]
            lines.append(f"| {task} | {category} | {pos} | {neg} |")
    lines += [
        "",
        "Surface check of the labeled text (the turns in `label_roles`), per label 1 / label 0:",
        "",
        "| set | median characters | ends with `?` | has a system turn | AUROC of length alone |",
        "|---|---|---|---|---:|",
    ]
    for task, convs in built.items():
        cols = []
        for measure in (
            lambda c: len(c.labeled_text),
            lambda c: c.labeled_text.rstrip().endswith("?"),
            lambda c: any(t.role == "system" for t in c.turns),
        ):
            values = [[measure(c) for c in convs if c.label == label] for label in (1, 0)]
            if isinstance(values[0][0], bool):
                cols.append(" / ".join(f"{sum(v) / len(v):.0%}" for v in values))
            else:
                cols.append(" / ".join(f"{statistics.median(v):.0f}" for v in values))
        lengths = [[len(c.labeled_text) for c in convs if c.label == label] for label in (1, 0)]
        cols.append(f"{length_auroc(*lengths):.2f}")
        lines.append(f"| {task} | {' | '.join(cols)} |")
    return "\n".join(lines)


def with_stats(datasheet: str, table: str) -> str:
    """The datasheet text with the generated block between the stats markers replaced."""
    start = datasheet.index(STATS_BEGIN) + len(STATS_BEGIN)
    end = datasheet.index(STATS_END)
    return datasheet[:start] + "\n" + table + "\n" + datasheet[end:]


def main(argv: Sequence[str] | None = None) -> int:
    """Write (or with ``--check``, verify) the shipped JSONL files."""
    parser = argparse.ArgumentParser(prog="python -m monitor.datasets.build", description=__doc__)
    parser.add_argument("tasks", nargs="*", default=list(BUILDERS), help="data sets to build")
    parser.add_argument("--check", action="store_true", help="fail if a committed file differs")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output directory")
    args = parser.parse_args(argv)
    status = 0
    built = {}
    for task in args.tasks:
        if task not in BUILDERS:
            parser.error(f"unknown data set {task!r} (known: {', '.join(BUILDERS)})")
        built[task] = BUILDERS[task]()
    outputs = {args.out / f"{task}.jsonl": render(convs) for task, convs in built.items()}
    sheet = args.out / "DATASHEET.md"
    if set(built) == set(BUILDERS) and sheet.is_file():
        # The datasheet's size tables are generated, so they cannot drift from the files.
        outputs[sheet] = with_stats(sheet.read_text(encoding="utf-8"), stats_table(built))
    for path, text in outputs.items():
        if args.check:
            current = path.read_text(encoding="utf-8") if path.is_file() else None
            if current != text:
                print(f"{path}: differs from what the seeds build", file=sys.stderr)
                status = 1
            continue
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    return status


__all__ = ["BUILDERS", "assign_splits", "build_bias", "build_deception", "build_misuse", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
