"""vLLM tests need the vLLM venv (`make test-vllm`, part of `make test`); in any other
environment they are reported as skipped with that reason, never run half-way. In the vLLM
venv the plugin's entry point must be visible, or every engine would run unmonitored: a
stale `safety_monitor.egg-info` in the checkout named by PYTHONPATH (left by an editable
install of an older version) hides the installed one, and the run stops with that said."""

from __future__ import annotations

import importlib.util
from importlib.metadata import entry_points

import pytest

PLUGIN = "monitor.capture.vllm.plugin:register"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    vllm_items = [item for item in items if item.get_closest_marker("vllm") is not None]
    if importlib.util.find_spec("vllm") is not None:
        if vllm_items and not any(
            e.value == PLUGIN for e in entry_points(group="vllm.general_plugins")
        ):
            raise pytest.UsageError(
                f"the vLLM plugin entry point ({PLUGIN}) is not visible: reinstall the project "
                "in this venv, or remove a stale safety_monitor.egg-info from the directory "
                "on PYTHONPATH, which hides the installed one"
            )
        return
    skip = pytest.mark.skip(reason="needs vLLM: run `make test-vllm` (its own venv)")
    for item in vllm_items:
        item.add_marker(skip)
