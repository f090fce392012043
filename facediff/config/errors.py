"""Validation errors as the user reads them: each line names the key and the source that set it last.

The loader (`load.py`) records, for every key it lays, the source it came from: the innermost config file that
wrote it, or "command line". A pydantic error is located at a key path; a check across keys (`ConflictingKeys`,
raised by a section's validator) names several keys, and each gets its own source beside it. List-shape errors
(a fixed number of values, e.g. `optimizer.betas`) say how many values were expected and how many were given.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from facediff.config.models import MODEL_FAMILIES
from facediff.config.types import ConflictingKeys


def dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def origin_of(loc: tuple, origins: dict[tuple, str], fallback: str | None) -> str | None:
    """The source that set `loc` (or the mapping holding it); `fallback` for a key no layer sets."""
    for n in range(len(loc), 0, -1):
        if loc[:n] in origins:
            return origins[loc[:n]]
    return fallback


def _is_set(raw: dict[str, Any], path: tuple) -> bool:
    node: Any = raw
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def _conflict(error: ConflictingKeys, loc: tuple, origins: dict[tuple, str], top: str, raw: dict) -> str:
    """A check across keys: each key it names gets where it was set beside it (or that it is at its default)."""
    text, prefix = str(error), ""
    for key in error.keys:
        path = loc + key
        where = origin_of(path, origins, top) if _is_set(raw, path) else "its default"
        if not prefix and text.startswith(f"{dotted(path)}:"):  # the message is about this key: `source: key: ...`
            prefix = f"{where}: "
        else:
            text = text.replace(dotted(path), f"{dotted(path)} ({where})", 1)
    return prefix + text


def _user_loc(loc: tuple) -> tuple:
    # the tagged union puts the family name in the path (model.unet.x); the user wrote model.x
    return tuple(p for i, p in enumerate(loc) if not (i == 1 and loc[0] == "model" and p in MODEL_FAMILIES))


def _shape_errors(errors: list[dict]) -> tuple[list[dict], dict[tuple, tuple[int, int]]]:
    """Fixed-length lists given too few values: pydantic reports each missing position (`betas.1: Field
    required`); they become one error per list, with the expected and the given count. Too many values are
    reported on the list itself (`too_long`)."""
    short: dict[tuple, tuple[int, int]] = {}
    rest = []
    for e in errors:
        loc = _user_loc(e["loc"])
        if e["type"] == "missing" and loc and isinstance(loc[-1], int) and isinstance(e.get("input"), list):
            expected, given = short.get(loc[:-1], (0, len(e["input"])))
            short[loc[:-1]] = (max(expected, loc[-1] + 1), given)
        else:
            rest.append(e)
    return rest, short


def _message(e: dict) -> str:
    if e["type"] == "extra_forbidden":
        return "unknown key"
    if e["type"] == "too_long" and (ctx := e.get("ctx") or {}).get("field_type") == "Tuple":
        return f"expected {ctx['max_length']} values, got {ctx['actual_length']}"
    return e["msg"]


def format_errors(err: ValidationError, origins: dict[tuple, str], top: str, raw: dict) -> str:
    """One line per error, each naming the source of its key(s); `top` stands for a key no layer sets."""
    errors, short = _shape_errors(err.errors())
    lines = [f"{origin_of(loc, origins, top)}: {dotted(loc)}: expected {expected} values, got {given}"
             for loc, (expected, given) in short.items()]
    for e in errors:
        loc = _user_loc(e["loc"])
        if isinstance(conflict := (e.get("ctx") or {}).get("error"), ConflictingKeys):
            lines.append(_conflict(conflict, loc, origins, top, raw))
            continue
        lines.append(f"{origin_of(loc, origins, top)}: {dotted(loc) or '(top level)'}: {_message(e)}")
    return f"invalid config: {lines[0]}" if len(lines) == 1 else "invalid config:\n  " + "\n  ".join(lines)
