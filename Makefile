# Two commands on a fresh Linux machine:  `make demo`  and  `make test`.
# Both create the virtual environment (.venv) on first use from requirements.lock, the pinned set of
# versions that CI and the GPU wheelhouse use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=

export RAY_USAGE_STATS_ENABLED = 0
export PYTHONUNBUFFERED = 1

.PHONY: demo test env bench-cpu clean-env

env: $(STAMP)

# DeepSpeed ships only as an sdist whose build imports torch, so it is built against the torch
# already in the environment (--no-build-isolation) instead of pulling a second torch into a build env.
$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24" "setuptools>=68" wheel
	grep -v '^deepspeed==' requirements.lock > $(VENV)/requirements-no-deepspeed.txt
	$(PY) -m pip install -q -r $(VENV)/requirements-no-deepspeed.txt
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation $$(grep '^deepspeed==' requirements.lock)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import consistent_avatar, torch, ray, diffusers, transformers, deepspeed, decord, lpips; print('environment ready:', '$(VENV)')"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cavatar demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench-cpu: $(STAMP)
	$(PY) benchmarks/bench_synth.py
	$(PY) benchmarks/bench_prepare.py

clean-env:
	rm -rf $(VENV)
