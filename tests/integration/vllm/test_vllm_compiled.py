"""vLLM in its default (compiled) mode with the monitor plugin, against a real sidecar: exact
per-conversation token accounting in every batch shape the V1 scheduler forms.

One engine serves the whole module (it takes minutes to start on two cores)."""

from __future__ import annotations

import pytest

from monitor.fixtures import start_sidecar
from tests.conftest import REPO_ROOT
from tests.integration.vllm.harness import (
    BLOCK_WITHIN,
    GUARD_FIRES_AT,
    GUARD_RULE,
    GUARD_TIMEOUT_S,
    ROLE_RULES,
    Engine,
    engine_kwargs,
    greedy,
    monitor_env,
    role_starts,
    seen,
    sidecar_config,
    write_model,
)

# Engine start-up (compilation included) takes minutes on two busy cores.
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vllm-sidecar")
    process = start_sidecar(
        sidecar_config(workdir, GUARD_RULE + ROLE_RULES), workdir, cwd=REPO_ROOT
    )
    yield process
    process.stop()


@pytest.fixture(scope="module")
def engine(sidecar, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vllm-compiled")
    model = write_model(workdir / "tiny-llama")
    env = monitor_env(
        sidecar.target,
        SAFETY_MONITOR_BLOCK_WITHIN=str(BLOCK_WITHIN),
        SAFETY_MONITOR_CONFIG=str(guard_config(workdir)),
    )
    engine = Engine(engine_kwargs(model, eager=False), env, workdir / "engine.log")
    engine.call({"op": "probe_hooks"})
    yield engine
    engine.stop()


def guard_config(workdir) -> object:
    """Settings the environment does not carry: how long a step may wait for the verdict."""
    path = workdir / "monitor.yaml"
    path.write_text(f"guard_timeout: {GUARD_TIMEOUT_S}\n")
    return path


def alerts_after_flush(engine: Engine) -> list[dict]:
    engine.flush()
    return engine.report()["alerts"]


def test_compiled_mode_runs_the_capture_op_where_hooks_do_not_fire(engine):
    before = engine.report()
    results = engine.run([{"id": "compiled-1", "prompt": [5, 6, 7, 8], "params": greedy(6)}])
    after = engine.report()
    assert results["compiled-1"]["outputs"][0]["finish_reason"] == "length"
    # Forward hooks on the decoder layers never ran: the model ran as a compiled graph...
    assert engine.call({"op": "hook_calls"}) == [0]
    # ...and the capture op inside that graph did, once per forward pass (6 passes).
    assert after["op_calls"] - before["op_calls"] == 6
    # The plugin's own time on the runner's thread is counted for each of those passes.
    assert after["plugin_steps"] - before["plugin_steps"] == 6
    assert after["plugin_cpu_ns"] > before["plugin_cpu_ns"]
    assert after["plugin_wall_ns"] > before["plugin_wall_ns"]
    assert seen(alerts_after_flush(engine), "compiled-1") == 4 + 6 - 1


def test_mixed_prefill_decode_and_chunked_prefill(engine):
    # b and c arrive while a decodes; c's 40-token prompt is longer than the 32-token step
    # budget, so it is prefilled in chunks next to the others' decodes.
    results = engine.run(
        [
            {"id": "mix-a", "prompt": list(range(10, 20)), "params": greedy(20)},
            {"id": "mix-b", "prompt": list(range(30, 42)), "params": greedy(15), "start_step": 3},
            {"id": "mix-c", "prompt": list(range(50, 90)), "params": greedy(10), "start_step": 6},
        ]
    )
    assert {rid: len(r["outputs"][0]["token_ids"]) for rid, r in results.items()} == {
        "mix-a": 20,
        "mix-b": 15,
        "mix-c": 10,
    }
    alerts = alerts_after_flush(engine)
    assert seen(alerts, "mix-a") == 10 + 20 - 1
    assert seen(alerts, "mix-b") == 12 + 15 - 1
    assert seen(alerts, "mix-c") == 40 + 10 - 1
    # The prompt's rows (c's in chunks) came as `user`, the generated ones as `assistant`.
    for conversation, prompt in (("mix-a", 10), ("mix-b", 12), ("mix-c", 40)):
        assert role_starts(alerts, conversation) == {"user": [0], "assistant": [prompt]}
    assert engine.report()["batches_rejected"] == 0


def test_n_greater_than_one_sends_each_sequence(engine):
    params = {"n": 3, "max_tokens": 8, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    results = engine.run([{"id": "fan", "prompt": [3, 4, 5, 6], "params": params}])
    assert len(results["fan"]["outputs"]) == 3
    alerts = alerts_after_flush(engine)
    assert [seen(alerts, f"fan/{j}") for j in range(3)] == [4 + 8 - 1] * 3
    for j in range(3):
        assert role_starts(alerts, f"fan/{j}") == {"user": [0], "assistant": [4]}
    assert seen(alerts, "fan") == 0


def test_preemption_does_not_send_recomputed_tokens_twice(engine):
    before = engine.report()["skipped_rows"]
    requests = [
        {"id": f"pre-{i}", "prompt": [100 + i] * 30, "params": greedy(60)} for i in range(4)
    ]
    results = engine.run(requests, timeout=600)
    assert all(len(r["outputs"][0]["token_ids"]) == 60 for r in results.values())
    # The KV cache holds 320 tokens and the four requests need 360: some were preempted and
    # recomputed, and the recomputed rows were not sent again.
    assert engine.report()["skipped_rows"] > before
    alerts = alerts_after_flush(engine)
    for i in range(4):
        assert seen(alerts, f"pre-{i}") == 30 + 60 - 1
        assert role_starts(alerts, f"pre-{i}") == {"user": [0], "assistant": [30]}


def test_prefix_cache_hits_keep_true_positions(engine):
    shared = list(range(200, 232))  # one full 32-token block
    engine.run([{"id": "pc-a", "prompt": [*shared, 7, 7, 7, 7], "params": greedy(4)}])
    results = engine.run([{"id": "pc-b", "prompt": [*shared, 9, 9, 9, 9], "params": greedy(4)}])
    # pc-b's first 32 tokens came from the cache: the engine did not compute them, so the
    # monitor did not see them; what it saw starts at their true position, 32.
    assert results["pc-b"]["num_cached_tokens"] == 32
    alerts = alerts_after_flush(engine)
    assert seen(alerts, "pc-a") == 36 + 4 - 1
    assert seen(alerts, "pc-b", start=32) == 4 + 4 - 1
    # The uncached rest of the prompt is still the prompt's.
    assert role_starts(alerts, "pc-b") == {"user": [32], "assistant": [36]}


def test_client_abort_stops_the_stream_of_tokens(engine):
    results = engine.run(
        [
            {"id": "abort-me", "prompt": [11, 12, 13], "params": greedy(50), "abort_after": 5},
            {"id": "abort-neighbour", "prompt": [14, 15, 16], "params": greedy(12)},
        ]
    )
    assert results["abort-me"]["aborted_by_client"]
    produced = len(results["abort-me"]["outputs"][0]["token_ids"])
    alerts = alerts_after_flush(engine)
    # The engine core runs ahead of the client that aborts: the steps it computed before the
    # abort reached it were sent (once, in order, checked by `seen`), and then nothing more.
    computed = seen(alerts, "abort-me")
    assert 3 + produced - 1 <= computed <= 3 + produced - 1 + 10, (produced, computed)
    assert seen(alerts, "abort-neighbour") == 3 + 12 - 1
    # Finished and aborted requests are forgotten: the worker learns that a request ended
    # from the next step's scheduler output, so at most this run's last two are still held.
    assert engine.report()["tracked_requests"] <= 2


def test_conversation_naming_through_extra_args(engine):
    extra = {
        "sm_conversation_id": "support-42",
        "sm_prompt_role": "system",
        "sm_role": "assistant",
        "sm_attributes": {"tenant": "acme"},
    }
    engine.run([{"id": "named", "prompt": [21, 22, 23], "params": greedy(5, extra_args=extra)}])
    alerts = alerts_after_flush(engine)
    assert seen(alerts, "support-42") == 3 + 5 - 1
    assert role_starts(alerts, "support-42") == {"system": [0], "assistant": [3]}
    # The request id on the wire is vLLM's internal one: the id given plus its random suffix.
    (request_id,) = {a["request_id"] for a in alerts if a["conversation_id"] == "support-42"}
    assert request_id.startswith("named-") and len(request_id) == len("named-") + 8
    assert seen(alerts, "named") == 0


def test_block_action_stops_one_request_and_its_neighbour_finishes(engine):
    # The guard rule evaluates only this role: the prompt's and the output's.
    guarded = {"sm_prompt_role": "guarded", "sm_role": "guarded"}
    requests = []
    for i in range(3):
        requests.append(
            {
                "id": f"guard-bad-{i}",
                "prompt": [40 + i] * 4,
                "params": greedy(40, extra_args=guarded),
            }
        )
        requests.append({"id": f"guard-ok-{i}", "prompt": [60 + i] * 4, "params": greedy(40)})
    results = engine.run(requests)
    alerts = alerts_after_flush(engine)
    for i in range(3):
        bad = results[f"guard-bad-{i}"]["outputs"][0]
        ok = results[f"guard-ok-{i}"]["outputs"][0]
        assert (ok["finish_reason"], len(ok["token_ids"])) == ("length", 40)
        assert bad["finish_reason"] == "abort"
        assert bad["stop_reason"] == "safety-monitor: guard-stop"
        # The rule fires at position 11 (for: 12); the forward pass that computed position 11
        # sampled output token 8, so 9 outputs existed then. What came after is the bound.
        after_firing = len(bad["token_ids"]) - (GUARD_FIRES_AT - 4 + 2)
        assert 0 <= after_firing <= BLOCK_WITHIN, after_firing
        print(f"guard-bad-{i}: {after_firing} tokens after the firing step")
        # Every token the engine computed for the stopped request was still sent.
        assert seen(alerts, f"guard-bad-{i}") == 4 + len(bad["token_ids"]) - 1
    # No step was released without the sidecar's verdict (no fail-open timeout), so the bound
    # held by construction, not by luck.
    assert engine.report()["guard_timeouts"] == 0
    firing = [a for a in alerts if a["rule"] == "guard-stop"]
    assert {a["conversation_id"] for a in firing} == {f"guard-bad-{j}" for j in range(3)}
    assert all(a["position"] == GUARD_FIRES_AT and "block" in a["actions"] for a in firing)


def test_block_stops_only_the_request_whose_token_fired(engine):
    # Conversation ids come from the request: an intruder who names another user's
    # conversation and trips a block rule gets its own request stopped, not the victim's.
    shared = {"sm_conversation_id": "victim-conversation"}
    # intruder-stop fires at its first token (a prompt token: the prompt's role is its too)
    intruder = {**shared, "sm_prompt_role": "intruder", "sm_role": "intruder"}
    results = engine.run(
        [
            {"id": "victim", "prompt": [80] * 4, "params": greedy(30, extra_args=shared)},
            {
                "id": "intruder",
                "prompt": [81] * 4,
                "params": greedy(30, extra_args=intruder),
                "start_step": 3,  # the victim is decoding by then
            },
        ]
    )
    victim, stopped = results["victim"]["outputs"][0], results["intruder"]["outputs"][0]
    assert (victim["finish_reason"], len(victim["token_ids"])) == ("length", 30)
    assert (stopped["finish_reason"], stopped["stop_reason"]) == (
        "abort",
        "safety-monitor: intruder-stop",
    )
    # The prefill that computed the firing token sampled the one output token it has.
    assert len(stopped["token_ids"]) == 1 + BLOCK_WITHIN
    alerts = alerts_after_flush(engine)
    firing = [a for a in alerts if a["rule"] == "intruder-stop"]
    assert firing and {a["conversation_id"] for a in firing} == {"victim-conversation"}
    assert all(a["request_id"].startswith("intruder-") for a in firing), firing
    assert engine.report()["guard_timeouts"] == 0


def test_a_conversation_ends_with_the_last_request_running_it(engine):
    # Two requests given one id (so one conversation, named after it, ended when its
    # request finishes): the first to finish must not end it under the other.
    engine.run(
        [
            {"id": "twin-short", "request_id": "twin", "prompt": [90] * 4, "params": greedy(3)},
            {"id": "twin-marker", "prompt": [93] * 4, "params": greedy(10)},
            {"id": "twin-long", "request_id": "twin", "prompt": [91] * 4, "params": greedy(20)},
        ]
    )
    # The worker learns that a request finished from the next step it runs.
    engine.run([{"id": "after-twins", "prompt": [92] * 3, "params": greedy(2)}])
    engine.flush()
    report = engine.report()
    ends = report["recent_ends"]
    # One end for "twin", after twin-marker's: when twin-long finished, not twin-short.
    assert ends.count("twin") == 1 and ends.index("twin-marker") < ends.index("twin"), ends
    assert report["batches_rejected"] == 0


def test_outputs_identical_with_and_without_the_monitor(engine, tmp_path):
    requests = [
        {"id": "same-a", "prompt": list(range(10, 20)), "params": greedy(12)},
        {"id": "same-b", "prompt": list(range(50, 90)), "params": greedy(8), "start_step": 2},
    ]
    monitored = engine.run(requests)
    plain = Engine(
        engine_kwargs(write_model(tmp_path / "tiny-llama"), eager=False), {}, tmp_path / "log"
    )
    try:
        assert plain.report()["attached"] is False
        unmonitored = plain.run(requests)
    finally:
        plain.stop()
    for rid in ("same-a", "same-b"):
        assert monitored[rid]["outputs"] == unmonitored[rid]["outputs"]


def test_sidecar_down_fails_open(engine, sidecar):
    requests = [{"id": "down-ref", "prompt": list(range(10, 20)), "params": greedy(12)}]
    reference = engine.run(requests)
    engine.flush()
    before = engine.report()
    sidecar.stop()
    requests[0]["id"] = "down"
    results = engine.run(requests)
    # Generation is unaffected...
    assert results["down"]["outputs"] == reference["down-ref"]["outputs"]
    engine.flush()
    after = engine.report()
    # ...and every step captured while the sidecar was gone is counted as dropped.
    captured = after["steps_captured"] - before["steps_captured"]
    dropped = sum(after["dropped"].values()) - sum(before["dropped"].values())
    acked = after["batches_acked"] - before["batches_acked"]
    assert captured > 0 and acked == 0 and dropped == captured, (before, after)
