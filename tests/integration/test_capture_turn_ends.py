"""Turn ends from the transformers capture client to a real sidecar, in both sequence formats.

The sidecar runs in this process (`SidecarThread`, a real gRPC server on 127.0.0.1) with the
counting rules of test_capture_serving (every token once, in order) and a rule `turn-end` with
`at: turn_end` and an always-true condition: it fires at every turn-end row the sidecar sees,
at that row's position. Its pipeline also records, for every batch it receives, each
sequence's conversation, role, rows, position and turn-end flag, as the wire message says
(through the stream's conversation table for the columnar format). Each test compares both
with where the turns end.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from monitor.capture import CaptureClient
from monitor.fixtures import build_tiny_llama
from monitor.sidecar.config import parse_config
from monitor.sidecar.process import SidecarThread
from monitor.sidecar.service import SafetyMonitorService
from tests.integration.test_capture_serving import (
    HIDDEN,
    MAX_COUNTED,
    generate,
    sidecar_config,
    tokens,
    wait_connected,
)

# Fires at every turn-end row (checked only there; each turn end afresh).
TURN_END_RULE = """  - rule: turn-end
    category: accounting
    severity: info
    condition: abs(f) >= 0
    at: turn_end
"""


def turn_end_config(workdir) -> dict:  # type: ignore[no-untyped-def]
    """test_capture_serving's sidecar config, with the `turn-end` rule added."""
    config = sidecar_config(workdir)
    rules = Path(config["rules"][0])
    rules.write_text(rules.read_text() + TURN_END_RULE)
    return config


def seen_tokens(client: CaptureClient, conversation_id: str) -> int:
    """How many contiguous tokens, from position 0, the sidecar saw for a conversation (the
    counting rules; test_capture_serving's helper, other rules' alerts left out)."""
    lengths = []
    for alert in client.alerts:
        if alert.conversation_id != conversation_id or not alert.rule.startswith("seen-"):
            continue
        length = int(alert.rule.removeprefix("seen-"))
        assert alert.position == length - 1, (conversation_id, alert.rule, alert.position)
        lengths.append(length)
    assert sorted(lengths) == list(range(1, len(lengths) + 1)), (conversation_id, lengths)
    assert len(lengths) < MAX_COUNTED, "conversation too long for the counting rules"
    return len(lengths)


def fired_turn_ends(alerts) -> dict[str, list[int]]:  # type: ignore[no-untyped-def]
    """Conversation id -> the positions where the `turn-end` rule fired, in order."""
    fired: dict[str, list[int]] = defaultdict(list)
    for alert in alerts:
        if alert.rule == "turn-end":
            fired[alert.conversation_id].append(alert.position)
    return {cid: sorted(positions) for cid, positions in fired.items()}


@dataclass(frozen=True)
class Received:
    """One sequence of one batch, as the sidecar's pipeline received it."""

    conversation_id: str
    role: str
    position: int
    rows: int
    turn_end: bool
    end: bool
    columns: bool  # arrived in the columnar format
    batch: int  # which batch, in the order the pipeline received them


class Recorder:
    """Reads the sequences of each batch the pipeline receives (both formats)."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.batches = 0
        self._slots: dict[int, tuple[str, str]] = {}  # the stream's table: slot -> (id, role)

    def record(self, batch) -> None:  # type: ignore[no-untyped-def]
        number = self.batches
        self.batches += 1
        if batch.HasField("columns"):
            columns = batch.columns
            for slot in columns.define:
                self._slots[slot.slot] = (slot.conversation_id, slot.role)
            count = len(columns.slot)
            turn_ends = list(columns.turn_end) or [False] * count
            ends = list(columns.end) or [False] * count
            assert len(turn_ends) == count, "columns.turn_end: empty or one per sequence"
            for i in range(count):
                cid, role = self._slots[columns.slot[i]]
                self.received.append(
                    Received(
                        cid,
                        role,
                        columns.position[i],
                        columns.rows[i],
                        turn_ends[i],
                        ends[i],
                        True,
                        number,
                    )
                )
        for s in batch.sequences:
            self.received.append(
                Received(
                    s.conversation_id, s.role, s.position, s.rows, s.turn_end, s.end, False, number
                )
            )

    def turn_ends(self) -> dict[str, list[int]]:
        """Conversation id -> positions of its turn-end rows, in order of arrival."""
        marked: dict[str, list[int]] = defaultdict(list)
        for r in self.received:
            if r.turn_end and r.rows:
                marked[r.conversation_id].append(r.position + r.rows - 1)
        return dict(marked)

    def roles(self, conversation_id: str) -> list[str]:
        """The role of each token of a conversation, by position."""
        by_position: dict[int, str] = {}
        for r in self.received:
            if r.conversation_id == conversation_id:
                for position in range(r.position, r.position + r.rows):
                    assert position not in by_position, "a token arrived twice"
                    by_position[position] = r.role
        assert sorted(by_position) == list(range(len(by_position))), "a gap"
        return [by_position[p] for p in range(len(by_position))]

    def formats(self) -> set[bool]:
        return {r.columns for r in self.received}


@pytest.fixture
def older_status(monkeypatch):
    """GetStatus as a sidecar older than the columnar format answers it: the relay then sends
    `Sequence` messages. Set before the sidecar registers its servicer."""
    status = SafetyMonitorService.GetStatus

    async def old_status(self, request, context):
        response = await status(self, request, context)
        response.ClearField("sequence_formats")
        response.ClearField("conversation_slots")
        return response

    monkeypatch.setattr(SafetyMonitorService, "GetStatus", old_status)


def recording_sidecar(workdir, config: dict | None = None):  # type: ignore[no-untyped-def]
    """A started sidecar whose pipeline records what it receives; (sidecar, target, recorder)."""
    raw = {**(config or turn_end_config(workdir)), "metrics_port": 0}
    sidecar = SidecarThread(parse_config(raw, workdir, "test"))
    recorder = Recorder()
    process_many = sidecar.sidecar.pipeline.process_many

    def recorded(batches, *args, **kwargs):  # type: ignore[no-untyped-def]
        for batch in batches:
            recorder.record(batch)
        return process_many(batches, *args, **kwargs)

    sidecar.sidecar.pipeline.process_many = recorded  # type: ignore[method-assign]
    running = sidecar.start()
    return sidecar, f"127.0.0.1:{running.port}", recorder


@pytest.fixture(params=["columns", "sequences"])
def wire(request, tmp_path):  # type: ignore[no-untyped-def]
    """(client, model, recorder) against a recording sidecar, in each sequence format."""
    if request.param == "sequences":
        request.getfixturevalue("older_status")
    sidecar, target, recorder = recording_sidecar(tmp_path)
    model = build_tiny_llama(hidden=HIDDEN)
    client = CaptureClient(target, model_name="tiny", metrics_registry=None)
    client.attach(model, layers=[1])
    wait_connected(client)
    try:
        yield client, model, recorder
        assert recorder.formats() == {request.param == "columns"}
        assert client.stats.batches_rejected == 0
    finally:
        client.close(timeout=10)
        sidecar.stop()


def forward(model, ids, mask=None):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=True)


def test_one_pass_per_turn_marks_each_sequences_last_real_token(wire):
    client, model, recorder = wire
    ids = tokens([5, 6, 7, 0, 0], [1, 2, 3, 4, 5])
    mask = tokens([1, 1, 1, 0, 0], [1, 1, 1, 1, 1])  # right padding: 'a' ends at its third
    with client.conversation(["a", "b"], role="user", turn_end=True):
        forward(model, ids, mask)
    # A second turn of each, as one more pass: positions continue.
    with client.conversation(["a", "b"], role="assistant", turn_end=True):
        forward(model, tokens([8, 9], [8, 9]))
    # An unmarked pass marks nothing.
    with client.conversation(["a", "b"], role="user"):
        forward(model, tokens([3], [3]))
    assert client.flush(30)
    assert recorder.turn_ends() == fired_turn_ends(client.alerts) == {"a": [2, 4], "b": [4, 6]}
    assert recorder.roles("a") == ["user"] * 3 + ["assistant"] * 2 + ["user"]
    assert seen_tokens(client, "a") == 6 and seen_tokens(client, "b") == 8


def test_flags_per_conversation_and_a_chunked_turn(wire):
    client, model, recorder = wire
    # Two conversations, only the first ends its turn in this pass.
    with client.conversation(["x", "y"], role="user", turn_end=[True, False]):
        forward(model, tokens([5, 6, 7], [1, 2, 3]))
    # 'y' goes on with the rest of its turn in two chunks; only the last one ends it.
    with client.conversation("y", role="user"):
        forward(model, tokens([4, 5]))
    with client.conversation("y", role="user", turn_end=True):
        forward(model, tokens([6]))
    assert client.flush(30)
    assert recorder.turn_ends() == fired_turn_ends(client.alerts) == {"x": [2], "y": [5]}
    assert seen_tokens(client, "y") == 6


def test_generate_with_a_prompt_role_ends_the_prompts_turn_at_its_last_token(wire):
    client, model, recorder = wire
    ids = tokens([0, 0, 0, 5, 6, 7], [1, 2, 3, 4, 5, 6])
    mask = tokens([0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1])
    with client.conversation(["g", "h"], prompt_role="user"):
        generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4)
    assert client.flush(30)
    # The prefill ends each prompt's turn; the generated tokens (three passes: the fourth is
    # sampled from the last one and never computed) are the assistant's, unmarked.
    assert recorder.turn_ends() == fired_turn_ends(client.alerts) == {"g": [2], "h": [5]}
    assert recorder.roles("g") == ["user"] * 3 + ["assistant"] * 3
    assert recorder.roles("h") == ["user"] * 6 + ["assistant"] * 3
    # end_conversation sends a zero-row `end`: it marks no row, and the sidecar reads it as
    # the turn end of the last token evaluated (the answer's last computed one, 5).
    client.end_conversation("g")
    assert client.flush(30)
    assert recorder.turn_ends() == {"g": [2], "h": [5]}
    assert fired_turn_ends(client.alerts) == {"g": [2, 5], "h": [5]}
    assert [r.rows for r in recorder.received if r.end] == [0]


def test_a_prompt_role_block_with_several_return_sequences(wire):
    client, model, recorder = wire
    torch.manual_seed(0)
    with client.conversation("s", prompt_role="user", role="bot"):
        generate(
            model,
            tokens([3, 4, 5, 6]),
            do_sample=True,
            num_return_sequences=2,
            max_new_tokens=3,
            min_new_tokens=3,
        )
    assert client.flush(30)
    assert recorder.turn_ends() == fired_turn_ends(client.alerts) == {"s/0": [3], "s/1": [3]}
    assert recorder.roles("s/1") == ["user"] * 4 + ["bot"] * 2


def test_turn_end_arguments_are_checked(tmp_path):
    client = CaptureClient("127.0.0.1:1", metrics_registry=None, connect_timeout=0.1)
    try:
        for bad in ("yes", [True, False, True]):
            with (
                pytest.raises(ValueError, match="turn_end"),
                client.conversation(["a", "b"], turn_end=bad),  # type: ignore[arg-type]
            ):
                pass
        with (
            pytest.raises(ValueError, match="prompt_role"),
            client.conversation("a", prompt_role=""),
        ):
            pass
        # turn_end would mark every generated pass: refused, naming the answer's-end recipe.
        for flags in (True, [False, True]):
            with (
                pytest.raises(ValueError, match=r"every generated token.*one more pass"),
                client.conversation(["a", "b"], prompt_role="user", turn_end=flags),
            ):
                pass
        # Unmarked flags with prompt_role are what they were: no turn end asked for.
        with contextlib.ExitStack() as stack:
            stack.enter_context(
                client.conversation(["a", "b"], prompt_role="user", turn_end=[False, False])
            )
        with contextlib.ExitStack() as stack:  # numpy-like flags are taken as bools
            stack.enter_context(client.conversation(["a", "b"], turn_end=torch.tensor([1, 0])))
    finally:
        client.close(timeout=5)


def test_eval_streaming_marks_the_end_of_every_replayed_turn(tmp_path):
    """`safety-monitor eval` replays each turn as one forward pass: every turn's last token
    reaches the sidecar as a turn end, and no other token does."""
    from monitor import datasets
    from monitor.evaluation.evaluate import _stream
    from monitor.features.build.conversations import load_model
    from tests.conftest import build_pack_with_cli
    from tests.integration.test_capture_serving import counting_rules
    from tests.integration.test_detection_real_path import save_tiny_model, write_conversations

    model, tokenizer = load_model(save_tiny_model(tmp_path / "model"))
    conversations = datasets.read_jsonl(write_conversations(tmp_path / "data.jsonl", n=6))
    pack = build_pack_with_cli(tmp_path, d_in=32, d_sae=16, hook_layer=1, features=[0, 1])
    rules = tmp_path / "counting.yaml"
    rules.write_text(counting_rules() + TURN_END_RULE)
    config = {"listen": "127.0.0.1:0", "packs": [str(pack)], "rules": [str(rules)]}
    sidecar, target, recorder = recording_sidecar(tmp_path, config)
    try:
        id_of = {c.id: f"eval-{i}" for i, c in enumerate(conversations)}
        alerts, replayed, capture = _stream(
            model, tokenizer, target, "tiny", conversations, id_of, [1], None, 60.0
        )
    finally:
        sidecar.stop()
    assert capture["rejected"] == 0 and not capture["dropped"]
    expected = {}
    for streamed in replayed:
        ends, total = [], 0
        for rows in streamed.turn_rows:
            total += rows
            ends.append(total - 1)
        expected[streamed.id] = ends  # replayed under its eval id
    assert len(expected) == 6 and all(len(ends) == 3 for ends in expected.values())
    assert recorder.turn_ends() == expected
    # eval keeps each rule's first firing per conversation: the first turn's end.
    assert alerts["turn-end"] == {cid: ends[0] for cid, ends in expected.items()}


def _tree_before_turn_ends(root) -> str | None:  # type: ignore[no-untyped-def]
    """The commit before `Sequence.turn_end` was added to the wire, if this is a checkout
    with that history."""
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    proto = "proto/safety_monitor/v1/monitor.proto"
    try:
        added = subprocess.run(
            ["git", "-C", str(repo), "log", "-1", "--format=%H", "-S", "bool turn_end = 9", proto],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if not added:
            return None
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", f"{added}~1", "monitor"],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    return f"{added}~1"


def _in_ci() -> bool:
    """Whether the `CI` environment variable says this is a CI run (CI services set it to
    "true"; "0" and "false" say it is not)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def test_a_sidecar_older_than_turn_ends_ignores_the_flag(tmp_path):
    """The sidecar as it was before the flag existed (its code from git history, run as a
    process): marked steps are monitored like any others, token for token, in the columnar
    format it offers."""
    from monitor.fixtures import start_sidecar

    old = tmp_path / "old"
    old.mkdir()
    commit = _tree_before_turn_ends(old)
    if commit is None:
        missing = "needs a git checkout with the history of the wire protocol"
        if _in_ci():
            # CI runs on a git clone: without the history this check would vanish unseen.
            pytest.fail(f"{missing} (CI is set: clone with full history, not --depth)")
        pytest.skip(f"{missing} (a source tarball has none)")
    assert "turn_end" not in (old / "monitor/wire/safety_monitor/v1/monitor_pb2.pyi").read_text()
    workdir = tmp_path / "work"
    workdir.mkdir()
    # `python -m` puts its working directory first on sys.path: the old tree's `monitor`.
    sidecar = start_sidecar(sidecar_config(workdir), workdir, cwd=old)
    model = build_tiny_llama(hidden=HIDDEN)
    client = CaptureClient(sidecar.target, model_name="tiny", metrics_registry=None)
    try:
        client.attach(model, layers=[1])
        wait_connected(client)
        with client.conversation(["p", "q"], role="user", turn_end=True):
            forward(model, tokens([5, 6, 7], [1, 2, 3]))
        with client.conversation(["p", "q"], prompt_role="user"):
            generate(model, tokens([4, 5], [6, 7]), max_new_tokens=3, min_new_tokens=3)
        assert client.flush(30)
        assert client.stats.batches_rejected == 0
        assert seen_tokens(client, "p") == seen_tokens(client, "q") == 3 + 2 + 2
    finally:
        client.close(timeout=10)
        sidecar.stop()


def test_the_answers_turn_end_from_one_more_pass_over_its_last_token(wire):
    """The README's recipe: generate() never computes the token it samples last; one decode
    pass over it, with the cache generate returns, sends it and ends the answer's turn."""
    client, model, recorder = wire
    prompt = tokens([3, 4, 5], [6, 7, 8])
    with client.conversation(["k", "m"], prompt_role="user"):
        out = generate(
            model,
            prompt,
            max_new_tokens=4,
            min_new_tokens=4,
            return_dict_in_generate=True,
        )
    # As the README: the cache keyword the installed transformers wants (5.24: `cache`, the
    # old `past_key_values` warns; 5.19: only `past_key_values`, `cache` would be ignored).
    new = "cache" in inspect.signature(model.forward).parameters
    cache = {"cache": out.cache} if new else {"past_key_values": out.past_key_values}
    ending = client.conversation(["k", "m"], turn_end=True)
    with ending, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated keyword
        model(input_ids=out.sequences[:, -1:], **cache)
    assert client.flush(30)
    assert recorder.turn_ends() == fired_turn_ends(client.alerts) == {"k": [2, 6], "m": [2, 6]}
    assert recorder.roles("k") == ["user"] * 3 + ["assistant"] * 4
    assert seen_tokens(client, "k") == 3 + 4


def test_the_old_sidecar_check_fails_in_ci_without_git_history(tmp_path, monkeypatch):
    """The compatibility test above skips only outside CI: with the history lookup finding
    nothing (a shallow clone, a source tarball), it fails when CI is set and skips, with the
    reason, when it is not."""
    monkeypatch.setattr(sys.modules[__name__], "_tree_before_turn_ends", lambda root: None)
    cases = [("true", pytest.fail.Exception, "CI is set"), ("1", pytest.fail.Exception, "CI")]
    cases += [(v, pytest.skip.Exception, "source tarball") for v in ("", "0", "false", None)]
    for index, (value, outcome, reason) in enumerate(cases):
        if value is None:
            monkeypatch.delenv("CI", raising=False)
        else:
            monkeypatch.setenv("CI", value)
        workdir = tmp_path / str(index)
        workdir.mkdir()
        with pytest.raises(outcome, match=reason):
            test_a_sidecar_older_than_turn_ends_ignores_the_flag(workdir)
