# Two commands do all set-up on a fresh machine (Python 3.11 + access to PyPI):
#   make demo   - the main job, offline, on the embedded synthetic faces
#   make test   - the test suite
PYTHON ?= python3
# uv from PATH, else the one pip installs as a module (the standalone installer's host is not reachable here)
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
PYTEST_ARGS ?=

.PHONY: setup demo test bench gpu-wheels gpu-check
setup:
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) sync --frozen --compile-bytecode
	$(UV) run --frozen python tools/build_ops.py

demo: setup
	$(UV) run --frozen facediff demo

test: setup
	$(UV) run --frozen pytest $(PYTEST_ARGS)

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
