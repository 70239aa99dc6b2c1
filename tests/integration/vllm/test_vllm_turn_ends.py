"""vLLM marks turn ends: the row of a request's last prompt token (the last chunk of a chunked
prefill, never the others) reaches the sidecar as a turn end, for every request of a mixed step;
and when a request finishes (or is aborted), the plugin ends its answer's turn. A real engine
(eager), the plugin, the relay and a real sidecar with the counting rules and a `turn-end` rule
(`at: turn_end`, always true: it fires at every turn-end row), whose pipeline also records what
each batch it receives says (see tests/integration/test_capture_turn_ends.py).

The plugin learns that a request finished in the next step, after the request's last row was
sent (and the answer's last token is sampled, never computed). It then sends a zero-row
message right after the last row: `end` for a conversation named after its request, `turn_end`
for one named with `sm_conversation_id` (which may go on in a later request). The sidecar's
rules engine takes either as a turn end at the conversation's last evaluated token.
"""

from __future__ import annotations

import pytest

from tests.integration.test_capture_turn_ends import TURN_END_RULE, recording_sidecar
from tests.integration.vllm.harness import (
    Engine,
    engine_kwargs,
    greedy,
    monitor_env,
    seen,
    sidecar_config,
    write_model,
)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]

PROMPTS = {"short-a": 5, "short-b": 7, "long": 70, "late": 40}
# Checked only at turn ends of the answer's role: fires at each answer's last computed token.
ANSWER_END_RULE = """  - rule: answer-end
    category: accounting
    severity: info
    condition: abs(f) >= 0
    roles: [assistant]
    at: turn_end
"""


def fired(alerts, rule):  # type: ignore[no-untyped-def]
    """Conversation id -> the positions where `rule` fired, in order."""
    positions: dict[str, list[int]] = {}
    for alert in alerts:
        if alert["rule"] == rule:
            positions.setdefault(alert["conversation_id"], []).append(alert["position"])
    return {cid: sorted(found) for cid, found in positions.items()}


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vllm-turn-ends-sidecar")
    sidecar, target, recorder = recording_sidecar(
        workdir, sidecar_config(workdir, TURN_END_RULE + ANSWER_END_RULE)
    )
    yield target, recorder
    sidecar.stop()


@pytest.fixture(scope="module")
def engine(sidecar, tmp_path_factory):
    target, _ = sidecar
    workdir = tmp_path_factory.mktemp("vllm-turn-ends")
    model = write_model(workdir / "tiny-llama")
    engine = Engine(
        engine_kwargs(model, eager=True, enable_prefix_caching=False),
        monitor_env(target),
        workdir / "engine.log",
    )
    yield engine
    engine.stop()


def test_the_prompts_last_token_ends_its_turn_in_chunked_and_mixed_steps(engine, sidecar):
    _, recorder = sidecar
    # 32 tokens a step: the short prompts and the first chunk of "long" share the first step;
    # "long" then ends its prompt in a step where the short ones decode, and "late" arrives
    # while they all decode and is prefilled in two chunks.
    requests = [
        {"id": name, "prompt": [10 + i] * length, "params": greedy(6)}
        for i, (name, length) in enumerate(PROMPTS.items())
    ]
    requests[3]["start_step"] = 4
    results = engine.run(requests, timeout=600)
    assert all(len(r["outputs"][0]["token_ids"]) == 6 for r in results.values())
    engine.flush()
    report = engine.report()
    assert report["batches_rejected"] == 0
    for name, length in PROMPTS.items():
        # Every token once, in order (the counting rules), and nothing after the output's
        # fifth token: the sixth is sampled from it and never computed.
        assert seen(report["alerts"], name) == length + 6 - 1
        assert recorder.roles(name) == ["user"] * length + ["assistant"] * 5
    # Exactly one row marked per request: its prompt's last token. The rule fired there, and
    # at the answer's last computed token, where the zero-row `end` sent when the request
    # finished put the answer's turn end (the answer rule fired there only).
    expected = {name: [length - 1] for name, length in PROMPTS.items()}
    assert recorder.turn_ends() == expected
    answers = {name: [length + 4] for name, length in PROMPTS.items()}
    assert fired(report["alerts"], "turn-end") == {n: expected[n] + answers[n] for n in PROMPTS}
    assert fired(report["alerts"], "answer-end") == answers
    chunks = [r for r in recorder.received if r.conversation_id == "long" and r.role == "user"]
    assert len(chunks) >= 3 and [c.turn_end for c in chunks][-1] is True
    assert not any(c.turn_end for c in chunks[:-1])
    # Steps carried several requests, some ending their prompt's turn there and others not
    # ("long" and "late" end their prompts while other requests decode). Which requests share
    # the first step depends on when the engine core receives them: not asserted, printed.
    by_batch: dict[int, list] = {}
    for r in recorder.received:
        by_batch.setdefault(r.batch, []).append(r)
    mixed = [b for b in by_batch.values() if len(b) > 1 and any(r.turn_end for r in b)]
    assert any(not all(r.turn_end for r in b) for b in mixed)
    together = [sum(r.turn_end for r in b) for b in mixed]
    print(f"turn ends per batch with several requests: {together}")
    # The conversations (named after their requests) ended with zero-row `end` messages.
    ends = [r for r in recorder.received if r.end]
    assert sorted(r.conversation_id for r in ends) == sorted(PROMPTS)
    assert all(r.rows == 0 and not r.turn_end for r in ends)


def _events(recorder, conversation_id):  # type: ignore[no-untyped-def]
    """A conversation's messages in arrival order: ("rows", first, last position) or
    ("mark", position, turn_end, end) for a message without rows."""
    events = []
    for r in recorder.received:
        if r.conversation_id != conversation_id:
            continue
        if r.rows:
            events.append(("rows", r.position, r.position + r.rows - 1))
        else:
            events.append(("mark", r.position, r.turn_end, r.end))
    return events


def test_a_finished_request_of_a_named_conversation_ends_its_answers_turn(engine, sidecar):
    _, recorder = sidecar
    named = {"sm_conversation_id": "chat-7"}
    # Two turns of one conversation, one request each (the second re-sends the history, as a
    # chat server does: vLLM computes it from position 0 again, no prefix cache here), then an
    # aborted request of another conversation, next to an unnamed one.
    first = engine.run(
        [{"id": "turn-1", "prompt": [40] * 5, "params": greedy(6, extra_args=named)}]
    )
    history = [40] * 5 + first["turn-1"]["outputs"][0]["token_ids"] + [41] * 4
    engine.run([{"id": "turn-2", "prompt": history, "params": greedy(4, extra_args=named)}])
    aborted = {"sm_conversation_id": "chat-abort"}
    results = engine.run(
        [
            {
                "id": "cut",
                "prompt": [42] * 3,
                "params": greedy(60, extra_args=aborted),
                "abort_after": 5,
            },
            {"id": "plain", "prompt": [43] * 4, "params": greedy(8)},
        ]
    )
    assert results["cut"]["aborted_by_client"]
    engine.run([{"id": "after", "prompt": [44] * 3, "params": greedy(1)}])  # see the last ends
    engine.flush()
    report = engine.report()
    assert report["batches_rejected"] == 0
    # turn-1: prompt rows 0..4, answer rows 5..9 (its sixth token is never computed), then one
    # turn end without rows right after them; turn-2 the same from position 0 (its prompt, 15
    # tokens, and 3 of its 4 answer tokens: rows 0..17).
    events = _events(recorder, "chat-7")
    marks = [e for e in events if e[0] == "mark"]
    assert marks == [("mark", 10, True, False), ("mark", len(history) + 3, True, False)]
    one, two = events.index(marks[0]), events.index(marks[1])
    assert max(e[2] for e in events[:one]) == 9 and events[one + 1][1] == 0
    assert max(e[2] for e in events[one + 1 : two]) == len(history) + 2
    assert two == len(events) - 1
    # Aborted: the turn end follows the last row computed for it, whatever that was.
    events = _events(recorder, "chat-abort")
    assert events[-1][0] == "mark" and [e for e in events if e[0] == "mark"] == [events[-1]]
    assert events[-1][1:] == (max(e[2] for e in events[:-1]) + 1, True, False)
    assert events[-1][1] >= 3 + 5 - 1  # at least the prompt and the answer's first tokens
    # The unnamed request's conversation is over: a zero-row `end` (no turn_end flag needed).
    assert [e for e in _events(recorder, "plain") if e[0] == "mark"] == [("mark", 11, False, True)]
    assert report["turn_ends_sent"] >= 3
    # The answer rule (`roles: [assistant]`, `at: turn_end`) fired at each answer's last
    # computed token, and nowhere else; the turn-end rule at the prompts' ends too.
    cut_end = events[-1][1] - 1
    answer_ends = {"chat-7": [9, len(history) + 2], "chat-abort": [cut_end], "plain": [10]}
    ours = set(answer_ends)
    answer_fired = fired(report["alerts"], "answer-end")
    assert {c: p for c, p in answer_fired.items() if c in ours} == answer_ends
    turn_fired = fired(report["alerts"], "turn-end")
    assert turn_fired["chat-7"] == [4, 9, len(history) - 1, len(history) + 2]
    assert turn_fired["chat-abort"] == [2, cut_end] and turn_fired["plain"] == [3, 10]
