"""vLLM with `enforce_eager=True` and the monitor plugin: the same capture op runs (there
forward hooks fire too, which the compiled-mode test shows they do not), with the same exact
accounting."""

from __future__ import annotations

import re
import urllib.request

import pytest

from monitor.fixtures import free_port, start_sidecar
from tests.conftest import REPO_ROOT
from tests.integration.vllm.harness import (
    GUARD_RULE,
    ROLE_RULES,
    Engine,
    engine_kwargs,
    greedy,
    role_starts,
    seen,
    sidecar_config,
    write_model,
)

# Engine start-up (compilation included) takes minutes on two busy cores.
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vllm-eager-sidecar")
    process = start_sidecar(
        sidecar_config(workdir, GUARD_RULE + ROLE_RULES), workdir, cwd=REPO_ROOT
    )
    yield process
    process.stop()


def named(alerts: list[dict], request_id: str) -> str:
    """With the operator's switch, a conversation is named by vLLM's internal request id: the
    client's id plus the random suffix vLLM adds (one conversation per request)."""
    pattern = re.compile(rf"{re.escape(request_id)}-[0-9a-f]{{8}}")
    names = {a["conversation_id"] for a in alerts if pattern.fullmatch(a["conversation_id"])}
    assert len(names) == 1, (request_id, names)
    return names.pop()


@pytest.fixture(scope="module")
def engine(sidecar, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vllm-eager")
    model = write_model(workdir / "tiny-llama")
    # Configured by a YAML file this time, with the worker's metrics served on a port, and
    # conversation ids from requests ignored (the operator's switch).
    metrics_port = free_port()
    config = workdir / "monitor.yaml"
    config.write_text(
        f"target: {sidecar.target}\nlayers: [1]\nmodel_name: tiny\n"
        f"metrics_port: {metrics_port}\nblock_within: 1\nguard_timeout: 30\n"
        "ignore_request_conversation_ids: true\n"
    )
    engine = Engine(
        engine_kwargs(model, eager=True),
        {"SAFETY_MONITOR_CONFIG": str(config)},
        workdir / "engine.log",
    )
    engine.metrics_port = metrics_port
    engine.call({"op": "probe_hooks"})
    yield engine
    engine.stop()


def test_eager_mode_accounting_in_mixed_batches_with_preemption(engine):
    before = engine.report()
    hooks_before = engine.call({"op": "hook_calls"})[0]
    requests = [
        {"id": f"eager-{i}", "prompt": [70 + i] * (30 + 5 * i), "params": greedy(50)}
        for i in range(4)
    ]
    requests[3]["start_step"] = 5  # arrives while the others decode; prefilled in chunks
    results = engine.run(requests, timeout=600)
    assert all(len(r["outputs"][0]["token_ids"]) == 50 for r in results.values())
    engine.flush()
    after = engine.report()
    # Hooks fire in eager mode (both layers, every forward), and so does the capture op.
    # (This test's calls only: the bench switch test's paused run fires hooks, not the op.)
    hook_calls = engine.call({"op": "hook_calls"})[0] - hooks_before
    op_calls = after["op_calls"] - before["op_calls"]
    assert op_calls > 0 and hook_calls == 2 * op_calls
    assert after["skipped_rows"] > before["skipped_rows"]  # preempted and recomputed
    for i in range(4):
        conversation = named(after["alerts"], f"eager-{i}")
        assert seen(after["alerts"], conversation) == 30 + 5 * i + 50 - 1
        # Prompt rows (chunked, some recomputed after preemption) arrived as `user`, the
        # generated ones as `assistant`, the role changing exactly at the prompt's length.
        assert role_starts(after["alerts"], conversation) == {
            "user": [0],
            "assistant": [30 + 5 * i],
        }
    print(f"slices split at a prompt's end: {after['straddles']}")
    assert after["batches_rejected"] == 0


def test_eager_mode_block(engine):
    guarded = {"sm_prompt_role": "guarded", "sm_role": "guarded"}  # prompt and output
    results = engine.run(
        [
            {"id": "eager-bad", "prompt": [5] * 4, "params": greedy(40, extra_args=guarded)},
            {"id": "eager-ok", "prompt": [6] * 4, "params": greedy(40)},
        ]
    )
    bad = results["eager-bad"]["outputs"][0]
    assert bad["finish_reason"] == "abort"
    assert results["eager-ok"]["outputs"][0]["finish_reason"] == "length"
    # block_within: 1 -> at most one token past the step that sampled after position 11.
    assert len(bad["token_ids"]) - (11 - 4 + 2) <= 1
    assert engine.report()["guard_timeouts"] == 0


def test_worker_metrics_are_served(engine):
    url = f"http://127.0.0.1:{engine.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    steps = [line for line in text.splitlines() if line.startswith("safety_monitor_capture_steps")]
    assert steps and float(steps[0].split()[-1]) > 0, steps


def test_request_conversation_ids_ignored_when_the_operator_says_so(engine):
    # Two requests name one conversation; with the switch each is its own conversation,
    # named after its request id, and each is ended when its request finishes.
    shared = {"sm_conversation_id": "someone-elses"}
    results = engine.run(
        [
            {"id": "own-1", "prompt": [7] * 3, "params": greedy(4, extra_args=shared)},
            {"id": "own-2", "prompt": [8] * 3, "params": greedy(6, extra_args=shared)},
        ]
    )
    assert all(r["outputs"][0]["finish_reason"] == "length" for r in results.values())
    engine.run([{"id": "own-after", "prompt": [9] * 3, "params": greedy(1)}])  # see the ends
    engine.flush()
    report = engine.report()
    own_1, own_2 = (named(report["alerts"], r) for r in ("own-1", "own-2"))
    assert seen(report["alerts"], own_1) == 3 + 4 - 1
    assert seen(report["alerts"], own_2) == 3 + 6 - 1
    assert seen(report["alerts"], "someone-elses") == 0
    assert {own_1, own_2} <= set(report["recent_ends"])
    # Not the client's own request id either: a client could give a victim's one.
    assert seen(report["alerts"], "own-1") == 0


def test_bench_switch_turns_the_monitor_off_and_back_on_in_one_engine(engine):
    """`bench overhead --engine vllm --same-engine` compares one engine with and without the
    monitor: while switched off, the capture op does not run and nothing is captured; switched
    back on, both resume, no request stays tracked and the request run just before the switch
    has had its conversation ended once, so tests after this one see the usual state, whatever
    their order. (vLLM reports an end in the step after the request's last one, usually an
    empty step right away; when that step comes while the monitor is off, the request is
    finished when it comes back on: unit-tested, as the timing is vLLM's.)"""
    engine.run([{"id": "before-off", "prompt": [90] * 12, "params": greedy(6)}])
    engine.flush()
    before = engine.report()
    assert engine.call({"op": "monitor", "on": False}) == [False]
    off = engine.run([{"id": "switched-off", "prompt": [91] * 12, "params": greedy(6)}])
    assert len(off["switched-off"]["outputs"][0]["token_ids"]) == 6
    paused = engine.report()  # the runner has no capture while off
    assert paused["attached"] is False
    assert paused["op_calls"] == before["op_calls"]
    assert engine.call({"op": "monitor", "on": True}) == [True]
    resumed = engine.report()
    # Nothing captured while off; an end message is sent on switching back on only for a
    # request whose end came while off.
    ends_sent = resumed["conversations_ended"] - before["conversations_ended"]
    assert resumed["steps_captured"] - before["steps_captured"] == ends_sent
    assert resumed["tracked_requests"] == 0
    assert [c for c in resumed["recent_ends"] if c.startswith("before-off-")] == [
        named(resumed["alerts"], "before-off")
    ]
    engine.run([{"id": "switched-on", "prompt": [92] * 12, "params": greedy(6)}])
    engine.flush()
    after = engine.report()
    assert after["op_calls"] >= before["op_calls"] + 6  # one captured layer, every forward
    assert after["steps_captured"] >= before["steps_captured"] + 6
    assert after["dropped"] == before["dropped"]


def test_bench_linger_switch_reports_the_client_in_use_and_refuses_a_guarded_linger(engine):
    """`bench overhead --engine vllm --linger-ms 0,20` switches the sidecar-up engine's
    capture client between runs (`linger` op): with no value it switches nothing and reports
    the client in use (its relay's pid, its counters, which a run moves on); a linger this
    engine's plugin would not use (block_within is set: a waiting guard never lingers) is
    refused, and the client in use stays."""
    engine.flush()  # whatever earlier tests sent is settled before the counters are read
    first = engine.call({"op": "linger", "ms": None})[0]
    assert first["linger_ms"] == 0.0 and first["relay_pid"] > 0
    assert engine.call({"op": "linger", "ms": 20}) == [
        {"refused": "linger 20 ms with block_within set"}
    ]
    assert engine.call({"op": "linger", "ms": 0})[0]["relay_pid"] == first["relay_pid"]
    engine.run([{"id": "linger-switch", "prompt": [93] * 12, "params": greedy(6)}])
    engine.flush()
    after = engine.call({"op": "linger", "ms": None})[0]
    assert after["steps_captured"] >= first["steps_captured"] + 6
    assert after["plugin_steps"] >= first["plugin_steps"] + 6
    # Flushed: every step sent through it since is acknowledged.
    sent = after["steps_captured"] - first["steps_captured"]
    assert after["batches_acked"] - first["batches_acked"] == sent
    assert after["dropped"] == first["dropped"]
