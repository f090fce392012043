"""Print the configuration reference tables of docs/configuration.md from the pydantic schema.

Every key of every section (and of each model family, the segformer config and the Tune grid) with its type,
default and the comment written beside it in the schema source. Regenerate after changing the schema:
`uv run python tools/config_reference.py > /tmp/keys.md` and paste it between the markers in
docs/configuration.md (tests/test_docs.py checks every key is there).
"""
from __future__ import annotations

import inspect
import re
import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined


def _comment(cls: type, name: str) -> str:
    """The `# ...` comment on the line that declares `name` in `cls` or a base class."""
    for klass in cls.__mro__:
        if not (isinstance(klass, type) and issubclass(klass, BaseModel)) or klass is BaseModel:
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        m = re.search(rf"^\s+{re.escape(name)}\s*:.*?#\s*(.+)$", src, re.MULTILINE)
        if m:
            return m.group(1).strip()
        above = re.search(rf"((?:^[ ]+#.*\n)+)[ ]+{re.escape(name)}\s*:", src, re.MULTILINE)
        if above:
            return " ".join(line.strip().lstrip("#").strip() for line in above.group(1).splitlines())
    return ""


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models a field's type holds (directly, in a union or an Optional), not in lists/dicts."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (list, dict, tuple):
        return []
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        out += _models_in(arg)
    return out


def _type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " / ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is not PydanticUndefined:
        return repr(field.default)
    if field.default_factory is not None:
        try:
            return repr(field.default_factory())
        except TypeError:
            return "(computed)"
    return "required"


def rows(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str, str]]:
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = _models_in(field.annotation)
        if len(nested) == 1:
            out.append((key, nested[0].__name__, _default(field) if field.default is None else "", _comment(model, name)))
            out += rows(nested[0], key + ".")
        else:
            out.append((key, _type_name(field.annotation), _default(field), _comment(model, name)))
    return out


def table(model: type[BaseModel], prefix: str = "") -> str:
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, typ, default, comment in rows(model, prefix):
        cell = lambda s: s.replace("|", "\\|")
        lines.append(f"| `{key}` | {cell(typ)} | {cell(default)} | {cell(comment)} |")
    return "\n".join(lines)


def sections() -> list[tuple[str, type[BaseModel], str]]:
    from facediff.config import models as m
    from facediff.config.grid import GridConfig
    from facediff.config.schema import ExperimentConfig
    from facediff.train.segformer_config import SegformerTrainConfig

    out = [(f"`{name}`", field.annotation, f"{name}.")
           for name, field in ExperimentConfig.model_fields.items()
           if name != "model" and _models_in(field.annotation)]
    for family in typing.get_args(typing.get_args(m.ModelConfig)[0]):
        out.append((f"`model` (family `{family.model_fields['family'].default}`)", family, "model."))
    out.append(("Tune grid files (`configs/tune/*.yaml`)", GridConfig, ""))
    out.append(("`train-segformer` configs (`configs/segformer/*.yaml`)", SegformerTrainConfig, ""))
    return out


def main() -> None:
    from facediff.config.schema import ExperimentConfig
    top = [n for n, f in ExperimentConfig.model_fields.items() if not _models_in(f.annotation) or n == "model"]
    print(f"Top-level keys: {', '.join(f'`{n}`' for n in top)}.\n")
    for title, model, prefix in sections():
        print(f"### {title}\n\n{table(model, prefix)}\n")


if __name__ == "__main__":
    main()
