"""Ray started for facediff's commands: join a running cluster or start a local instance in this environment,
with Ray's own output kept off the terminal unless `--verbose` (`console.verbose`).

Quiet mode turns Ray's `log_to_driver` off (the same output stays in Ray's session logs,
`/tmp/ray/session_latest/logs`, and facediff's workers also log to `RUN/logs/`), raises Ray's driver logger to
errors, turns Ray Data's progress bars off and drops the raylet's worker start-up notes.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from facediff.console import verbose


def start_ray(wanted_cpus: float | None = None) -> None:
    """Join the running cluster, or start a local instance with at least `wanted_cpus` logical CPUs.

    Logical CPUs are only a scheduling budget: a local instance declares enough for what the job will ask
    (workers plus one for Ray Data), never fewer than the cores.
    """
    import ray

    if ray.is_initialized():
        return
    loud = verbose()
    kwargs = _quiet_before_init(loud)
    try:
        init_local_ray(max(os.cpu_count() or 1, math.ceil(wanted_cpus or 0)), **kwargs)
    except ValueError:  # a cluster is already running (`ray start`, `ray job submit`): use it as it is
        ray.init(**kwargs)
    _quiet_after_init(loud)


def join_cluster(address: str = "auto") -> None:
    """Join a running cluster (fail if there is none), with Ray's output kept as `start_ray` keeps it.

    A `ray job submit` job's output is its driver's stdout and stderr: with Ray's default `log_to_driver` every
    Train worker's and Ray actor's output (DeepSpeed's and CUDA's warnings of each rank, the controller's
    reports, Ray Data's progress bars) was printed there, 288 lines for an 8-step run. Quiet, the job prints what
    `facediff train` prints; the rest stays in Ray's session logs and the run's `logs/`."""
    import ray

    if ray.is_initialized():
        return
    loud = verbose()
    ray.init(address=address, **_quiet_before_init(loud))
    _quiet_after_init(loud)


def _quiet_before_init(loud: bool) -> dict:
    """What to set before `ray.init`, and its arguments: Ray's output on the terminal only when `loud`."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = loud
    if not loud:
        # Under `uv run`, Ray starts each worker with `uv run` too, and uv draws its install progress on the
        # terminal the processes inherit; Ray's processes inherit this environment.
        os.environ.setdefault("UV_NO_PROGRESS", "1")
    return {"log_to_driver": loud, "logging_level": logging.INFO if loud else logging.ERROR}


def _quiet_after_init(loud: bool) -> None:
    if not loud:
        quiet_ray_loggers()
        keep_raylet_notes_off_the_terminal()


def keep_raylet_notes_off_the_terminal() -> None:
    """Drop the raylet's "N PYTHON worker processes have been started ... maximum expected startup concurrency"
    notes from the driver's terminal.

    Ray publishes them to every driver, whatever `log_to_driver` says, each time a node's worker processes pass
    another multiple of its CPU count: on 2 cores a Tune grid (trial drivers, Train workers, Ray Data tasks)
    prints them every few trials. They say nothing the user can act on here and stay in the raylet's log
    (`raylet.out` in Ray's session logs). Ray's other published errors (a worker that died, a task that failed)
    still reach the terminal. Ray's driver thread looks `print_to_stdstream` up at each message, so wrapping
    the module's function is enough.
    """
    from ray._private import worker

    original = getattr(worker, "print_to_stdstream", None)
    if original is None or getattr(original, "keeps_raylet_notes_off", False):
        return

    def print_unless_startup_note(data, *args, **kwargs):
        lines = data.get("lines") or []
        if data.get("pid") == "raylet" and lines and all("worker processes have been started" in line
                                                          for line in lines):
            return
        original(data, *args, **kwargs)

    print_unless_startup_note.keeps_raylet_notes_off = True
    worker.print_to_stdstream = print_unless_startup_note


def init_local_ray(num_cpus: int, **kwargs) -> None:
    """Start a local Ray instance whose workers run this process's python, in this environment.

    Under `uv run`, Ray's uv hook would start every worker process with `uv run` in a packaged copy of the
    working directory, which first builds that copy's own environment, without the bytecode `make setup`
    compiled: each worker then compiles torch, diffusers and ray again on import (measured here: 23 s for the
    training loop's imports against 9 s with bytecode, and a two-worker test run 105 s against 53 s). A local
    instance shares this machine's environment, so the hook buys nothing. A cluster joined by address (`ray
    start`, `ray job submit`) keeps Ray's default: its nodes may need the environment shipped.

    Its workers run at the driver's priority. Ray starts workers at niceness 15 so that a node's own services stay
    responsive, but here the workers are the job: on a machine shared with two busy processes at niceness 0 the
    demo's training workers got ~5% of a core each and trained at 1-2 images/s instead of ~110. The
    `RAY_worker_niceness` environment variable, when set, still decides.
    """
    import ray
    from ray._private import ray_constants  # read by ray.init only; Ray's env var is read at import, too late here

    if ray_constants.RAY_WORKER_NICENESS not in os.environ:
        system_config = kwargs.pop("_system_config", None) or {}
        kwargs["_system_config"] = {"worker_niceness": 0, **system_config}
    uv_hook = ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV
    ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False
    try:
        ray.init(num_cpus=num_cpus, **kwargs)
    finally:
        ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = uv_hook


def quiet_ray_loggers() -> None:
    """Ray's driver-side records to the terminal only when they are errors. Ray Data's logger has its own
    console handler (and a file handler, `ray-data.log` in the session logs, which keeps everything)."""
    import ray.data  # noqa: F401 - configures the "ray.data" logger, whose console handler is lowered here

    logging.getLogger("ray").setLevel(logging.ERROR)
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)


def ray_logs_dir() -> str | None:
    """Where Ray's own logs of this session are (for the summary), or None outside Ray."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        return str(Path(ray._private.worker._global_node.get_session_dir_path()) / "logs")
    except AttributeError:  # a client connection has no local node
        return None
