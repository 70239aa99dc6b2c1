"""`bench overhead --engine vllm --same-engine --pairs N [--control] [--decompose]`: the kinds of
run per pair and their order, each kind's loss against the paused runs (paired per pair), the
table's lines, the command line's refusals, `--hidden`'s model config, and the orchestration
of one engine's runs against a stand-in engine whose "relay" is a real process (it must be
stopped during the relay-stopped runs only). The real engine runs in the bench."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from monitor.bench.vllm_overhead import (
    HIDDEN,
    PAIR_CONTROL,
    PAIR_PAUSED,
    PAIR_RELAY_STOPPED,
    PAIR_UP,
    TINY_LLAMA,
    PairSettings,
    bench_model_config,
    format_vllm_table,
    pair_kinds,
    pairs_result,
    run_vllm_overhead_bench,
    same_engine_pairs,
)


def test_each_pair_runs_up_and_paused_then_the_control_and_the_decomposition():
    assert pair_kinds(PairSettings(10, 16)) == (PAIR_UP, PAIR_PAUSED)
    assert pair_kinds(PairSettings(10, 16, control=True)) == (PAIR_UP, PAIR_PAUSED, PAIR_CONTROL)
    assert pair_kinds(PairSettings(10, 16, control=True, decompose=True)) == (
        PAIR_UP,
        PAIR_PAUSED,
        PAIR_CONTROL,
        PAIR_RELAY_STOPPED,
    )


def _runs(rates: list[float], tokens: int = 64) -> list[tuple[int, float]]:
    return [(tokens, tokens / rate) for rate in rates]


def test_each_kind_is_paired_with_the_paused_run_of_its_pair():
    # The machine's speed moves by 20% from pair to pair; within each pair "up" is exactly 5%
    # slower than "paused" in tokens/s, the relay-stopped run 2%, the A/A run as fast.
    speeds = [1000.0, 800.0, 1200.0, 900.0, 1100.0]
    itl = {
        PAIR_PAUSED: [1000 / s for s in speeds],
        PAIR_UP: [1000 / s / 0.96 for s in speeds],  # the median decode step 4% slower
        PAIR_CONTROL: [1000 / s for s in speeds],
        PAIR_RELAY_STOPPED: [1000 / s / 0.99 for s in speeds],
    }
    runs = {
        PAIR_UP: _runs([0.95 * s for s in speeds]),
        PAIR_PAUSED: _runs(speeds),
        PAIR_CONTROL: _runs(speeds),
        PAIR_RELAY_STOPPED: _runs([0.98 * s for s in speeds]),
    }
    result = pairs_result(runs, itl, 16, 12.34)
    assert result["pairs"] == 5 and result["new_tokens"] == 16 and result["seconds"] == 12.3
    assert result["loss_pct_median"] == pytest.approx(5.0)
    # Also over each two mirrored pairs (the fifth, unpaired, left out): still 5%.
    assert result["loss_pct_pairs_median"] == pytest.approx(5.0)
    assert result["relay_stopped_loss_pct_pairs_median"] == pytest.approx(2.0)
    # Paired per pair: the 20% spread between pairs leaves the interval at the one value.
    assert result["loss_pct_ci_low"] == pytest.approx(5.0)
    assert result["loss_pct_ci_high"] == pytest.approx(5.0)
    assert result["step_loss_pct_median"] == pytest.approx(4.0)
    assert result["relay_stopped_loss_pct_median"] == pytest.approx(2.0)
    assert result["relay_stopped_step_loss_pct_median"] == pytest.approx(1.0)
    assert result["control_loss_pct_median"] == pytest.approx(0.0)
    assert result["control_step_loss_pct_median"] == pytest.approx(0.0)
    assert result["tokens_per_s_paused"] == pytest.approx(1000.0)
    assert result["itl_ms_up"] == pytest.approx(1000 / 1000 / 0.96)
    # Every run's numbers stay in the JSON, in run order.
    assert result["per_pair"]["up_tokens_per_s"] == pytest.approx([0.95 * s for s in speeds])
    assert result["per_pair"]["paused-again_itl_ms"] == pytest.approx(itl[PAIR_CONTROL])


def test_without_the_extra_kinds_only_up_against_paused_is_reported():
    result = pairs_result(
        {PAIR_UP: _runs([90.0, 95.0]), PAIR_PAUSED: _runs([100.0, 100.0])},
        {PAIR_UP: [1.1, 1.0], PAIR_PAUSED: [1.0, 1.0]},
        16,
        1.0,
    )
    assert result["loss_pct_median"] == pytest.approx(7.5)
    assert not any(key.startswith(("control_", "relay_stopped_")) for key in result)


def test_the_table_shows_the_pairs_the_decomposition_and_the_a_a():
    from tests.unit.test_vllm_bench_plugin_time import _result, _row

    speeds = [1000.0, 1000.0, 1000.0]
    pairs = pairs_result(
        {
            PAIR_UP: _runs([940.0, 950.0, 960.0]),
            PAIR_PAUSED: _runs(speeds),
            PAIR_CONTROL: _runs([990.0, 1000.0, 1010.0]),
            PAIR_RELAY_STOPPED: _runs([980.0, 990.0, 1000.0]),
        },
        {
            PAIR_UP: [5.2, 5.25, 5.3],
            PAIR_PAUSED: [5.0, 5.0, 5.0],
            PAIR_CONTROL: [5.0, 5.0, 5.0],
            PAIR_RELAY_STOPPED: [5.05, 5.05, 5.05],
        },
        16,
        42.0,
    )
    result = _result(
        {
            "compiled": {
                "off": _row(),
                "sidecar-up": _row(same_engine_pairs=pairs),
                "up-paused": _row(),
            }
        }
    )
    text = format_vllm_table(result)
    assert (
        "compiled: same engine, 3 short pairs (16 new tokens per request, 42 s), sidecar-up "
        "against up-paused: loss 5.00% (95% CI 4.00 to 6.00)"
    ) in text
    assert "ITL 5.00 -> 5.25 ms" in text
    assert (
        "compiled: same engine, short pairs, the capture relay stopped during the run (the "
        "plugin alone) against up-paused: loss 1.00% (95% CI 0.00 to 2.00); median decode "
        "step 0.99% (95% CI 0.99 to 0.99)"
    ) in text
    assert "A/A: up-paused again against up-paused: loss 0.00% (95% CI -1.00 to 1.00)" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--engine", "vllm", "--pairs", "10"], "--pairs needs --same-engine"),
        (["--pairs", "10"], "are for --engine vllm"),
        (["--engine", "vllm", "--same-engine", "--decompose"], "are for --pairs: give --pairs N"),
        (["--engine", "vllm", "--pair-tokens", "8"], "are for --pairs: give --pairs N"),
        (["--engine", "vllm", "--hidden", "0"], "--hidden: a multiple of 128 from 128 up, got 0"),
        (["--engine", "vllm", "--same-engine", "--pairs", "-1"], "--pairs: 0 or more"),
        (["--engine", "vllm", "--same-engine", "--pairs", "5", "--pair-tokens", "2"], "4 or more"),
        (
            ["--engine", "vllm", "--hidden", "200"],
            "--hidden: a multiple of 128 from 128 up, got 200",
        ),
    ],
)
def test_the_command_line_refuses_what_cannot_run(capsys, args, message):
    from monitor.cli import main

    assert main(["bench", "overhead", *args]) == 2
    assert message in capsys.readouterr().err


def test_the_bench_refuses_pairs_it_cannot_run_before_starting_anything():
    with pytest.raises(ValueError, match="same_engine"):
        run_vllm_overhead_bench(pairs=10)
    with pytest.raises(ValueError, match="decompose"):
        run_vllm_overhead_bench(same_engine=True, decompose=True)
    with pytest.raises(ValueError, match="pair_tokens"):
        run_vllm_overhead_bench(same_engine=True, pairs=5, pair_tokens=1)
    with pytest.raises(ValueError, match="hidden"):
        run_vllm_overhead_bench(hidden=100)


def test_the_default_width_is_the_model_the_bench_always_had():
    # The same config.json: vLLM's compile cache of the default model stays valid.
    assert bench_model_config() == TINY_LLAMA
    assert bench_model_config(HIDDEN) == TINY_LLAMA
    wide = bench_model_config(1024)
    assert wide["hidden_size"] == 1024 and wide["intermediate_size"] == 2816
    assert wide["num_attention_heads"] * wide["head_dim"] == 1024
    assert wide["num_key_value_heads"] == 8
    assert {k: v for k, v in wide.items() if "size" not in k and "heads" not in k} == {
        k: v for k, v in TINY_LLAMA.items() if "size" not in k and "heads" not in k
    }


class _StandInEngine:
    """What `same_engine_pairs` uses of the bench's `_Engine` (`call`, `pause`, `resume`,
    `paused`, `process.pid`), recording each call; its session holds a real process whose
    command line names the capture relay, so the bench finds it as the bench finds a relay.
    The runs' replies say whether that process was stopped (state T) while the run ran."""

    def __init__(self, tmp_path: Path) -> None:
        script = tmp_path / "relay_stand_in.py"
        script.write_text("import time\ntime.sleep(120)\n")
        # `python script monitor.capture.relay`: the argument is what `_split_pids` looks for.
        self.process = subprocess.Popen(
            [sys.executable, str(script), "monitor.capture.relay"], start_new_session=True
        )
        self.paused = False
        self.calls: list[Any] = []
        self.monitor_on = True
        self.captured = 0  # steps of the monitored runs, as the plugin's report counts them

    def _relay_state(self) -> str:
        stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        return stat[stat.rindex(")") + 2]

    def pause(self) -> None:
        self.paused = True
        self.calls.append("pause")

    def resume(self) -> None:
        self.paused = False
        self.calls.append("resume")

    def call(self, command: dict[str, Any], timeout: float = 600.0) -> Any:
        op = command["op"]
        if op == "monitor":
            self.monitor_on = command["on"]
            self.calls.append(("monitor", command["on"], command.get("keep_op")))
            return [command["on"]]
        if op == "flush":
            self.calls.append("flush")
            return [True]
        if op == "report":
            self.calls.append("report")
            report = {"steps_captured": self.captured, "batches_acked": self.captured}
            return [{**report, "dropped": {"queue_full": 0}}]
        assert op == "run"
        # The run's kind is in its requests' ids (`_renamed(short, "<tag>-pair<i>-<kind>")`).
        kind = command["requests"][0]["id"].split("-pair", 1)[1].split("-", 1)[1]
        tokens = command["requests"][0]["params"]["max_tokens"]
        self.calls.append(("run", kind, self.monitor_on, self._relay_state(), tokens))
        self.captured += (tokens + 1) * self.monitor_on  # a prefill step and the decode steps
        outputs = {r["id"]: {"outputs": [{"token_ids": [0] * tokens}]} for r in command["requests"]}
        return {"results": outputs, "seconds": 0.01, "step_seconds": [0.002] * (tokens + 1)}

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def test_one_engine_runs_each_kind_with_the_plugin_and_relay_as_that_kind_needs(tmp_path):
    engine = _StandInEngine(tmp_path)
    other = _StandInEngine(tmp_path)
    try:
        deadline = time.monotonic() + 10
        while engine._relay_state() not in "SR" and time.monotonic() < deadline:
            time.sleep(0.01)
        batch = [{"id": "r0", "prompt": [1, 2], "params": {"max_tokens": 128}}]
        settings = PairSettings(2, 8, control=True, decompose=True)
        result = same_engine_pairs(
            {"sidecar-up": engine, "off": other}, batch, settings, "pinned", eager=False
        )
        runs = [call for call in engine.calls if call[0] == "run"]
        # Mirrored: the second pair runs the kinds in reverse.
        assert [run[1] for run in runs] == [
            "up",
            "paused",
            "paused-again",
            "up-relay-stopped",
            "up-relay-stopped",
            "paused-again",
            "paused",
            "up",
        ]
        for _, kind, monitor_on, relay_state, tokens in runs:
            assert tokens == 8  # the short runs' own length, not the rounds' 128
            assert monitor_on == (kind in ("up", "up-relay-stopped")), kind
            # Stopped (T) during the relay-stopped runs only, and continued after them.
            assert (relay_state == "T") == (kind == "up-relay-stopped"), (kind, relay_state)
        # Compiled: the paused runs keep the capture op in the graph; the plugin comes back on.
        assert ("monitor", False, True) in engine.calls
        assert engine.monitor_on and engine._relay_state() != "T"
        # Each run's steps settle after it, and after each plugin-off run the ends that
        # turning the plugin back on sends (4 of the 8 runs are off).
        assert engine.calls.count("flush") == len(runs) + 4
        # The other engines were stopped for the pairs and continued after them.
        assert other.calls == ["pause", "resume"] and not other.paused
        assert result["pairs"] == 2 and result["relay_stopped_loss_pct_median"] == 0.0
        # The pairs' own counters: the monitored runs' steps (2 kinds x 2 pairs x 9 steps),
        # read around the pairs, none dropped.
        assert (result["steps_captured"], result["acked"], result["dropped"]) == (36, 36, 0)
        assert result["unflushed"] == 0
        assert engine.calls[0] == "report" and engine.calls[-1] == "report"
    finally:
        engine.stop()
        other.stop()


def test_a_relay_that_does_not_stop_fails_the_bench_instead_of_being_measured_as_stopped():
    from monitor.bench.vllm_overhead import _stop

    # A zombie (exited, not reaped) never reaches state T.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1][0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        with pytest.raises(RuntimeError, match=f"relay {child.pid} did not stop"):
            _stop([child.pid], timeout=0.2)
    finally:
        child.wait()
