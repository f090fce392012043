"""Shared by the `ray_jobs/*.py` entry points: join the cluster the job runs on, then run a `facediff` command.

Under `ray job submit` the driver gets RAY_ADDRESS; `join_cluster` joins that cluster (or a running local
`ray start` head) and fails if there is none, keeping Ray's and the workers' output off the job's output as
`facediff train` keeps it off the terminal. `facediff.ray_start.start_ray` then finds Ray initialised and uses
it as it is, so the CLI and the jobs share one code path after this line.

`--verbose` (`-v`) anywhere among the job's arguments, or `FACEDIFF_VERBOSE=1` in its environment (`ray job submit
--runtime-env-json '{"env_vars": {"FACEDIFF_VERBOSE": "1"}}'`), brings Ray's output back, as `facediff --verbose`.
"""

import sys

from facediff.cli.main import app
from facediff.console import set_verbose, verbose

VERBOSE_FLAGS = ("--verbose", "-v")


def cli_args(command: str, args: list[str]) -> list[str]:
    """The `facediff` arguments for a job's: its verbose flag (or the environment's) moved before the command,
    where the CLI takes it."""
    loud = verbose() or any(arg in VERBOSE_FLAGS for arg in args)
    set_verbose(loud)  # read by join_cluster, before the CLI sets it again from the flag
    return [*(["--verbose"] if loud else []), command, *(arg for arg in args if arg not in VERBOSE_FLAGS)]


def run(command: str, script: str, join: bool = True) -> None:
    args = cli_args(command, sys.argv[1:])
    if join:
        from facediff.ray_start import join_cluster

        join_cluster("auto")
    sys.exit(app(args, prog_name=f"ray_jobs/{script}"))
