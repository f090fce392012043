#!/usr/bin/env bash
# `make gpu-check [GPU_CHECK_ARGS=--cpu]`: run tools/gpu_check/run.py with a Python that can import the stack.
#   - in the project's uv environment (.venv + uv): `uv run --frozen python`;
#   - else (the GPU machine: python3 with torch, no uv): that python3 ($GPU_CHECK_PYTHON overrides), and when
#     ray/deepspeed/diffusers/pydantic/facenet_pytorch/open_clip are missing, the wheels of `make gpu-wheels` (.gpu-wheels/,
#     carried along) installed with --target into .gpu-site/ and put on PYTHONPATH with the repo root.
# Without a CUDA GPU (and without --cpu) it says so in one line and exits 2.
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
args=("$@")
cpu=0
for a in "${args[@]}"; do [ "$a" = "--cpu" ] && cpu=1; done

if [ -z "${GPU_CHECK_PYTHON:-}" ] && [ -d .venv ] && command -v uv >/dev/null 2>&1; then
    py=(uv run --frozen python)
else
    py=("${GPU_CHECK_PYTHON:-python3}")
    need='import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("ray", "deepspeed", "diffusers", "pydantic", "facenet_pytorch", "open_clip")))'
    if ! "${py[@]}" -c "$need" 2>/dev/null; then
        if ! ls .gpu-wheels/*.whl >/dev/null 2>&1; then
            echo "gpu-check: ${py[0]} lacks ray/deepspeed/diffusers/pydantic/facenet_pytorch/open_clip and there is no .gpu-wheels/ (run 'make gpu-wheels' where PyPI is reachable, and carry .gpu-wheels)" >&2
            exit 2
        fi
        stamp=$(cd .gpu-wheels && ls -l --time-style=+%s *.whl | md5sum | cut -c1-32)
        if [ "$(cat .gpu-site/.stamp 2>/dev/null)" != "$stamp" ]; then
            rm -rf .gpu-site
            echo "gpu-check: installing $(ls .gpu-wheels/*.whl | wc -l) wheels from .gpu-wheels into .gpu-site" >&2
            "${py[@]}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
                --target .gpu-site .gpu-wheels/*.whl || { echo "gpu-check: installing .gpu-wheels failed" >&2; exit 2; }
            echo "$stamp" > .gpu-site/.stamp
        fi
        export PYTHONPATH="$root/.gpu-site:$root${PYTHONPATH:+:$PYTHONPATH}"
        if ! "${py[@]}" -c "$need"; then
            echo "gpu-check: still cannot find the stack after installing .gpu-wheels into .gpu-site" >&2
            exit 2
        fi
    else
        export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi

if [ "$cpu" = 0 ] && ! "${py[@]}" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    echo "gpu-check: no CUDA GPU visible to torch here; 'make gpu-check GPU_CHECK_ARGS=--cpu' runs the CPU mode"
    exit 2
fi
exec "${py[@]}" tools/gpu_check/run.py "${args[@]}"
