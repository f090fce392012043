# Two commands do all set-up on a fresh machine (Python 3.11, 3.12 or 3.13 + access to PyPI):
#   make demo   - the main job, offline, on the embedded synthetic faces
#   make test   - the test suite
PYTHON ?= python3
# uv from PATH, else the one pip installs as a module (the standalone installer's host is not reachable here)
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
PYTEST_ARGS ?=

.PHONY: setup demo test test-pythons bench gpu-wheels gpu-check
setup:
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) sync --frozen --compile-bytecode
	$(UV) run --frozen python tools/build_ops.py

demo: setup
	$(UV) run --frozen facediff demo

test: setup
	$(UV) run --frozen pytest $(PYTEST_ARGS)

# The tests without Ray again under each Python of OTHER_PYTHONS this machine has (uv cannot download one here;
# tools/find_python.sh looks on PATH and in pyenv), each in its own environment .venv-pyX.Y beside .venv. 3.12 is
# Ubuntu 24.04's and the GPU machine's; OTHER_PYTHONS="3.12 3.13" adds 3.13 (~5 min more on 2 cores).
OTHER_PYTHONS ?= 3.12
test-pythons: setup
	@main=$$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	for v in $(OTHER_PYTHONS); do \
	  [ "$$v" != "$$main" ] || { echo "test-pythons: Python $$v is .venv's (make test ran it), skipped"; continue; }; \
	  py=$$(bash tools/find_python.sh $$v) || { echo "test-pythons: no Python $$v on this machine, skipped"; continue; }; \
	  echo "test-pythons: Python $$v ($$py)"; \
	  export UV_PROJECT_ENVIRONMENT=.venv-py$$v; \
	  $(UV) sync --frozen --compile-bytecode --python $$py && \
	  $(UV) run --frozen python tools/build_ops.py && \
	  $(UV) run --frozen pytest -m "not ray and not slow" $(PYTEST_ARGS) || exit 1; \
	done

bench: setup
	$(UV) run --frozen python benchmarks/data_throughput.py

# The GPU check (tools/gpu_check/README.md). gpu-wheels runs where PyPI is reachable: the cp312 wheels the GPU
# machine lacks (ray slimmed, deepspeed built, diffusers, pydantic, ...), pinned to uv.lock, into .gpu-wheels/.
# gpu-check runs on the GPU machine (carry .gpu-wheels) or in the uv environment; GPU_CHECK_ARGS=--cpu: CPU mode.
GPU_CHECK_ARGS ?=
gpu-wheels:
	$(PYTHON) tools/gpu_check/wheels.py

gpu-check:
	@bash tools/gpu_check/gpu_check.sh $(GPU_CHECK_ARGS)
