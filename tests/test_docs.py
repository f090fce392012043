"""Docs that cannot rot: every command, option, config path, module and link in README.md and docs/*.md exists.

Cheap (no Ray, no training): commands are checked against the click command tree behind `facediff --help`,
configs are loaded and validated with the overrides the command gives them, modules and their attributes are
found by reading the source (no import), links and their #anchors are resolved against the pages' headings.
"""
from __future__ import annotations

import ast
import re
import runpy
import shlex
from pathlib import Path

import pytest
import typer

from facediff.cli.main import app
from facediff.config.load import load_config, load_grid
from facediff.train.segformer_config import load_segformer_config
from facediff.tune.space import split_overrides

from conftest import REPO

DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", REPO / "ARCHITECTURE.md", *DOCS]
# Config files a page shows how to write (not shipped); upper-case stems (X.yaml, GRID.yaml) are placeholders too.
EXAMPLE_CONFIGS = {"configs/experiments/celebamask/unet_r3_cpu.yaml"}
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
CONFIG_PATH = re.compile(r"(?<![\w/.-])configs/[\w/.-]+\.yaml")
MODULE_PATH = re.compile(r"(?<![\w/.-])facediff(?:\.[A-Za-z_]\w*)+")
FILE_PATH = re.compile(r"(?<![\w/.-])(?:facediff|benchmarks|tools|ray_jobs|tests)/[\w/.-]+\.(?:py|md|sh)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")


def _root_command():  # typer ships its own click: duck-typed below
    return typer.main.get_command(app)


def _options(command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        if getattr(param, "param_type_name", "") == "option":
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


def _commands_in(block: str) -> list[list[str]]:
    """Each `facediff ...` (or `ray_jobs/X.py ...`) invocation of a shell block, as tokens from the subcommand on."""
    text = re.sub(r"\\\n\s*", " ", block)
    found = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line.startswith("#"):
            continue
        for part in re.split(r"&&|;|\|", line):
            try:
                tokens = shlex.split(part)
            except ValueError:
                tokens = part.split()
            # `[--option]` usage brackets; a value ending in a YAML list (`key=[2,4]`) keeps its own
            tokens = [t if re.fullmatch(r"[~\w.]+:?=.*", t) else t.strip("[]") for t in tokens]
            for i, token in enumerate(tokens):
                if token == "facediff" and (i == 0 or tokens[i - 1] in ("run", "--frozen")):
                    found.append(tokens[i + 1:])
                    break
                job = re.fullmatch(r"ray_jobs/(\w+)\.py", token)
                if job:
                    found.append([job.group(1), *tokens[i + 1:]])
                    break
    return found


def check_command(tokens: list[str]) -> list[str]:
    """Problems with one invocation: an unknown subcommand, an unknown option, a config that does not load."""
    command = _root_command()
    path = ["facediff"]
    rest = list(tokens)
    while rest and rest[0].startswith("--") and hasattr(command, "commands"):  # group options (--verbose)
        if rest[0].split("=")[0] not in _options(command):
            return [f"`facediff {' '.join(tokens)}`: {rest[0]} is not an option of facediff"]
        rest.pop(0)
    while hasattr(command, "commands") and rest:
        name = rest.pop(0)
        if name.isupper():  # a placeholder: `facediff --verbose COMMAND`
            return []
        if name not in command.commands:
            return [f"`facediff {' '.join(tokens)}`: no subcommand {' '.join(path)} {name}"]
        command, path = command.commands[name], [*path, name]
    problems = []
    known = _options(command)
    for token in rest:
        if token.startswith("--") and token.split("=")[0] not in known:
            problems.append(f"`facediff {' '.join(tokens)}`: {token.split('=')[0]} is not an option of "
                            f"`{' '.join(path)}`")
    configs = [t for t in rest if CONFIG_PATH.fullmatch(t) and t not in EXAMPLE_CONFIGS and not Path(t).stem.isupper()]
    overrides = [t for t in rest if re.fullmatch(r"[~\w.]+:?=.*", t) and not t.startswith("-")]
    if configs and not problems and path[-1] in ("train", "info", "config", "tune", "train-segformer"):
        try:
            _load(configs[0], overrides)
        except Exception as err:  # noqa: BLE001 - the error is the finding
            problems.append(f"`facediff {' '.join(tokens)}`: {configs[0]} with {overrides} does not load: {err}")
    return problems


def _load(path: str, overrides: list[str] | None = None) -> None:
    if path.startswith("configs/tune/"):
        grid_overrides, train_overrides = split_overrides(list(overrides or []))
        load_grid(REPO / path, grid_overrides + train_overrides)
    elif path.startswith("configs/segformer/"):
        load_segformer_config(REPO / path, overrides)
    elif path.startswith("configs/experiments/"):
        load_config(REPO / path, overrides)


def _module_file(parts: list[str]) -> Path | None:
    base = REPO.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _defines(tree: ast.AST, name: str) -> ast.AST | None:
    for node in getattr(tree, "body", []):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return node
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and any(getattr(t, "id", None) == name for t in targets):
            return node
        if isinstance(node, (ast.ImportFrom, ast.Import)) and any((a.asname or a.name) == name for a in node.names):
            return node
    return None


def check_module_path(dotted: str) -> str | None:
    """`facediff.a.b.name[.attr]`: the longest prefix that is a module file, then names defined in its source."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        source = _module_file(parts[:cut])
        if source is None:
            continue
        node: ast.AST | None = ast.parse(source.read_text())
        for name in parts[cut:]:
            node = _defines(node, name)
            if node is None:
                return f"{dotted}: {source.relative_to(REPO)} defines no {name}"
        return None
    return f"{dotted}: no such module"


def _anchors(page: Path) -> set[str]:
    slugs = set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text()), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        slugs.add(slug)
    return slugs


def check_link(page: Path, target: str) -> str | None:
    if re.match(r"[a-z]+:", target):
        return None
    file, _, anchor = target.partition("#")
    dest = (page.parent / file).resolve() if file else page
    if not dest.exists():
        rel = dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest
        return f"{page.name}: link {target} -> {rel} does not exist"
    if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
        return f"{page.name}: link {target}: {dest.name} has no heading #{anchor}"
    return None


def _make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.MULTILINE))


def problems_in(page: Path, text: str) -> list[str]:
    problems = []
    inline = [span for span in CODE.findall(FENCE.sub("", text)) if re.match(r"(uv run )?facediff [\w-]", span)]
    for block in FENCE.findall(text) + inline:
        for tokens in _commands_in(block):
            problems += check_command(tokens)
        for target in re.findall(r"^make ([\w-]+)", block, re.MULTILINE):
            if target not in _make_targets():
                problems.append(f"{page.name}: `make {target}`: no such Makefile target")
    code = " ".join(FENCE.findall(text) + CODE.findall(FENCE.sub("", text)))
    for path in sorted(set(CONFIG_PATH.findall(code))):
        if path in EXAMPLE_CONFIGS or Path(path).stem.isupper():
            continue
        if not (REPO / path).is_file():
            problems.append(f"{page.name}: {path} does not exist")
        else:
            try:
                _load(path)
            except Exception as err:  # noqa: BLE001
                problems.append(f"{page.name}: {path} does not load: {err}")
    for path in sorted(set(FILE_PATH.findall(code))):
        if not (REPO / path).exists():
            problems.append(f"{page.name}: {path} does not exist")
    for dotted in sorted(set(MODULE_PATH.findall(code))):
        problems += [p for p in [check_module_path(dotted)] if p]
    for target in LINK.findall(FENCE.sub("", text)):
        problems += [p for p in [check_link(page, target)] if p]
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_option_path_module_and_link_exists(page):
    assert problems_in(page, page.read_text()) == []


def test_a_renamed_command_option_path_module_or_link_is_caught():
    page = REPO / "docs" / "training.md"
    good = ("```bash\nuv run facediff train configs/experiments/tiny/tiny_unet.yaml trainer.num_workers=1 --dry-run\n"
            "uv run facediff prepare celebamask RAW OUT --train-size 27\n```\n`facediff.losses.info_nce` "
            "[data](data.md#passes)\n```bash\nmake test\n```\n")
    assert problems_in(page, good) == []
    for old, new in [("--dry-run", "--dryrun"), ("--train-size", "--train-sizes"), ("prepare celebamask", "prepare celeba"),
                     ("tiny_unet.yaml", "tiny_unet2.yaml"), ("trainer.num_workers", "trainer.num_worker"),
                     ("losses.info_nce", "losses.infonce"), ("data.md#passes", "data.md#pass"),
                     ("(data.md", "(dat.md"), ("make test", "make tests")]:
        assert old in good
        assert problems_in(page, good.replace(old, new)), f"renaming {old} -> {new} went unnoticed"


def test_every_schema_key_is_in_the_configuration_page():
    reference = runpy.run_path(str(REPO / "tools" / "config_reference.py"))
    page = (REPO / "docs" / "configuration.md").read_text()
    missing = [key for _, model, prefix in reference["sections"]() for key, *_ in reference["rows"](model, prefix)
               if f"`{key}`" not in page]
    assert missing == [], "regenerate with `uv run python tools/config_reference.py`"


def test_readme_is_a_short_manual_not_a_diary():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for phrase in ("this stop", "earlier stop", "later stop", "fresh clone of"):
        assert phrase not in readme.lower(), phrase
    topics = {"data", "configuration", "training", "families", "evaluation", "tuning", "reproducing", "cluster",
              "benchmarks", "demo"}
    assert topics <= {page.stem for page in DOCS}
    for page in DOCS:
        assert f"(docs/{page.name}" in readme, f"README does not link docs/{page.name}"
