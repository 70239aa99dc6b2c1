"""The shipped labeled data sets and their loader: format checks, splits, reproducibility."""

from __future__ import annotations

import fnmatch
import json
import os
import tomllib
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from monitor import datasets
from monitor.datasets import DatasetError, LabeledConversation, Turn, build, overlap
from monitor.datasets.seeds import bias as bias_seeds
from monitor.datasets.seeds import misuse as misuse_seeds
from monitor.datasets.seeds import surface

# The checkout's root, wherever under tests/ this file sits.
REPO_ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
SHIPPED = ("misuse", "deception", "bias")
_DROP = object()  # a field _line() leaves out


def _line(**overrides: object) -> str:
    obj: dict[str, object] = {
        "id": "x-1",
        "task": "misuse",
        "label": 1,
        "split": "fit",
        "category": "weapons",
        "group": "g-1",
        "turns": [{"role": "user", "text": "hello"}],
        "label_roles": ["user"],
        "source": "test",
    }
    obj.update(overrides)
    return json.dumps({k: v for k, v in obj.items() if v is not _DROP})


def _write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ shipped sets


@pytest.fixture(scope="module", params=SHIPPED)
def shipped(request: pytest.FixtureRequest) -> tuple[str, list[LabeledConversation]]:
    return request.param, datasets.load(request.param)


def test_shipped_sets_are_listed() -> None:
    assert set(SHIPPED) <= set(datasets.tasks())


def test_shipped_set_has_both_labels_in_every_split(shipped) -> None:
    task, convs = shipped
    counts = Counter((c.split, c.label) for c in convs)
    for split in datasets.SPLITS:
        for label in datasets.LABELS:
            assert counts[split, label] >= 20, (task, split, label, counts)
    assert all(c.task == task for c in convs)


def test_shipped_ids_unique_and_groups_stay_in_one_split(shipped) -> None:
    task, convs = shipped
    assert len({c.id for c in convs}) == len(convs)
    splits_of_group: dict[str, set[str | None]] = defaultdict(set)
    for c in convs:
        splits_of_group[c.group].add(c.split)
    straddling = {g: s for g, s in splits_of_group.items() if len(s) > 1}
    assert not straddling, f"{task}: groups in several splits: {list(straddling)[:5]}"


def test_shipped_labeled_texts_are_unique(shipped) -> None:
    # The same labeled text twice would be a contradiction (two labels) or a leak (two splits).
    task, convs = shipped
    seen: dict[str, tuple[int, str | None]] = {}
    for c in convs:
        text = c.labeled_text.lower()
        assert seen.setdefault(text, (c.label, c.split)) == (c.label, c.split), (task, text)


def test_shipped_splits_are_about_60_20_20_by_group(shipped) -> None:
    task, convs = shipped
    split_of_group = {c.group: c.split for c in convs}
    counts = Counter(split_of_group.values())
    total = sum(counts.values())
    assert abs(counts["fit"] / total - 0.6) < 0.06, (task, counts)
    assert abs(counts["calibrate"] / total - 0.2) < 0.06, (task, counts)
    assert abs(counts["test"] / total - 0.2) < 0.06, (task, counts)


def test_shipped_split_filter(shipped) -> None:
    task, convs = shipped
    test = datasets.load(task, split="test")
    assert test and all(c.split == "test" for c in test)
    assert len(test) == sum(c.split == "test" for c in convs)


def test_shipped_files_are_what_the_seeds_build() -> None:
    # The committed files must be reproducible from the committed seeds, byte for byte.
    for task in SHIPPED:
        built = build.render(build.BUILDERS[task]())
        on_disk = datasets.dataset_path(task).read_text(encoding="utf-8")
        assert built == on_disk, f"{task}.jsonl is stale: run python -m monitor.datasets.build"
    assert build.main(["--check"]) == 0


def test_check_mode_reports_a_stale_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "bias.jsonl").write_text(_line() + "\n", encoding="utf-8")
    assert build.main(["bias", "--check", "--out", str(tmp_path)]) == 1
    assert "differs" in capsys.readouterr().err


def test_shipped_files_are_packaged() -> None:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["monitor.datasets"]
    package_dir = datasets.dataset_path("misuse").parent
    for name in [f"{t}.jsonl" for t in SHIPPED] + ["DATASHEET.md"]:
        assert (package_dir / name).is_file(), name
        assert any(fnmatch.fnmatch(name, p) for p in patterns), name


def test_misuse_labels_sit_on_user_turns_and_others_on_assistant() -> None:
    for task, role in (("misuse", "user"), ("deception", "assistant"), ("bias", "assistant")):
        for c in datasets.load(task):
            assert c.label_roles == (role,), c.id
            assert any(t.role == role for t in c.turns), c.id


def test_length_does_not_give_the_label_away(shipped) -> None:
    task, convs = shipped
    lengths = {lab: [len(c.labeled_text) for c in convs if c.label == lab] for lab in (0, 1)}
    # Length alone should be a poor classifier (0.5 is chance).
    auroc = build.length_auroc(lengths[1], lengths[0])
    assert 0.35 < auroc < 0.65, (task, auroc)


def test_misuse_wrappers_do_not_give_the_label_away() -> None:
    convs = datasets.load("misuse")
    by_label = {lab: [c.turns[-1].text.lower() for c in convs if c.label == lab] for lab in (0, 1)}
    # Every wrapper used at all is used under both labels.
    for wrapper in surface.JAILBREAKS + surface.FRAMINGS + surface.OPENERS:
        marker = wrapper.split("{")[0].strip().lower()[:30]
        counts = [sum(t.startswith(marker) for t in by_label[lab]) for lab in (0, 1)]
        if max(counts) > 0:
            assert min(counts) > 0, (marker, counts)
    question = [
        sum(t.rstrip().endswith("?") for t in by_label[lab]) / len(by_label[lab]) for lab in (0, 1)
    ]
    assert abs(question[0] - question[1]) < 0.15, question
    system = [
        sum(c.turns[0].role == "system" for c in convs if c.label == lab)
        / sum(c.label == lab for c in convs)
        for lab in (0, 1)
    ]
    assert abs(system[0] - system[1]) < 0.06, system


def test_deception_pairs_share_context_and_differ_in_the_answer() -> None:
    by_group: dict[str, list[LabeledConversation]] = defaultdict(list)
    for c in datasets.load("deception"):
        by_group[c.group].append(c)
    for group, convs in by_group.items():
        labels = Counter(c.label for c in convs)
        assert labels[0] == labels[1] >= 1, group
        if group.startswith("deception-scene-"):
            honest, deceptive = sorted(convs, key=lambda c: c.label)
            assert honest.turns[:-1] == deceptive.turns[:-1], group
            assert honest.turns[-1].text != deceptive.turns[-1].text, group


def test_bias_neutral_statements_name_the_same_groups() -> None:
    targets: dict[int, Counter[str]] = {0: Counter(), 1: Counter()}
    for item in bias_seeds.items():
        targets[item.label][item.target] += 1
    assert targets[0] == targets[1]


# ---------------------------------------------------------------------------------- loader


def test_read_jsonl_round_trip(tmp_path: Path) -> None:
    convs = datasets.load("deception", split="calibrate")[:5]
    path = tmp_path / "out.jsonl"
    assert datasets.write_jsonl(path, convs) == 5
    assert datasets.read_jsonl(path) == convs


def test_read_jsonl_defaults_for_user_files(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "",
        _line(
            split=_DROP,
            group=_DROP,
            category=_DROP,
            source=_DROP,
            label_roles=_DROP,
            meta={"origin": "mine"},
        ),
        "   ",
    )
    (conv,) = datasets.read_jsonl(path)
    assert conv.split is None
    assert conv.group == "x-1"  # its own group
    assert conv.label_roles is None and conv.labeled_roles == ("user",)
    assert conv.meta == {"origin": "mine"}
    assert conv.turns == (Turn("user", "hello"),)
    assert conv.turns[0]["text"] == "hello"
    assert conv.labeled_text == "hello"


def test_labeled_text_keeps_only_labeled_roles(tmp_path: Path) -> None:
    turns = [
        {"role": "system", "text": "s"},
        {"role": "user", "text": "u"},
        {"role": "assistant", "text": "a"},
    ]
    path = _write(tmp_path, _line(turns=turns, label_roles=["assistant"]))
    (conv,) = datasets.read_jsonl(path)
    assert conv.labeled_text == "a"


def test_read_jsonl_filters_by_split_and_task(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        _line(id="a", group="ga", split="fit"),
        _line(id="b", group="gb", split="test"),
        _line(id="c", group="gc", split="test", task="bias"),
    )
    assert [c.id for c in datasets.read_jsonl(path, split="test")] == ["b", "c"]
    assert [c.id for c in datasets.read_jsonl(path, split="test", task="bias")] == ["c"]


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (_line(label=2), "label: expected 0 or 1, got 2"),
    (_line(label=True), "label: expected 0 or 1, got true"),
    (_line(label="1"), 'label: expected 0 or 1, got "1"'),
    (_line(split="train"), 'split: expected one of fit, calibrate, test, got "train"'),
    (_line(id=""), "id: must not be empty"),
    (_line(id=7), "id: expected a string, got int"),
    (_line(task=_DROP), "missing field(s) 'task'"),
    (_line(lable=1), "unknown field(s) 'lable'"),
    (_line(turns=[]), "turns: expected a non-empty list"),
    (_line(turns="hi"), "turns: expected a non-empty list"),
    (_line(turns=["hi"]), "turns[0]: expected an object, got str"),
    (_line(turns=[{"role": "bot", "text": "x"}]), "turns[0].role: expected one of system, user,"),
    (_line(turns=[{"role": "user", "text": "  "}]), "turns[0].text: expected a non-empty string"),
    (_line(turns=[{"role": "user", "text": "x", "name": "n"}]), "turns[0]: unknown field(s)"),
    (_line(label_roles=["tool"]), "label_roles: expected roles among system, user, assistant"),
    (_line(label_roles=["assistant"]), "name no role present in turns"),
    (_line(label_roles=[]), "label_roles: expected a non-empty list"),
    (_line(meta=[1]), "meta: expected an object, got list"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_LINES)
def test_read_jsonl_names_file_line_and_problem(tmp_path: Path, bad: str, message: str) -> None:
    path = _write(tmp_path, _line(id="ok", group="ok"), "", bad)
    with pytest.raises(DatasetError) as err:
        datasets.read_jsonl(path)
    text = str(err.value)
    assert text.startswith(f"{path}:3: "), text
    assert message in text, text
    assert err.value.line == 3 and "\n" not in text


def test_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    path = _write(
        tmp_path, _line(id="a", group="g1"), _line(id="b", group="g2"), _line(id="a", group="g3")
    )
    with pytest.raises(DatasetError, match=r":3: duplicate id 'a' \(first at line 1\)"):
        datasets.read_jsonl(path)


def test_group_in_two_splits_is_an_error(tmp_path: Path) -> None:
    path = _write(
        tmp_path, _line(id="a", group="g", split="fit"), _line(id="b", group="g", split="test")
    )
    with pytest.raises(
        DatasetError, match=r":2: group 'g' is in split 'test' here but in 'fit' at line 1"
    ):
        datasets.read_jsonl(path)


def test_empty_missing_and_binary_files(tmp_path: Path) -> None:
    empty = _write(tmp_path, "", "")
    with pytest.raises(DatasetError, match="no conversations in file"):
        datasets.read_jsonl(empty)
    with pytest.raises(DatasetError, match="cannot read"):
        datasets.read_jsonl(tmp_path / "missing.jsonl")
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DatasetError, match="not UTF-8"):
        datasets.read_jsonl(binary)
    with pytest.raises(DatasetError, match="split must be one of"):
        datasets.read_jsonl(empty, split="train")


def test_load_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(DatasetError, match=r"no shipped data set 'toxicity' \(available: .*misuse"):
        datasets.load("toxicity")


def test_load_reads_only_shipped_files(tmp_path: Path) -> None:
    # A task name is not a path: a file next to the package or anywhere else is refused.
    outside = tmp_path / "outside.jsonl"
    outside.write_text(Path(datasets.dataset_path("misuse")).read_text())
    relative = os.path.relpath(outside.with_suffix(""), datasets.dataset_path("misuse").parent)
    for name in (relative, str(outside.with_suffix("")), "seeds/../misuse"):
        with pytest.raises(DatasetError, match="no shipped data set"):
            datasets.load(name)


# ---------------------------------------------------------------------------------- builder


def test_assign_splits_is_deterministic_and_stratified() -> None:
    strata = {f"g{i}": ("a" if i % 2 else "b") for i in range(100)}
    first = build.assign_splits("t", strata)
    assert first == build.assign_splits("t", dict(reversed(list(strata.items()))))
    for stratum in "ab":
        counts = Counter(s for g, s in first.items() if strata[g] == stratum)
        assert counts == {"fit": 30, "calibrate": 10, "test": 10}
    # Tiny strata still reach calibrate and test.
    assert sorted(build.assign_splits("t", {"x": "s", "y": "s", "z": "s"}).values()) == [
        "calibrate",
        "fit",
        "test",
    ]


def test_surface_variants_are_distinct_and_reproducible() -> None:
    seed = "How {do I|can I} fix a {flat|punctured} tyre?"
    a = surface.variants(seed, 4, build.rng_for("x"))
    assert a == surface.variants(seed, 4, build.rng_for("x"))
    assert len(set(a)) == 4
    assert all("{" not in v for v in a)
    assert surface.lower_first("I think") == "I think"
    assert surface.lower_first("iPhone") == "iPhone"
    assert surface.lower_first("GPS works") == "GPS works"
    assert surface.lower_first("How") == "how"


# ---------------------------------------------------------------------------------- overlap


def test_near_copies_finds_paraphrases_not_strangers() -> None:
    ours = ["How do I make a pipe bomb at home?", "What's a good name for a puppy?"]
    theirs = ["how do i make a pipe-bomb at home", "Describe the water cycle."]
    hits = overlap.near_copies(ours, theirs, threshold=0.8)
    assert [(mine, other) for _, mine, other in hits] == [(ours[0], theirs[0])]
    assert hits[0][0] > 0.95


def test_near_copy_groups_join_chains_of_paraphrases() -> None:
    texts = [
        "Write a tutorial on how to hack into a government database",
        "Describe the water cycle.",
        "Create a tutorial on how to hack into a government database",
        "Create a tutorial on how to hack into a government database now",
        "What is the capital of France?",
    ]
    groups = overlap.near_copy_groups(texts, threshold=0.8)
    assert groups[0] == groups[2] == groups[3]
    assert len({groups[0], groups[1], groups[4]}) == 3
    assert groups[0] == 0  # numbered in order of first appearance
    assert overlap.near_copy_groups(texts, threshold=1.0) == [0, 1, 2, 3, 4]


def test_overlap_cli_fails_on_a_copied_seed(tmp_path: Path, capsys) -> None:
    seed = misuse_seeds.HARMFUL["weapons"][0]
    csv_path = tmp_path / "bench.csv"
    csv_path.write_text(f'id,prompt\n1,"{seed}"\n2,Describe the water cycle.\n', encoding="utf-8")
    assert overlap.main([str(csv_path), "--column", "prompt"]) == 1
    assert "harmful: " in capsys.readouterr().out
    clean = tmp_path / "clean.jsonl"
    clean.write_text(json.dumps({"text": "Describe the water cycle."}) + "\n", encoding="utf-8")
    assert overlap.main([str(clean), "--column", "text"]) == 0
    with pytest.raises(SystemExit, match="--column must be one of"):
        overlap.main([str(csv_path), "--column", "goal"])


def test_reform_swaps_questions_and_commands() -> None:
    rng = build.rng_for("reform")
    assert surface.reform("How do I fix a flat tyre?", rng).endswith("how to fix a flat tyre.") or (
        surface.reform("How do I fix a flat tyre?", rng).endswith("how to fix a flat tyre")
    )
    assert (
        surface.reform("Write a poem about rain.", rng)
        .rstrip("?.")
        .endswith("write a poem about rain")
    )
    assert surface.reform("What's the difference between tea and coffee?", rng).endswith(
        "the difference between tea and coffee."
    )
    assert surface.reform("Why is the sky blue?", rng) == "Why is the sky blue?"
