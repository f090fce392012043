"""facediff's imports go one way: no circle, eval/ free of the trainer, each module above what it imports.

Every module is parsed with `ast` (nothing is imported, no Ray): module-level imports and those inside
functions alike, so a circle cannot hide in a function body. See ARCHITECTURE.md's "Layers".
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "facediff"

# Lowest first. A module may import from its own layer and those below it. Keys are dotted prefixes; the longest
# that matches a module wins (so sub-packages and moved files keep their layer: `facediff.data` covers
# `facediff.data.stream.x`, `facediff.cli` covers a `cli/` package).
LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["facediff", "facediff.rng", "facediff.storage", "facediff.integrity", "facediff.threads",
              "facediff.console", "facediff.ray_start",
              "facediff.data.celebamask"]),  # facts of the release (attribute and part names) the config checks
    ("config", ["facediff.config"]),
    ("data", ["facediff.data"]),
    ("models", ["facediff.models", "facediff.diffusion", "facediff.losses",
                # `prepare latents` encodes with the model's autoencoder, `prepare prompt-embeddings` with its
                # text encoder
                "facediff.data.prepare.latents", "facediff.data.prompt_embeddings"]),
    ("tasks", ["facediff.tasks",
               "facediff.models.info"]),  # counts the parameters of a built task
    ("eval", ["facediff.eval", "facediff.viz"]),
    ("train", ["facediff.train"]),
    ("runs", ["facediff.runs"]),
    # the bodies of the subcommands, some beside the machinery they drive
    ("commands", ["facediff.sampling", "facediff.demo", "facediff.tune", "facediff.train.run",
                  "facediff.train.segformer", "facediff.train.dry_run", "facediff.train.autoencoder"]),
    ("cli", ["facediff.cli"]),
]
RANK = {prefix: rank for rank, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _known(name: str) -> str | None:
    """The facediff module an imported name lives in (`facediff.x.y.func` -> `facediff.x.y`)."""
    while name not in MODULES:
        if (REPO / name.replace(".", "/")).is_dir() or "." not in name:
            return None  # a namespace package (no __init__.py: no code of its own), or not facediff's
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(module: str, source: str | None = None) -> set[str]:
    """The facediff modules `module` imports, anywhere in its body (`source`: its text, default its file's)."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]  # `from pkg import module`
        else:
            continue
        for name in names:
            target = _known(name) if name.split(".")[0] == "facediff" else None
            if target is not None and target != module:
                found.add(target)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def layer(module: str) -> int | None:
    matches = [p for p in RANK if module == p or (p != "facediff" and module.startswith(p + "."))]
    return RANK[max(matches, key=len)] if matches else None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_walk_sees_every_kind_of_import():
    # the checks below are only as good as the walk: a circle hidden in a function body must count
    source = ("import facediff.rng\nfrom . import checkpoint\n\ndef f():\n    from facediff.runs.load import load_model\n"
              "    from facediff.runs import remote\n")
    assert imports_of("facediff.train.ema", source) == {"facediff.rng", "facediff.train.checkpoint", "facediff.runs",
                                                        "facediff.runs.load", "facediff.runs.remote"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_circle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_eval_imports_nothing_from_train():
    bad = sorted(f"{m} imports {t}" for m, targets in GRAPH.items() if m.startswith("facediff.eval")
                 for t in targets if t.startswith("facediff.train"))
    assert not bad, "; ".join(bad)


def test_every_module_imports_only_its_own_or_lower_layers():
    unmapped = sorted(m for m in MODULES if layer(m) is None)
    assert not unmapped, f"modules without a layer (add them to LAYERS in {Path(__file__).name}): {unmapped}"
    names = [name for name, _ in LAYERS]
    upward = sorted(f"{m} ({names[layer(m)]}) imports {t} ({names[layer(t)]})"
                    for m, targets in GRAPH.items() for t in targets if layer(t) > layer(m))
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)
