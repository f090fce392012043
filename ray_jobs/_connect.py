"""Shared by the `ray_jobs/*.py` entry points: join the cluster the job runs on, then run a `facediff` command.

Under `ray job submit` the driver gets RAY_ADDRESS; `ray.init(address="auto")` joins that cluster (or a running
local `ray start` head) and fails if there is none. `facediff.ray_start.start_ray` then finds Ray initialised and
uses it as it is, so the CLI and the jobs share one code path after this line.
"""

import sys

import ray

from facediff.cli.main import app


def run(command: str, script: str) -> None:
    ray.init(address="auto")
    sys.exit(app([command, *sys.argv[1:]], prog_name=f"ray_jobs/{script}"))
