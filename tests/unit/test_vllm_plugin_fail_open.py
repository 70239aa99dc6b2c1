"""The plugin's wrappers around vLLM's model runner never raise into the engine: a capture
bug in any of the three per-step calls leaves the engine's own results untouched and is
counted as a dropped step (no vLLM needed: the wrappers patch whatever runner class they are
given)."""

from __future__ import annotations

from types import SimpleNamespace

from monitor.capture.vllm import plugin


class _Client:
    def __init__(self):
        self.drops = []

    def count_drop(self, reason):
        self.drops.append(reason)


class _BrokenCapture:
    """Every capture call fails; the guard's path is taken (a block could be pending)."""

    is_output_rank = True
    nothing_to_hand_back = False
    has_layout = True

    def __init__(self):
        self.client = _Client()
        self.timing = SimpleNamespace(add=lambda *args, **kwargs: None)

    def note_layout(self, runner, num_scheduled_tokens):
        raise RuntimeError("layout bug")

    def after_forward(self, runner, scheduler_output):
        raise RuntimeError("capture bug")

    def take_blocks(self):
        raise RuntimeError("guard bug")


def test_a_failing_capture_never_reaches_the_engine():
    class Runner:
        def load_model(self):
            return None

        def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
            return "prepared"

        def execute_model(self, scheduler_output):
            return "executed"

        def sample_tokens(self):
            return "sampled"

    plugin._patch_runner(SimpleNamespace(GPUModelRunner=Runner))
    runner = Runner()
    runner._safety_monitor = capture = _BrokenCapture()
    assert runner._prepare_inputs(None, [1]) == "prepared"
    assert runner.execute_model(None) == "executed"
    assert runner.sample_tokens() == "sampled"  # fail-open: the output goes unchanged
    assert capture.client.drops == ["hook_error", "hook_error"]
