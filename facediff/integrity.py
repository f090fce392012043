"""Cheap completeness checks of weight files, read before anything is loaded.

A copy cut short (a crash during a checkpoint upload, a full disk during an export) leaves files that look
normal by name; loading them fails deep inside safetensors or diffusers with an error naming no file. These
checks read only the safetensors headers and the folder listing, and say which file is wrong.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file (None when it is): missing, header unreadable, or shorter
    than its header says (a truncated copy)."""
    path = Path(path)
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                return f"{path}: truncated ({size} bytes, its header alone claims {length})"
            header = json.loads(f.read(length))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return f"{path}: not a safetensors file (unreadable header)"
    need = 8 + length + max(ends, default=0)
    if size < need:
        return f"{path}: truncated ({size} of {need} bytes)"
    return None


def folder_problem(folder: Path) -> str | None:
    """The first damaged weight file under `folder` (None when all are complete): every model folder (one holding
    a `config.json`) needs a weights file, and every safetensors file must be whole."""
    folder = Path(folder)
    for config in sorted(folder.rglob("config.json")):
        if not any(p.suffix in WEIGHT_SUFFIXES for p in config.parent.iterdir()):
            return f"{config.parent}: has config.json but no weights file (*.safetensors or *.bin)"
    for path in sorted(folder.rglob("*.safetensors")):
        if problem := safetensors_problem(path):
            return problem
    return None
