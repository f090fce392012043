"""What every `facediff` subcommand module shares: the one-line error and config loading that uses it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import typer

from facediff.config import ConfigError, load_config
from facediff.console import verbose


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


@contextmanager
def job_failures(what: str) -> Iterator[None]:
    """A job that failed (not the user's input): one `error:` line with its cause and exit code 1; the whole
    traceback (Ray's, with every worker's) only under `--verbose`."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - any failure of the job ends here, reported once
        if verbose() or isinstance(err, typer.Exit):
            raise
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        # Ray wraps a worker's exception in its traceback: its last line is the cause
        cause = lines[-1] if lines else type(err).__name__
        typer.secho(f"error: {what} failed: {cause} (run again with --verbose for the traceback)",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None
