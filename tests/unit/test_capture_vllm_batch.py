"""The vLLM integration's bookkeeping, without vLLM: naming, splitting a flattened step per
request, recomputation and prefix-cache gaps, prompt and output roles, rank plans and the
plugin settings."""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from monitor.capture.vllm.batch import (
    MAX_ID_CHARS,
    BatchSplitter,
    DecodeRun,
    NamingError,
    bounded_id,
    group_by_attributes,
    plan_rank,
    tag_request,
)
from monitor.capture.vllm.config import PluginConfigError, PluginSettings, load_settings
from monitor.capture.vllm.worker import WorkerCapture
from monitor.hookpoints import hook_point_name
from monitor.wire import pb


def test_request_id_is_the_conversation_without_naming():
    tag = tag_request("chat-7-0a1b2c3d", {"_sm_request_id": "chat-7"})
    assert (tag.conversation_id, tag.request_id, tag.role, tag.explicit) == (
        "chat-7",
        "chat-7",
        "assistant",
        False,
    )
    # Not tagged by the frontend: vLLM's random suffix is removed from the internal id.
    assert tag_request("chat-7-0a1b2c3d", None).conversation_id == "chat-7"
    assert tag_request("plain", None).conversation_id == "plain"


def test_naming_through_extra_args_and_vllm_xargs():
    tag = tag_request(
        "1_req-0a1b2c3d",
        {
            "_sm_request_id": "req",
            "_sm_sequence": 1,
            "sm_conversation_id": "conv-9",
            "sm_role": "user",
            "sm_attributes": '{"tenant": "acme", "tier": 2}',  # vllm_xargs is flat: JSON
        },
    )
    assert tag.conversation_id == "conv-9/1"
    assert tag.request_id == "req"
    assert tag.role == "user"
    assert dict(tag.attributes) == {"tenant": "acme", "tier": "2"}
    assert tag.explicit
    assert dict(tag_request("x", {"sm_attributes": {"a": "b"}}).attributes) == {"a": "b"}


def test_the_operator_can_ignore_conversation_ids_from_requests():
    extra = {"_sm_request_id": "req", "_sm_sequence": 2, "sm_conversation_id": "victim"}
    tag = tag_request("2_req-0a1b2c3d", extra, ignore_conversation_ids=True)
    # Named after its own request's internal id, and so ended with it (not `explicit`).
    assert (tag.conversation_id, tag.explicit) == ("req-0a1b2c3d/2", False)
    assert tag.request_id == "req"
    assert tag_request("2_req-0a1b2c3d", extra).conversation_id == "victim/2"
    # The request id is the client's (through `vllm serve`: X-Request-Id), so a client that
    # gives a victim's conversation id as its request id must not land in that conversation:
    # vLLM's random suffix is part of the name.
    forged = {"_sm_request_id": "victim"}
    assert tag_request("victim-9f8e7d6c", forged).conversation_id == "victim"
    tag = tag_request("victim-9f8e7d6c", forged, ignore_conversation_ids=True)
    assert tag.conversation_id == "victim-9f8e7d6c"


def test_the_operator_can_ignore_roles_and_attributes_from_requests():
    # A made-up role would escape every role-scoped rule, an attribute a rule's exceptions
    # name would exempt the request: with the second switch neither comes from the request.
    extra = {
        "sm_conversation_id": "c",
        "sm_role": "x",
        "sm_prompt_role": "y",
        "sm_attributes": {"tenant": "evals"},
    }
    tag = tag_request("r-0a1b2c3d", extra, ignore_roles_and_attributes=True)
    assert (tag.conversation_id, tag.prompt_role, tag.role, dict(tag.attributes)) == (
        "c",
        "user",
        "assistant",
        {},
    )
    # Names it would otherwise refuse are not even looked at.
    bad = {"sm_role": "", "sm_prompt_role": ""}
    tag = tag_request("r-0a1b2c3d", bad, ignore_roles_and_attributes=True)
    assert (tag.prompt_role, tag.role) == ("user", "assistant")
    tag = tag_request("r-0a1b2c3d", extra)
    assert (tag.prompt_role, tag.role) == ("y", "x")


def test_prompt_and_output_roles_default_to_user_and_assistant():
    tag = tag_request("r-0a1b2c3d", None)
    assert (tag.prompt_role, tag.role) == ("user", "assistant")
    # sm_role keeps naming the output's role; sm_prompt_role names the prompt's.
    tag = tag_request("r-0a1b2c3d", {"sm_role": "agent"})
    assert (tag.prompt_role, tag.role) == ("user", "agent")
    tag = tag_request("r-0a1b2c3d", {"sm_prompt_role": "tool"})
    assert (tag.prompt_role, tag.role) == ("tool", "assistant")
    assert tag.for_prompt().role == "tool" and tag.for_prompt().conversation_id == "r"
    same = tag_request("r", {"sm_prompt_role": "guarded", "sm_role": "guarded"})
    assert same.for_prompt() is same


def test_ids_past_the_sidecars_limits_never_reach_it():
    # The sidecar refuses a whole message over a limit (and with it every request's step in
    # that message): what users name is refused here, ids they give vLLM are bounded.
    long_id = "u" * 300
    tag = tag_request(f"{long_id}-0a1b2c3d", {"_sm_request_id": long_id})
    assert len(tag.conversation_id) == MAX_ID_CHARS == len(tag.request_id)
    assert tag.conversation_id.startswith("u" * 200)
    assert bounded_id(long_id) != bounded_id(long_id + "v")  # distinct ids stay distinct
    assert bounded_id("short") == "short"
    splitter = BatchSplitter()
    internal = f"{long_id}-0a1b2c3d"
    splitter.track(internal, tag)
    assert splitter.request_named(bounded_id(internal)) == internal  # an alert finds it


def test_names_a_protobuf_string_cannot_carry_are_refused_or_hashed():
    # JSON's "\ud800" escape decodes to a lone surrogate (vLLM's server reads bodies with
    # json.loads), and a protobuf string refuses one: the step message, with every request in
    # it, would fail to build and be dropped, so the request would evade every rule.
    bad = "x\ud800y"
    for extra in (
        {"sm_conversation_id": bad},
        {"sm_role": bad},
        {"sm_prompt_role": bad},
        {"sm_attributes": {bad: "v"}},
        {"sm_attributes": {"k": bad}},
        {"sm_attributes": '{"k": "\\ud800"}'},
    ):
        with pytest.raises(NamingError, match="valid Unicode"):
            tag_request("r-0a1b2c3d", extra)
    # Ids users give vLLM (request ids, so the default conversation ids and the internal ids
    # sent with each token) are hashed instead, long ones included.
    for user_id in (bad, bad * 100):
        internal = f"{user_id}-0a1b2c3d"
        tag = tag_request(internal, {"_sm_request_id": user_id})
        wire = bounded_id(internal)
        sequence = pb.Sequence(conversation_id=tag.conversation_id, request_id=wire, rows=1)
        assert pb.Sequence.FromString(sequence.SerializeToString()).request_id == wire
        assert len(wire) <= MAX_ID_CHARS and len(tag.conversation_id) <= MAX_ID_CHARS
        splitter = BatchSplitter()
        splitter.track(internal, tag)
        assert splitter.request_named(wire) == internal  # a block alert finds its request
    assert bounded_id(bad) != bounded_id("x\udfffy")  # distinct ids stay distinct


def test_an_alert_for_a_request_no_longer_tracked_hashes_no_tracked_id(monkeypatch):
    # Block alerts often come back after their request finished: looking its id up must not
    # hash every tracked request id under the lock the model thread takes each step.
    from monitor.capture.vllm import batch

    splitter = BatchSplitter(max_requests=50)
    internals = [f"{'u' * 300}-{i:08x}" for i in range(60)]
    for internal in internals:
        splitter.track(internal, tag_request(internal, None))
    wires = [bounded_id(internal) for internal in internals]
    calls: list[str] = []
    real = batch.bounded_id
    monkeypatch.setattr(batch, "bounded_id", lambda text: calls.append(text) or real(text))
    assert splitter.request_named(wires[-1]) == internals[-1]
    assert splitter.request_named(wires[0]) == wires[0]  # evicted: not in flight
    splitter.finish([internals[-1]])
    assert splitter.request_named(wires[-1]) == wires[-1]  # finished: not in flight
    assert calls == []


@pytest.mark.parametrize(
    "extra",
    [
        {"sm_conversation_id": "c" * 257},
        {"sm_role": "r" * 65},
        {"sm_attributes": {f"k{i}": "v" for i in range(17)}},
        {"sm_attributes": {"k" * 65: "v"}},
        {"sm_attributes": {"k": "v" * 257}},
        {"sm_conversation_id": ""},
        {"sm_conversation_id": 5},
        {"sm_role": ""},
        {"sm_prompt_role": "r" * 65},
        {"sm_prompt_role": ""},
        {"sm_prompt_role": 3},
        {"sm_attributes": "not json"},
        {"sm_attributes": "[1, 2]"},
        {"sm_attributes": {"a": ["list"]}},
    ],
)
def test_bad_naming_is_refused(extra):
    with pytest.raises(NamingError):
        tag_request("r", extra)


def test_split_mixed_prefill_and_decode_step():
    splitter = BatchSplitter()
    for rid in ("a", "b", "c"):
        splitter.track(rid, tag_request(rid, None))
    # a: prefill of 5 tokens; b: one decode token at position 9; c: a chunk at 32..39
    splitter.split(["b"], [9], [0])  # b's prompt earlier
    splitter.split(["c"], [32], [0])
    slices = splitter.split(["a", "b", "c"], [5, 1, 8], [0, 9, 32])
    assert [(s.request, s.start, s.stop, s.position) for s in slices] == [
        ("a", 0, 5, 0),
        ("b", 5, 6, 9),
        ("c", 6, 14, 32),
    ]


def test_recomputed_tokens_are_not_sent_again():
    splitter = BatchSplitter()
    splitter.track("r", tag_request("r", None))
    splitter.split(["r"], [20], [0])
    splitter.split(["r"], [1], [20])
    # Preempted, then recomputed from position 0 (prompt + output so far) plus one new token.
    (piece,) = splitter.split(["r"], [22], [0])
    assert (piece.start, piece.stop, piece.position) == (21, 22, 21)
    assert splitter.skipped_rows == 21


def test_prefix_cache_hit_starts_at_the_true_position():
    splitter = BatchSplitter()
    splitter.track("r", tag_request("r", None))
    (piece,) = splitter.split(["r"], [8], [32])
    assert (piece.position, piece.rows) == (32, 8)
    assert splitter.gaps == 1


def test_untracked_and_finished_requests():
    splitter = BatchSplitter()
    splitter.track("a", tag_request("a", {"sm_conversation_id": "conv"}))
    splitter.track("b", tag_request("b", {"sm_conversation_id": "conv"}))
    assert splitter.requests_of("conv") == ["a", "b"]
    splitter.finish({"a"})
    assert splitter.requests_of("conv") == ["b"]
    assert [s.request for s in splitter.split(["a", "b"], [2, 3], [0, 0])] == ["b"]


def test_group_by_attributes():
    splitter = BatchSplitter()
    splitter.track("a", tag_request("a", {"sm_attributes": {"t": "1"}}))
    splitter.track("b", tag_request("b", None))
    splitter.track("c", tag_request("c", {"sm_attributes": {"t": "1"}}))
    groups = group_by_attributes(splitter.split(["a", "b", "c"], [1, 1, 1], [0, 0, 0]))
    assert [[s.request for s in g] for g in groups] == [["a", "c"], ["b"]]


def test_a_conversation_twice_in_a_step_goes_to_separate_groups():
    # Two requests of one conversation in the same step: as one batch the sidecar would
    # refuse it (duplicate_conversation) and the step of "other" would be lost with it.
    splitter = BatchSplitter()
    splitter.track("r1", tag_request("r1", {"sm_conversation_id": "chat"}))
    splitter.track("other", tag_request("other", None))
    splitter.track("r2", tag_request("r2", {"sm_conversation_id": "chat"}))
    groups = group_by_attributes(splitter.split(["r1", "other", "r2"], [1, 1, 1], [0, 0, 0]))
    assert [[s.request for s in g] for g in groups] == [["r1", "other"], ["r2"]]
    for group in groups:
        ids = [s.tag.conversation_id for s in group]
        assert len(set(ids)) == len(ids)


def test_rank_plan():
    assert plan_rank([3], tp_rank=0, pp_rank=0, pp_size=1, stage_layers=(0, 8)).sends
    assert not plan_rank([3], tp_rank=1, pp_rank=0, pp_size=1, stage_layers=(0, 8)).sends
    # Pipeline parallel: the stage owning the layers sends, the others do not.
    assert plan_rank([6], tp_rank=0, pp_rank=1, pp_size=2, stage_layers=(4, 8)).sends
    assert not plan_rank([6], tp_rank=0, pp_rank=0, pp_size=2, stage_layers=(0, 4)).sends
    with pytest.raises(ValueError, match="span pipeline stages"):
        plan_rank([2, 6], tp_rank=0, pp_rank=0, pp_size=2, stage_layers=(0, 4))


def test_settings_from_env_and_yaml(tmp_path):
    assert load_settings({}) is None
    settings = load_settings(
        {"SAFETY_MONITOR_TARGET": "127.0.0.1:1", "SAFETY_MONITOR_LAYERS": "8, 16"}
    )
    assert settings.target == "127.0.0.1:1" and settings.layers == (8, 16)
    config = tmp_path / "monitor.yaml"
    config.write_text(
        "target: 127.0.0.1:2\nlayers: [3]\non_full: block\nguard: false\nblock_within: 2\n"
    )
    settings = load_settings({"SAFETY_MONITOR_CONFIG": str(config), "SAFETY_MONITOR_LAYERS": "4"})
    assert (settings.target, settings.layers, settings.on_full, settings.guard) == (
        "127.0.0.1:2",
        (4,),
        "block",
        False,
    )
    assert settings.block_within == 2
    assert not settings.ignore_request_conversation_ids
    config.write_text("target: t\nlayers: [1]\nignore_request_conversation_ids: true\n")
    assert load_settings({"SAFETY_MONITOR_CONFIG": str(config)}).ignore_request_conversation_ids
    env = {"SAFETY_MONITOR_CONFIG": str(config)}
    for text, expected in (("0", False), ("no", False), ("1", True), ("TRUE", True)):
        env["SAFETY_MONITOR_IGNORE_REQUEST_CONVERSATION_IDS"] = text
        assert load_settings(env).ignore_request_conversation_ids is expected
    assert not load_settings(env).ignore_request_roles_and_attributes
    env["SAFETY_MONITOR_IGNORE_REQUEST_ROLES_AND_ATTRIBUTES"] = "yes"
    assert load_settings(env).ignore_request_roles_and_attributes
    env["SAFETY_MONITOR_IGNORE_REQUEST_ROLES_AND_ATTRIBUTES"] = "maybe"
    with pytest.raises(PluginConfigError, match="ROLES_AND_ATTRIBUTES"):
        load_settings(env)
    assert (
        load_settings(
            {
                "SAFETY_MONITOR_TARGET": "t",
                "SAFETY_MONITOR_LAYERS": "1",
                "SAFETY_MONITOR_BLOCK_WITHIN": "0",
            }
        ).block_within
        == 0
    )


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("target: t\n", "layers"),
        ("target: t\nlayers: [x]\n", "not a layer index"),
        ("target: t\nlayers: [1]\non_full: maybe\n", "on_full"),
        ("target: t\nlayers: [1]\nbogus: 1\n", "unknown keys"),
        ("layers: [1]\n", "no sidecar target"),
        ("target: t\nlayers: [1]\nblock_within: -1\n", "block_within"),
        ("target: t\nlayers: [1]\nignore_request_conversation_ids: 1\n", "expected true"),
        ("target: t\nlayers: [1]\nignore_request_roles_and_attributes: x\n", "expected true"),
    ],
)
def test_bad_settings_are_refused(tmp_path, yaml_text, message):
    config = tmp_path / "monitor.yaml"
    config.write_text(yaml_text)
    with pytest.raises(PluginConfigError, match=message):
        load_settings({"SAFETY_MONITOR_CONFIG": str(config)})


def roles_of(slices):
    return [(s.request, s.tag.role, s.start, s.stop, s.position) for s in slices]


def test_prompt_rows_carry_the_prompt_role_and_output_rows_the_output_role():
    splitter = BatchSplitter()
    splitter.track("r", tag_request("r", {"sm_prompt_role": "asker"}), prompt_tokens=10)
    splitter.track("s", tag_request("s", None), prompt_tokens=3)
    # Chunked prefill of r's 10-token prompt next to s's whole prompt, then r's last chunk
    # (s samples its first output, computed in the next step at position 3), then decodes.
    first = splitter.split(["r", "s"], [6, 3], [0, 0])
    assert roles_of(first) == [
        ("r", "asker", 0, 6, 0),
        ("s", "user", 6, 9, 0),
    ]
    assert first.prompt_slices == 2
    second = splitter.split(["r", "s"], [4, 1], [6, 3])
    assert roles_of(second) == [
        ("r", "asker", 0, 4, 6),
        ("s", "assistant", 4, 5, 3),
    ]
    assert second.prompt_slices == 1
    third = splitter.split(["r", "s"], [1, 1], [10, 4])
    assert roles_of(third) == [
        ("r", "assistant", 0, 1, 10),
        ("s", "assistant", 1, 2, 4),
    ]
    # Each result keeps its own count: a later split does not change an earlier one's.
    assert (third.prompt_slices, first.prompt_slices) == (0, 2)
    assert splitter.straddles == 0


def test_a_slice_spanning_the_prompt_end_becomes_two_sequences():
    splitter = BatchSplitter()
    for rid in ("a", "r", "b"):
        splitter.track(rid, tag_request(rid, None), prompt_tokens=10)
    splitter.split(["r"], [7], [0])  # r's prompt up to position 6 was sent
    # r then computes positions 7..12 in one slice: 7..9 are prompt, 10..12 output.
    slices = splitter.split(["a", "r", "b"], [2, 6, 1], [0, 7, 0])
    assert roles_of(slices) == [
        ("a", "user", 0, 2, 0),
        ("r", "user", 2, 5, 7),
        ("r", "assistant", 5, 8, 10),
        ("b", "user", 8, 9, 0),
    ]
    assert splitter.straddles == 1
    # One conversation twice in a step: the output part goes out in a second message, after
    # the first (which holds its prompt part), so positions stay in order.
    groups = group_by_attributes(slices)
    assert [[(s.request, s.tag.role) for s in g] for g in groups] == [
        [("a", "user"), ("r", "user"), ("b", "user")],
        [("r", "assistant")],
    ]
    assert splitter.state("r")[1] == 13


def test_a_straddle_is_split_at_the_prompts_turn_end_even_when_both_roles_are_the_same():
    # One slice could carry both roles' rows, but the prompt's turn ends at its last token,
    # mid-slice: a turn end marks only a slice's last row, so the slice is split there.
    splitter = BatchSplitter()
    same = {"sm_prompt_role": "guarded", "sm_role": "guarded"}
    splitter.track("r", tag_request("r", same), prompt_tokens=4)
    slices = splitter.split(["r"], [6], [0])
    assert roles_of(slices) == [("r", "guarded", 0, 4, 0), ("r", "guarded", 4, 6, 4)]
    assert [s.turn_end for s in slices] == [True, False]
    assert splitter.straddles == 1


def test_recomputed_rows_across_the_prompt_end_are_skipped_not_split():
    # Preempted after 11 outputs of a 10-token prompt: vLLM recomputes prompt and outputs
    # (positions 0..20, sent already) plus the newest token at 21, all in one slice.
    splitter = BatchSplitter()
    splitter.track("r", tag_request("r", None), prompt_tokens=10)
    splitter.split(["r"], [10], [0])
    for position in range(10, 21):
        splitter.split(["r"], [1], [position])
    assert roles_of(splitter.split(["r"], [22], [0])) == [("r", "assistant", 21, 22, 21)]
    assert (splitter.skipped_rows, splitter.straddles) == (21, 0)
    # Preempted mid-prefill: the recomputed chunk skips what was sent, the rest is prompt.
    splitter.track("p", tag_request("p", None), prompt_tokens=40)
    splitter.split(["p"], [16], [0])
    assert roles_of(splitter.split(["p"], [32], [0])) == [("p", "user", 16, 32, 16)]


def test_a_prefix_cache_hit_keeps_roles_by_position():
    # n > 1: the prompt is cached by the first sequence, the others start at the output.
    splitter = BatchSplitter()
    splitter.track("0_r", tag_request("0_r", None), prompt_tokens=8)
    splitter.track("1_r", tag_request("1_r", None), prompt_tokens=8)
    slices = splitter.split(["0_r", "1_r"], [8, 1], [0, 8])
    assert roles_of(slices) == [("0_r", "user", 0, 8, 0), ("1_r", "assistant", 8, 9, 8)]
    # A cached prompt prefix: the uncached part of the prompt is still the prompt's.
    splitter.track("c", tag_request("c", None), prompt_tokens=40)
    assert roles_of(splitter.split(["c"], [8], [32])) == [("c", "user", 0, 8, 32)]


def test_a_streaming_session_grows_the_prompt():
    splitter = BatchSplitter()
    splitter.track("r", tag_request("r", None), prompt_tokens=4)
    splitter.split(["r"], [4], [0])
    splitter.split(["r"], [1], [4])
    # More input arrives: vLLM's prompt is now 9 tokens (the 5 so far and 4 new ones).
    splitter.set_prompt_tokens("r", 9)
    assert roles_of(splitter.split(["r"], [4], [5])) == [("r", "user", 0, 4, 5)]
    assert roles_of(splitter.split(["r"], [1], [9])) == [("r", "assistant", 0, 1, 9)]
    splitter.set_prompt_tokens("gone", 3)  # not tracked: nothing to change


class _Client:
    def __init__(self):
        self.steps = []

    def submit(self, step):
        self.steps.append(step)

    def submit_again(self, step, positions):
        # CaptureClient.submit_again's contract: `step` again, at `positions`.
        self.steps.append(dataclasses.replace(step, positions=positions))


def _worker(**settings):
    """The worker's per-step path without a vLLM runner: `WorkerCapture.__init__` needs a
    loaded model (the real path runs in tests/integration/vllm); everything `after_forward`
    touches is set here as `__init__` sets it."""
    capture = WorkerCapture.__new__(WorkerCapture)
    capture.settings = PluginSettings(target="t", layers=(1,), **settings)
    capture.splitter = BatchSplitter()
    capture.client = _Client()
    capture._layout = None
    capture._plans = {}
    capture._views = {}
    capture._on_cuda = False
    capture.steps = 0
    capture.naming_errors = 0
    capture.buffers = {hook_point_name(1): torch.arange(64.0).reshape(16, 4)}
    capture._empty = {hook_point_name(1): torch.empty(0, 4)}
    capture._blocks = {}
    capture._blocks_lock = threading.Lock()
    capture.conversations_ended = 0
    capture.turn_ends_sent = 0
    capture.recent_ends = deque()
    return capture


def _run_step(capture, runner, req_ids, num_tokens, computed, new=()):
    runner.input_batch = SimpleNamespace(
        num_reqs=len(req_ids), req_ids=list(req_ids), num_computed_tokens_cpu=np.array(computed)
    )
    capture.note_layout(runner, np.array(num_tokens))
    scheduled = [SimpleNamespace(req_id=r) for r in new]
    before = len(capture.client.steps)
    capture.after_forward(
        runner, SimpleNamespace(finished_req_ids=set(), scheduled_new_reqs=scheduled)
    )
    return [
        (step.tagging.conversation_ids, step.tagging.roles, step.rows, step.positions)
        for step in capture.client.steps[before:]
    ]


def _runner(**prompts):
    requests = {}
    for rid, (length, extra) in prompts.items():
        params = SimpleNamespace(extra_args=extra)
        requests[rid] = SimpleNamespace(sampling_params=params, num_prompt_tokens=length)
    return SimpleNamespace(requests=requests)


def test_worker_steps_tag_the_prompt_and_the_output_and_reuse_no_prefill_plan():
    capture = _worker()
    runner = _runner(a=(3, {"sm_role": "bot"}), b=(2, None))
    # The prefill step and the first decode step run the same requests in the same order:
    # the decode must not reuse the prefill's plan (its Tagging names the prompt role).
    prefill = _run_step(capture, runner, ["a", "b"], [3, 2], [0, 0], new=["a", "b"])
    assert prefill == [(("a", "b"), ("user", "user"), [3, 2], [0, 0])]
    for step in range(3):
        decode = _run_step(capture, runner, ["a", "b"], [1, 1], [3 + step, 2 + step])
        assert decode == [(("a", "b"), ("bot", "assistant"), [1, 1], [3 + step, 2 + step])]
    # Two plans: one per role layout, the decode one reused.
    assert len(capture._plans) == 2


def test_worker_sends_a_straddling_request_in_two_messages_in_order():
    capture = _worker()
    runner = _runner(a=(2, None), r=(5, None))
    _run_step(capture, runner, ["r"], [3], [0], new=["r"])
    steps = _run_step(capture, runner, ["a", "r"], [2, 4], [0, 3], new=["a"])
    assert steps == [
        (("a", "r"), ("user", "user"), [2, 2], [0, 3]),
        (("r",), ("assistant",), [2], [5]),
    ]
    first, second = capture.client.steps[-2:]
    rows = capture.buffers[hook_point_name(1)]
    # The rows that went out are the ones at those places in the flattened batch.
    assert torch.equal(first.layers[hook_point_name(1)], rows[0:4])
    assert torch.equal(second.layers[hook_point_name(1)], rows[4:6])


def test_worker_tags_with_both_defaults_when_told_to_ignore_request_roles():
    capture = _worker(ignore_request_roles_and_attributes=True)
    runner = _runner(a=(2, {"sm_prompt_role": "system", "sm_role": "unscoped"}))
    assert _run_step(capture, runner, ["a"], [2], [0], new=["a"]) == [(("a",), ("user",), [2], [0])]
    assert _run_step(capture, runner, ["a"], [1], [2]) == [(("a",), ("assistant",), [1], [2])]


def test_worker_serves_a_bad_prompt_role_under_the_defaults():
    capture = _worker()
    runner = _runner(a=(2, {"sm_prompt_role": "", "sm_conversation_id": "named"}))
    assert _run_step(capture, runner, ["a"], [3], [0], new=["a"]) == [
        (("a",), ("user",), [2], [0]),
        (("a",), ("assistant",), [1], [2]),
    ]
    assert capture.naming_errors == 1


def test_a_bad_role_keeps_the_operators_naming_switch_and_the_frontends_ids():
    # With `ignore_request_conversation_ids` a request is named by vLLM's internal id (the
    # random suffix included): a bad role must not turn it back into the id its client chose.
    capture = _worker(ignore_request_conversation_ids=True)
    bad = {"sm_prompt_role": "", "_sm_request_id": "victim-id"}
    runner = _runner(**{"victim-id-0a1b2c3d": (2, bad)})
    steps = _run_step(capture, runner, ["victim-id-0a1b2c3d"], [2], [0], new=["victim-id-0a1b2c3d"])
    assert steps == [(("victim-id-0a1b2c3d",), ("user",), [2], [0])]
    assert capture.naming_errors == 1
    # Without the switch, n > 1 naming survives a bad role: the sequence is `<id>/<j>`.
    capture = _worker()
    bad = {"sm_role": "", "_sm_request_id": "cmpl-7", "_sm_sequence": 1}
    runner = _runner(**{"1_cmpl-7-0a1b2c3d": (2, bad)})
    steps = _run_step(capture, runner, ["1_cmpl-7-0a1b2c3d"], [2], [0], new=["1_cmpl-7-0a1b2c3d"])
    assert steps[0][0] == ("cmpl-7/1",)
    assert capture.naming_errors == 1


def test_worker_reads_a_grown_prompt_when_vllm_schedules_a_request_as_new_again():
    # vLLM's streaming-input sessions: more input for a running request arrives as a new
    # request with the same id, its prompt now what it had so far plus the new input.
    capture = _worker()
    runner = _runner(a=(2, None))
    _run_step(capture, runner, ["a"], [2], [0], new=["a"])
    assert _run_step(capture, runner, ["a"], [1], [2]) == [(("a",), ("assistant",), [1], [2])]
    runner.requests["a"].num_prompt_tokens = 6
    # The update names itself differently: ignored, the session keeps its first input's naming
    # (its positions continue in that conversation; another id would start mid-conversation).
    update = {"sm_conversation_id": "other", "sm_prompt_role": "system", "sm_role": "x"}
    runner.requests["a"].sampling_params.extra_args = update
    assert _run_step(capture, runner, ["a"], [3], [3], new=["a"]) == [(("a",), ("user",), [3], [3])]
    assert _run_step(capture, runner, ["a"], [1], [6]) == [(("a",), ("assistant",), [1], [6])]


def test_requests_that_ended_unseen_are_finished_when_the_capture_comes_back():
    # The bench's same-engine switch: vLLM reports a request's end once, in the next step; if
    # the capture was off then, it finishes the request when it is switched back on.
    capture = _worker()
    runner = _runner(a=(2, None), b=(2, {"sm_conversation_id": "named"}), c=(2, None))
    _run_step(capture, runner, ["a", "b", "c"], [2, 2, 2], [0, 0, 0], new=["a", "b", "c"])
    assert capture.finish_missing({"c": object()}) == 2
    assert capture.splitter.tracked() == ["c"]
    # a's conversation (named after its request) ends; "named" may go on in a later request:
    # its answer's turn ends, its state is kept.
    ends = [s for s in capture.client.steps if s.tagging.end]
    assert [(s.tagging.conversation_ids, s.positions) for s in ends] == [(("a",), [2])]
    turn_ends = [s for s in capture.client.steps if s.tagging.turn_ends and not s.rows[0]]
    assert [(s.tagging.conversation_ids, s.positions) for s in turn_ends] == [(("named",), [2])]
    assert capture.finish_missing({"c": object()}) == 0


def _finish(capture, runner, finished):
    """One step that only reports finished requests (vLLM's next step after their last)."""
    before = len(capture.client.steps)
    capture.after_forward(
        runner, SimpleNamespace(finished_req_ids=set(finished), scheduled_new_reqs=[])
    )
    return capture.client.steps[before:]


def test_a_finished_request_of_a_named_conversation_ends_its_answers_turn():
    capture = _worker()
    named = {"sm_conversation_id": "chat", "sm_role": "bot", "sm_attributes": {"tenant": "t"}}
    runner = _runner(**{"r-0a1b2c3d": (3, named), "u": (2, None)})
    _run_step(capture, runner, ["r-0a1b2c3d", "u"], [3, 2], [0, 0], new=["r-0a1b2c3d", "u"])
    _run_step(capture, runner, ["r-0a1b2c3d", "u"], [1, 1], [3, 2])
    (mark,) = _finish(capture, runner, ["r-0a1b2c3d"])
    # One zero-row sequence right after the request's last sent row (position 3): a turn end,
    # not an end (the conversation goes on), under the request's own id, role and attributes.
    assert (mark.rows, mark.positions) == ([0], [4])
    tagging = mark.tagging
    assert (tagging.turn_ends, tagging.end) == ((True,), False)
    assert (tagging.conversation_ids, tagging.roles) == (("chat",), ("bot",))
    assert (tagging.request_ids, dict(tagging.attributes)) == (("r-0a1b2c3d",), {"tenant": "t"})
    assert all(t.shape[0] == 0 for t in mark.layers.values())
    assert (capture.turn_ends_sent, capture.conversations_ended) == (1, 0)
    # A request named after itself ends its conversation (an end is a turn end too).
    (end,) = _finish(capture, runner, ["u"])
    assert (end.tagging.end, end.tagging.turn_ends, end.positions) == (True, (), [3])
    assert (capture.turn_ends_sent, capture.conversations_ended) == (1, 1)


def test_an_aborted_request_of_a_named_conversation_ends_its_turn_where_it_stopped():
    # vLLM reports an aborted request in finished_req_ids as well: mid-prefill, the turn end
    # sits after the last row computed for it.
    capture = _worker()
    runner = _runner(a=(10, {"sm_conversation_id": "chat"}))
    _run_step(capture, runner, ["a"], [4], [0], new=["a"])
    (mark,) = _finish(capture, runner, ["a"])
    assert (mark.tagging.turn_ends, mark.tagging.end, mark.positions) == ((True,), False, [4])


def test_a_named_conversations_turn_ends_once_its_last_running_request_finishes():
    # Two requests run one named conversation: the first to finish sends nothing (a turn
    # end at its own position would not be the conversation's next one, a gap to the
    # sidecar); the last sends one. Two finishing in the same step send one, at the later
    # position.
    capture = _worker()
    shared = {"sm_conversation_id": "chat"}
    runner = _runner(a=(2, shared), b=(3, shared), c=(2, shared), d=(4, shared))
    _run_step(capture, runner, ["a", "b"], [2, 3], [0, 0], new=["a", "b"])
    assert _finish(capture, runner, ["a"]) == []
    (mark,) = _finish(capture, runner, ["b"])
    assert (mark.tagging.conversation_ids, mark.positions) == (("chat",), [3])
    _run_step(capture, runner, ["c", "d"], [2, 4], [0, 0], new=["c", "d"])
    (mark,) = _finish(capture, runner, ["c", "d"])
    assert (mark.tagging.request_ids, mark.positions) == (("d",), [4])
    assert capture.turn_ends_sent == 2


def test_only_the_chunk_holding_the_prompts_last_token_ends_its_turn():
    splitter = BatchSplitter()
    splitter.track("r", tag_request("r", None), prompt_tokens=10)
    splitter.track("s", tag_request("s", None), prompt_tokens=3)
    # r's prompt in three chunks (4, 4, 2 tokens) next to s's whole prompt, then decodes.
    steps = [
        splitter.split(["r", "s"], [4, 3], [0, 0]),
        splitter.split(["r", "s"], [4, 1], [4, 3]),
        splitter.split(["r", "s"], [2, 1], [8, 4]),
        splitter.split(["r", "s"], [1, 1], [10, 5]),
    ]
    marks = [[(s.request, s.turn_end) for s in step] for step in steps]
    assert marks == [
        [("r", False), ("s", True)],
        [("r", False), ("s", False)],
        [("r", True), ("s", False)],
        [("r", False), ("s", False)],
    ]
    # A prompt cached up to its last token: the one computed token ends the prompt's turn.
    splitter.track("c", tag_request("c", None), prompt_tokens=40)
    (cached,) = splitter.split(["c"], [1], [39])
    assert (cached.position, cached.turn_end) == (39, True)


def test_recomputed_prompt_rows_do_not_mark_the_turn_end_again():
    splitter = BatchSplitter()
    splitter.track("r", tag_request("r", None), prompt_tokens=4)
    assert [s.turn_end for s in splitter.split(["r"], [4], [0])] == [True]
    splitter.split(["r"], [1], [4])
    # Preempted: the prompt and the first output are recomputed with the next token.
    (again,) = splitter.split(["r"], [6], [0])
    assert (again.position, again.rows, again.turn_end) == (5, 1, False)


def test_a_grown_streaming_prompt_ends_its_turn_at_its_new_end():
    splitter = BatchSplitter()
    splitter.track("r", tag_request("r", None), prompt_tokens=4)
    assert [s.turn_end for s in splitter.split(["r"], [4], [0])] == [True]
    splitter.split(["r"], [1], [4])
    splitter.set_prompt_tokens("r", 9)
    assert [s.turn_end for s in splitter.split(["r"], [4], [5])] == [True]


def test_worker_marks_the_prompts_last_chunk_per_request_in_its_tagging():
    capture = _worker()
    runner = _runner(a=(3, None), b=(6, None))
    # a's whole prompt and b's first chunk; then a decodes next to b's last chunk; then both
    # decode: the tagging (serialised once into the frame template) carries the flags.
    _run_step(capture, runner, ["a", "b"], [3, 3], [0, 0], new=["a", "b"])
    _run_step(capture, runner, ["a", "b"], [1, 3], [3, 3])
    _run_step(capture, runner, ["a", "b"], [1, 1], [4, 6])
    _run_step(capture, runner, ["a", "b"], [1, 1], [5, 7])
    taggings = [step.tagging for step in capture.client.steps]
    assert [t.turn_ends for t in taggings] == [(True, False), (False, True), (), ()]
    # Flags are part of the key: the frame writer must not reuse another step's template.
    assert len({t.key for t in taggings[:3]}) == 3
    assert taggings[2] is taggings[3]  # decode steps reuse one plan (and its tagging)


def _counting_splits(capture):
    """Count the steps that go through `BatchSplitter.split` (the others took the decode
    run's shortcut)."""
    calls = []
    split = capture.splitter.split

    def counted(*args):
        calls.append(args[0])
        return split(*args)

    capture.splitter.split = counted
    return calls


def _run_finishing(capture, runner, req_ids, num_tokens, computed, finished):
    """A step whose scheduler output also reports requests that finished in the step before."""
    runner.input_batch = SimpleNamespace(
        num_reqs=len(req_ids), req_ids=list(req_ids), num_computed_tokens_cpu=np.array(computed)
    )
    capture.note_layout(runner, np.array(num_tokens))
    before = len(capture.client.steps)
    capture.after_forward(
        runner, SimpleNamespace(finished_req_ids=set(finished), scheduled_new_reqs=[])
    )
    return [
        (s.tagging.conversation_ids, s.tagging.roles, s.rows, s.positions)
        for s in capture.client.steps[before:]
    ]


def test_a_decode_run_is_sent_without_splitting_each_step_and_keeps_the_bookkeeping():
    capture = _worker()
    runner = _runner(a=(3, {"sm_role": "bot"}), b=(2, None))
    splits = _counting_splits(capture)
    _run_step(capture, runner, ["a", "b"], [3, 2], [0, 0], new=["a", "b"])
    for step in range(5):
        decode = _run_step(capture, runner, ["a", "b"], [1, 1], [3 + step, 2 + step])
        assert decode == [(("a", "b"), ("bot", "assistant"), [1, 1], [3 + step, 2 + step])]
    # The prefill and the first decode step are split; the next four take the shortcut.
    assert len(splits) == 2
    decodes = capture.client.steps[1:]
    assert all(s.tagging is decodes[0].tagging for s in decodes)  # one template for the run
    assert all(s.persistent_layers for s in decodes)
    assert [s.layers[hook_point_name(1)].data_ptr() for s in decodes] == [
        capture.buffers[hook_point_name(1)].data_ptr()
    ] * 5
    # What `split` would have advanced: each request's next position to send (read by the
    # request's end and by block alerts).
    assert capture.splitter.state("a")[1] == 8 and capture.splitter.state("b")[1] == 7
    assert capture.steps == 6


def test_a_changed_composition_leaves_the_decode_run():
    capture = _worker()
    runner = _runner(a=(2, None), b=(2, None), c=(2, None))
    splits = _counting_splits(capture)
    _run_step(capture, runner, ["a", "b"], [2, 2], [0, 0], new=["a", "b"])
    _run_step(capture, runner, ["a", "b"], [1, 1], [2, 2])
    _run_step(capture, runner, ["a", "b"], [1, 1], [3, 3])
    assert len(splits) == 2
    # A request joins (its prefill next to the decodes): split, with the prompt's role.
    joined = _run_step(capture, runner, ["a", "b", "c"], [1, 1, 2], [4, 4, 0], new=["c"])
    assert joined == [(("a", "b", "c"), ("assistant", "assistant", "user"), [1, 1, 2], [4, 4, 0])]
    # The same requests in another order (vLLM condenses its batch when one leaves).
    swapped = _run_step(capture, runner, ["b", "a", "c"], [1, 1, 1], [5, 5, 2])
    assert swapped == [(("b", "a", "c"), ("assistant",) * 3, [1, 1, 1], [5, 5, 2])]
    # Then a new run of the three, in that order.
    again = _run_step(capture, runner, ["b", "a", "c"], [1, 1, 1], [6, 6, 3])
    assert again == [(("b", "a", "c"), ("assistant",) * 3, [1, 1, 1], [6, 6, 3])]
    assert len(splits) == 4
    # One request leaves the batch without finishing (preempted): split again.
    left = _run_step(capture, runner, ["b", "a"], [1, 1], [7, 7])
    assert left == [(("b", "a"), ("assistant",) * 2, [1, 1], [7, 7])]
    assert len(splits) == 5


def test_a_preempted_request_recomputed_in_a_decode_run_is_not_sent_twice():
    capture = _worker()
    runner = _runner(a=(2, None), b=(2, None))
    _run_step(capture, runner, ["a", "b"], [2, 2], [0, 0], new=["a", "b"])
    _run_step(capture, runner, ["a", "b"], [1, 1], [2, 2])
    _run_step(capture, runner, ["a", "b"], [1, 1], [3, 3])
    # b was preempted and comes back in the same place, recomputing from position 0 up to
    # and including one new token (position 4): only the new row goes out.
    step = _run_step(capture, runner, ["a", "b"], [1, 5], [4, 0])
    assert step == [(("a", "b"), ("assistant",) * 2, [1, 1], [4, 4])]
    assert capture.splitter.skipped_rows == 4
    # Even a recomputation of exactly one token (b at 4 again, as a decode step would look)
    # is split, and its row skipped: it does not continue the run.
    step = _run_step(capture, runner, ["a", "b"], [1, 1], [5, 4])
    assert step == [(("a",), ("assistant",), [1], [5])]
    assert capture.splitter.skipped_rows == 5
    # A position past what was sent (a gap) is split too, and counted.
    step = _run_step(capture, runner, ["a", "b"], [1, 1], [6, 9])
    assert step == [(("a", "b"), ("assistant",) * 2, [1, 1], [6, 9])]
    assert capture.splitter.gaps == 1


def test_a_finished_request_ends_the_decode_run_and_its_id_is_tagged_anew():
    capture = _worker()
    runner = _runner(a=(2, None), b=(2, None))
    splits = _counting_splits(capture)
    _run_step(capture, runner, ["a", "b"], [2, 2], [0, 0], new=["a", "b"])
    _run_step(capture, runner, ["a", "b"], [1, 1], [2, 2])
    _run_step(capture, runner, ["a", "b"], [1, 1], [3, 3])
    assert len(splits) == 2
    # a finished; its id comes back at once as a new request of another conversation, in
    # the same batch slot, with a one-token prompt (a layout the old run would match).
    runner.requests["a"] = SimpleNamespace(
        sampling_params=SimpleNamespace(extra_args={"sm_conversation_id": "other"}),
        num_prompt_tokens=1,
    )
    steps = _run_finishing(capture, runner, ["a", "b"], [1, 1], [4, 4], finished=["a"])
    # a's end, then the step: a is untracked now, tracked again as "other" from position 4
    # (a gap: its prompt's first 4 positions were never computed here).
    assert steps[0][0] == ("a",)
    assert steps[1:] == [(("other", "b"), ("assistant", "assistant"), [1, 1], [4, 4])]
    assert capture.splitter.state("a")[0].conversation_id == "other"
    assert len(splits) == 3


def test_a_streaming_input_that_grows_the_prompt_by_one_token_leaves_the_decode_run():
    capture = _worker()
    runner = _runner(a=(2, None))
    _run_step(capture, runner, ["a"], [2], [0], new=["a"])
    _run_step(capture, runner, ["a"], [1], [2])
    _run_step(capture, runner, ["a"], [1], [3])
    # vLLM schedules the session as new again with one more input token: prompt rows.
    runner.requests["a"].num_prompt_tokens = 5
    step = _run_step(capture, runner, ["a"], [1], [4], new=["a"])
    assert step == [(("a",), ("user",), [1], [4])]


class _RecordingClient:
    """What reaches the capture client, as the ring would carry it: each step's tagging, rows,
    positions and the rows' values at submit time (the buffer is rewritten every step)."""

    def __init__(self):
        self.sent = []
        self.again = 0

    def submit(self, step):
        tagging = step.tagging
        layers = {hp: t.clone() for hp, t in step.layers.items()}
        self.sent.append(
            (
                tagging.conversation_ids,
                tagging.roles,
                tagging.request_ids,
                tuple(sorted(tagging.attributes.items())),
                tagging.turn_ends,
                tagging.end,
                list(step.rows),
                list(step.positions),
                layers,
            )
        )

    def submit_again(self, step, positions):
        self.again += 1
        self.submit(dataclasses.replace(step, positions=positions))


def _random_schedule(seed):
    """A vLLM-like run: requests join (prompts in chunks), decode one token a step, finish
    (reported in the next step), get preempted (recomputed from 0 with one new token), and
    the batch gets reordered. Yields (req_ids, num_tokens, computed, new, finished)."""
    import random

    rng = random.Random(seed)
    prompts, computed, batch, finished, next_id = {}, {}, [], set(), 0
    for _ in range(60):
        if batch and rng.random() < 0.08:  # finishes; vLLM says so in the next step
            gone = rng.choice(batch)
            batch.remove(gone)
            finished.add(gone)
        new = []
        if len(batch) < 5 and rng.random() < 0.15:
            rid = f"q{next_id}-0a1b2c3d"
            next_id += 1
            prompts[rid], computed[rid] = rng.randint(1, 7), 0
            batch.append(rid)
            new.append(rid)
        if len(batch) > 1 and rng.random() < 0.05:
            first, second = rng.sample(range(len(batch)), 2)
            batch[first], batch[second] = batch[second], batch[first]
        tokens = []
        for rid in batch:
            if rid not in new and computed[rid] >= prompts[rid] and rng.random() < 0.03:
                tokens.append(computed[rid] + 1)  # preempted: recomputed, one new token
                computed[rid] = 0
            elif computed[rid] < prompts[rid]:
                tokens.append(min(rng.randint(1, 3), prompts[rid] - computed[rid]))
            else:
                tokens.append(1)
        yield list(batch), tokens, [computed[r] for r in batch], new, set(finished), prompts
        finished = set()
        for rid, count in zip(batch, tokens, strict=True):
            computed[rid] += count


def _replay_schedule(seed):
    capture = _worker()
    capture.client = _RecordingClient()
    runner = SimpleNamespace(requests={})
    buffer = capture.buffers[hook_point_name(1)] = torch.zeros(512, 4)  # max_num_tokens rows
    generator = torch.Generator().manual_seed(seed)
    # As vLLM's InputBatch: one int32 array for the engine's life, rewritten in place each
    # step (the worker reads it through a view it keeps: a stale view would send old positions).
    computed_cpu = np.zeros(16, dtype=np.int32)
    live_ids: list[str] = []  # vLLM's request-id list, likewise one list rewritten in place
    for req_ids, tokens, computed, new, finished, prompts in _random_schedule(seed):
        for rid in req_ids:
            named = {"sm_conversation_id": f"chat-{rid[1]}"} if rid[1] in "13" else None
            runner.requests.setdefault(
                rid,
                SimpleNamespace(
                    sampling_params=SimpleNamespace(extra_args=named),
                    num_prompt_tokens=prompts[rid],
                ),
            )
        buffer.copy_(torch.randn(buffer.shape, generator=generator))  # this step's rows
        computed_cpu[:] = -1  # entries past num_reqs hold stale values in vLLM too
        computed_cpu[: len(computed)] = computed
        live_ids[:] = req_ids
        runner.input_batch = SimpleNamespace(
            num_reqs=len(req_ids), req_ids=live_ids, num_computed_tokens_cpu=computed_cpu
        )
        capture.note_layout(runner, np.array(tokens, dtype=np.int32))
        capture.after_forward(
            runner,
            SimpleNamespace(
                finished_req_ids=finished,
                scheduled_new_reqs=[SimpleNamespace(req_id=r) for r in new],
            ),
        )
    states = {rid: capture.splitter.state(rid) for rid in capture.splitter.tracked()}
    return capture.client, states, capture.steps


@pytest.mark.parametrize("seed", range(25))
def test_the_decode_run_sends_what_the_full_path_sends(seed, monkeypatch):
    """Whatever the schedule (joins, chunks, finishes, preemption, reordering), the decode
    run's shortcut sends the same steps (taggings, rows, positions, values) and keeps the
    same bookkeeping as splitting every step."""
    fast, fast_states, fast_steps = _replay_schedule(seed)
    monkeypatch.setattr(DecodeRun, "matches", lambda *args: False)
    full, full_states, full_steps = _replay_schedule(seed)
    assert full.again == 0 and fast.again > 0  # the shortcut was taken
    assert len(fast.sent) == len(full.sent)
    for got, expected in zip(fast.sent, full.sent, strict=True):
        assert got[:8] == expected[:8]
        assert got[8].keys() == expected[8].keys()
        assert all(torch.equal(got[8][hp], expected[8][hp]) for hp in got[8])
    assert fast_states == full_states
    assert fast_steps == full_steps


def test_a_batch_reordered_in_place_at_equal_positions_leaves_the_decode_run():
    """vLLM rewrites its request-id list in place (swaps, condensing): the decode run must
    compare against its own copy, or a swap of two requests at the same positions would send
    each one's rows under the other's conversation."""
    capture = _worker()
    capture.client = _RecordingClient()
    runner = _runner(a=(2, None), b=(2, None))
    live = ["a", "b"]  # one list for the engine's life, as vLLM's InputBatch keeps
    computed = np.zeros(4, dtype=np.int32)
    for ids, tokens, new in ((["a", "b"], [2, 2], ["a", "b"]), (["a", "b"], [1, 1], [])):
        live[:] = ids
        runner.input_batch = SimpleNamespace(
            num_reqs=2, req_ids=live, num_computed_tokens_cpu=computed
        )
        capture.note_layout(runner, np.array(tokens, dtype=np.int32))
        capture.after_forward(
            runner,
            SimpleNamespace(
                finished_req_ids=set(), scheduled_new_reqs=[SimpleNamespace(req_id=r) for r in new]
            ),
        )
        computed[:2] += tokens
    assert capture._decode is not None  # the decode step started a run
    live.reverse()  # swapped in place; both requests are at position 3
    capture.note_layout(runner, np.array([1, 1], dtype=np.int32))
    capture.after_forward(runner, SimpleNamespace(finished_req_ids=set(), scheduled_new_reqs=[]))
    assert capture.client.sent[-1][0] == ("b", "a")
    assert capture.client.sent[-1][7] == [3, 3]
