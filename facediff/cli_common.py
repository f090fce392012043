"""What every `facediff` subcommand module shares: the one-line error and config loading that uses it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import typer

from facediff.config import ConfigError, load_config


def fail(message: str) -> NoReturn:
    """Bad user input: one red `error: ...` line naming what to fix, exit code 2, no traceback."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def load_or_fail(path: Path, overrides: list[str] | None):
    try:
        return load_config(path, overrides or [])
    except ConfigError as err:
        fail(str(err))


@contextmanager
def user_errors(*kinds: type[Exception]) -> Iterator[None]:
    """Turn the errors a command's bad input raises (their messages name the file or option) into `fail`."""
    try:
        yield
    except kinds or (ValueError, FileNotFoundError) as err:
        fail(str(err))
