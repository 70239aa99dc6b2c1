"""vLLM tests need the vLLM venv (`make test-vllm`, part of `make test`); in any other
environment they are reported as skipped with that reason, never run half-way."""

from __future__ import annotations

import importlib.util

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(reason="needs vLLM: run `make test-vllm` (its own venv)")
    for item in items:
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(skip)
