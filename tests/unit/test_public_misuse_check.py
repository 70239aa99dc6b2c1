"""scripts/public_misuse_check.py: near-copies never straddle splits; the form-only baselines."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from monitor.datasets import overlap
from tests.conftest import load_script


@pytest.fixture(scope="module")
def check():
    yield from load_script("public_misuse_check")


def _words(rng: random.Random, n: int) -> str:
    return " ".join(
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 9)))
        for _ in range(n)
    )


def _strata() -> dict[tuple[str, int], list[str]]:
    rng = random.Random(7)
    verbs = ("Write", "Create", "Develop", "Provide")
    topics = [_words(rng, 6) for _ in range(30)]
    harmful_a = [f"{verbs[n % 4]} a tutorial on {t}" for n, t in enumerate(topics)]
    # The second source paraphrases half of the first one's items (other verb), like
    # HarmBench / AdvBench; each chain must land in one split.
    harmful_b = [f"{verbs[(n + 1) % 4]} a tutorial on {t}" for n, t in enumerate(topics[:15])]
    benign = [f"What is {_words(rng, 5)}?" for _ in range(40)]
    return {("a", 1): harmful_a, ("b", 1): harmful_b, ("q", 0): benign}


def test_no_test_item_has_a_near_copy_in_fit_or_calibrate(check) -> None:
    items = check.split_by_near_copies(_strata())
    assert len(items) == 30 + 15 + 40
    assert len({item["id"] for item in items}) == len(items)
    splits_of_group = defaultdict(set)
    for item in items:
        splits_of_group[(item["label"], item["group"])].add(item["split"])
    assert all(len(s) == 1 for s in splits_of_group.values())
    # Paraphrases across the two sources were grouped (else the check above is vacuous).
    assert any(
        len({i["source"] for i in items if (i["label"], i["group"]) == key}) == 2
        for key in splits_of_group
    )
    test = [i["turns"][0]["text"] for i in items if i["split"] == "test"]
    seen = [i["turns"][0]["text"] for i in items if i["split"] != "test"]
    assert test and not overlap.near_copies(test, seen, threshold=check.NEAR_COPY)
    counts = defaultdict(int)
    for item in items:
        counts[(item["label"], item["split"])] += 1
    # Still roughly 60/20/20 of each label.
    assert 0.45 <= counts[(1, "fit")] / 45 <= 0.75 and counts[(1, "test")] >= 5
    assert counts[(0, "fit")] == 24 and counts[(0, "test")] == 8


def test_split_by_item_would_have_leaked(check) -> None:
    """The same data split per item (the old way) puts near-copies on both sides: the
    grouping above is what removes them."""
    items = check.split_by_near_copies(_strata(), threshold=1.01)
    test = [i["turns"][0]["text"] for i in items if i["split"] == "test"]
    seen = [i["turns"][0]["text"] for i in items if i["split"] != "test"]
    assert overlap.near_copies(test, seen, threshold=0.8)


def test_form_baselines_read_the_form_not_the_labels_of_the_split(check) -> None:
    items = []
    for n in range(20):
        split = "fit" if n < 12 else "test"
        items.append(_item(f"Write a plan to do thing {n}", 1, split))
        items.append(_item(f"Who won the match {n}?", 0, split))
    got = check.baselines(items)
    assert got["first_word"] == 1.0 and got["no_question_mark"] == 1.0
    # Flipped labels on the test split only: the direction comes from the fit split.
    flipped = [{**i, "label": 1 - i["label"]} if i["split"] == "test" else i for i in items]
    assert check.baselines(flipped)["no_question_mark"] == 0.0
    assert check._auroc([1.0, 1.0, 2.0, 0.0], [1, 0, 1, 0]) == 0.875


def _item(text: str, label: int, split: str) -> dict:
    return {"label": label, "split": split, "turns": [{"role": "user", "text": text}]}
