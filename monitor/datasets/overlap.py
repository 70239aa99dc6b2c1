"""Find near-copies between a shipped set's seeds and another text list (a public benchmark).

A held-out benchmark only measures generalisation if none of its items, or close paraphrases,
are in the data a detector was fitted on. ``python -m monitor.datasets.overlap FILE.csv
--column prompt`` compares every seed request of the misuse set with the texts of a CSV, JSONL
or plain-text file and lists the pairs whose normalised similarity (difflib's ratio on
lower-cased letters, digits and spaces) reaches ``--threshold``.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

_NOT_WORD = re.compile(r"[^a-z0-9 ]+")


def normalise(text: str) -> str:
    """Lower-case, keep letters, digits and single spaces."""
    return " ".join(_NOT_WORD.sub("", text.lower()).split())


def near_copies(
    ours: Iterable[str], theirs: Iterable[str], threshold: float = 0.8
) -> list[tuple[float, str, str]]:
    """``(similarity, ours, theirs)`` for each of ``ours`` whose closest match reaches threshold.

    Sorted by similarity, highest first. Quadratic, fine for a few thousand texts each.
    """
    candidates = [(normalise(t), t) for t in theirs]
    found = []
    for text in ours:
        mine = normalise(text)
        matcher = difflib.SequenceMatcher(None, mine)
        best = (0.0, "")
        for norm, original in candidates:
            matcher.set_seq2(norm)
            # The cheap upper bounds first: most pairs are far apart.
            if matcher.real_quick_ratio() < threshold or matcher.quick_ratio() < threshold:
                continue
            ratio = matcher.ratio()
            if ratio > best[0]:
                best = (ratio, original)
        if best[0] >= threshold:
            found.append((best[0], text, best[1]))
    return sorted(found, key=lambda f: -f[0])


def near_copy_groups(texts: Sequence[str], threshold: float = 0.8) -> list[int]:
    """A group number per text: texts joined by a chain of pairs whose normalised similarity
    (as in ``near_copies``) reaches ``threshold`` share one, so a split by group puts no
    near-copy on both sides. Numbers follow the first text of each group; quadratic."""
    norms = [normalise(t) for t in texts]
    parent = list(range(len(texts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, mine in enumerate(norms):
        # difflib caches what it learns about the second sequence: keep it fixed.
        matcher = difflib.SequenceMatcher(None, b=mine)
        for j in range(i + 1, len(norms)):
            if root(i) == root(j):
                continue
            matcher.set_seq1(norms[j])
            # The cheap upper bounds first: most pairs are far apart.
            if matcher.real_quick_ratio() < threshold or matcher.quick_ratio() < threshold:
                continue
            if matcher.ratio() >= threshold:
                parent[root(j)] = root(i)
    numbers: dict[int, int] = {}
    return [numbers.setdefault(root(i), len(numbers)) for i in range(len(texts))]


def read_texts(path: Path, column: str | None) -> list[str]:
    """Texts of a CSV (``column``), JSONL (``column`` key) or plain-text (one per line) file."""
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if column is None or column not in (reader.fieldnames or []):
                raise SystemExit(f"{path}: --column must be one of {reader.fieldnames}")
            return [row[column] for row in reader if row.get(column)]
    if path.suffix == ".jsonl":
        if column is None:
            raise SystemExit(f"{path}: --column names the key holding the text")
        lines = path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line)[column] for line in lines if line.strip()]
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """Print the near-copies of harmful and benign seeds; exit 1 if there is any."""
    from monitor.datasets.seeds import misuse

    parser = argparse.ArgumentParser(prog="python -m monitor.datasets.overlap", description=__doc__)
    parser.add_argument("file", type=Path, help="CSV, JSONL or text file of other prompts")
    parser.add_argument("--column", help="CSV column or JSONL key holding the text")
    parser.add_argument("--threshold", type=float, default=0.8)
    args = parser.parse_args(argv)
    theirs = read_texts(args.file, args.column)
    status = 0
    for label, table in (("harmful", misuse.HARMFUL), ("benign", misuse.BENIGN)):
        seeds = [s for seeds in table.values() for s in seeds]
        hits = near_copies(seeds, theirs, args.threshold)
        print(
            f"{label}: {len(seeds)} seeds, {len(theirs)} texts, {len(hits)} at >= {args.threshold}"
        )
        for ratio, mine, other in hits:
            print(f"  {ratio:.2f}  {mine!r}\n        {other!r}")
        if hits:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
