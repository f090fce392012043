"""facediff: distributed training of face diffusion models on Ray."""

import os
import sys

# DeepSpeed compiles its shared-memory all-reduce op for CPU workers on first use (~30 s on 2 cores) into torch's
# extension cache, which is shared by every environment of the user and keyed by the op's name only: two
# checkouts (two venvs, two include paths) rebuild it in turn. One cache per environment builds it once, at
# `make setup` (tools/build_ops.py). Every facediff process, Ray's workers included, imports this first.
if os.access(sys.prefix, os.W_OK):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
