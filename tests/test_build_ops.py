"""DeepSpeed's CPU op is built once per environment (facediff/__init__.py, tools/build_ops.py)."""

import os
import subprocess
import sys


def test_importing_facediff_points_torch_extensions_at_this_environment():
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    code = "import os, facediff; print(os.environ['TORCH_EXTENSIONS_DIR'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == os.path.join(sys.prefix, "torch_extensions")
    # a cache the user chose is kept
    env["TORCH_EXTENSIONS_DIR"] = "/somewhere/else"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "/somewhere/else"
