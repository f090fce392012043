"""What reaches the terminal: facediff's own progress, warnings that matter, once; Ray's, Ray Data's and
DeepSpeed's internals only with `--verbose`.

Ray forwards every worker's and actor's stdout/stderr to the driver (`log_to_driver`): DeepSpeed's banners,
Ray Train's controller reports, the `uv run` environment notes of each worker start. Quiet mode turns that off
(the same output stays in Ray's session logs, `/tmp/ray/session_latest/logs`, and facediff's workers also log
to `RUN/logs/`), raises Ray's driver logger to errors and turns Ray Data's progress bars off. Progress comes
from the driver instead: `RunProgress` follows the run's `metrics.jsonl` (written by rank 0) and redraws one
line per run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from facediff.storage import StoredFile

VERBOSE_ENV = "FACEDIFF_VERBOSE"  # an environment variable, so Ray's processes and `ray_jobs/` see it too


def set_verbose(verbose: bool) -> None:
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def start_ray(wanted_cpus: float | None = None) -> None:
    """Join the running cluster, or start a local instance with at least `wanted_cpus` logical CPUs.

    Logical CPUs are only a scheduling budget: a local instance declares enough for what the job will ask
    (workers plus one for Ray Data), never fewer than the cores.
    """
    import ray
    import ray.data

    if ray.is_initialized():
        return
    loud = verbose()
    ray.data.DataContext.get_current().enable_progress_bars = loud
    if not loud:
        # Under `uv run`, Ray starts each worker with `uv run` too, and uv draws its install progress on the
        # terminal the processes inherit; Ray's processes inherit this environment.
        os.environ.setdefault("UV_NO_PROGRESS", "1")
    kwargs = {"log_to_driver": loud, "logging_level": logging.INFO if loud else logging.ERROR}
    try:
        init_local_ray(max(os.cpu_count() or 1, math.ceil(wanted_cpus or 0)), **kwargs)
    except ValueError:  # a cluster is already running (`ray start`, `ray job submit`): use it as it is
        ray.init(**kwargs)
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


def duration_text(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def redraw(stream, tty: bool, text: str, final: bool) -> None:
    """One progress line: redrawn in place on a terminal (ended with `final`); elsewhere written only when final."""
    if tty:
        stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
    elif final:
        stream.write(text + "\n")
    stream.flush()


class RunProgress:
    """A driver-side progress line for one training run, read from its `metrics.jsonl` while it trains.

    On a terminal the line is redrawn in place; otherwise (CI, a log file) a line is printed at every tenth
    of the run, so logs stay short. Used as a context manager around `trainer.fit()`.
    """

    def __init__(self, label: str, metrics_file: Path | StoredFile, total_kimg: float, stream=None,
                 interval_s: float = 1.0, note: str | None = None):
        # lazily: console is imported at every start, pyarrow.fs (storage) only for a run's progress
        from facediff.storage import StoredFile

        # a StoredFile: the run's metrics in remote storage (written there by rank 0, wherever it runs)
        self.file = metrics_file if isinstance(metrics_file, StoredFile) else StoredFile.local(metrics_file)
        # total_kimg: what the run trains in whole steps (`progress.planned_kimg`), so the line ends at N/N;
        # `note` says once, before the line, when that differs from trainer.total_kimg (`progress.rounding_note`)
        self.label, self.total_kimg, self.note = label, total_kimg, note
        self.decimals = 3 if total_kimg < 1 else 2  # 0.112 kimg, not 0.11
        self.stream = stream or sys.stderr
        self.interval_s = interval_s
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the follower thread and the final poll at exit
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._start = time.time()
        self._offset = self.file.size() or 0  # a resumed run's old rows
        self._last: dict = {}
        self._printed: dict = {}
        self._first: tuple[float, float] | None = None  # (when, kimg) of the first row this run wrote
        self._printed_tenths = -1
        self._metric: dict[str, float] = {}

    def __enter__(self) -> RunProgress:
        if self.note:
            self._write(f"{self.label}: {self.note}", final=True)
        self._write(f"{self.label}: starting Ray workers ...", final=not self.tty)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()
        if self._last and (self.tty or self._last is not self._printed):
            self._write(self.line(self._last), final=True)

    def _write(self, text: str, final: bool) -> None:
        redraw(self.stream, self.tty, text, final)

    def line(self, row: dict) -> str:
        kimg = float(row.get("kimg", 0.0))
        fraction = min(1.0, kimg / self.total_kimg) if self.total_kimg else 0.0
        bar = "#" * int(fraction * 20) + "-" * (20 - int(fraction * 20))
        rate = row.get("images_per_s")
        elapsed = time.time() - self._start
        # the ETA counts from the first row: start-up (Ray, workers, data) is not training
        since = time.time() - self._first[0] if self._first else 0.0
        done = kimg - self._first[1] if self._first else 0.0
        eta = since / done * (self.total_kimg - kimg) if done > 0 and since > 0 else float("nan")
        d = self.decimals
        parts = [f"{self.label} [{bar}] {kimg:.{d}f}/{self.total_kimg:.{d}f} kimg"]
        if rate is not None:
            parts.append(f"{rate:.0f} img/s")
        if "loss" in row:
            parts.append(f"loss {row['loss']:.4f}")
        parts += [f"{k} {v:.3f}" for k, v in self._metric.items()]
        parts.append(f"ETA {duration_text(eta)}" if fraction < 1 else f"took {duration_text(elapsed)}")
        return "  ".join(parts)

    def _poll(self) -> None:
        with self._lock:
            self._read_new_rows()

    def _read_new_rows(self) -> None:
        size = self.file.size()
        if size is None:
            return
        if size < self._offset:  # rewritten (a resumed run drops rows past its checkpoint)
            self._offset = 0
        chunk = self.file.read_from(self._offset)
        complete = chunk[:chunk.rfind(b"\n") + 1]  # a row being written is read next time
        self._offset += len(complete)
        for text in complete.decode().splitlines():
            if not text.strip():
                continue
            row = json.loads(text)
            if self._first is None:
                self._first = (time.time(), float(row.get("kimg", 0.0)))
            self._last = row
            self._metric.update({k: v for k, v in row.items()
                                 if isinstance(v, (int, float)) and (k in ("fid", "attr_acc") or k.startswith("fd_"))})
            tenths = int(10 * float(row.get("kimg", 0.0)) / self.total_kimg) if self.total_kimg else 0
            if self.tty:
                self._write(self.line(row), final=False)
            elif tenths > self._printed_tenths:
                self._printed_tenths, self._printed = tenths, row
                self._write(self.line(row), final=True)

    def _follow(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._poll()
            except (OSError, ValueError):  # a torn line or a file being replaced: try again
                continue


class ConsoleFormatter(logging.Formatter):
    """facediff's records as plain lines; warnings and errors marked as such."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        return text


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def setup_logging(loud: bool) -> None:
    """The driver's logging: everything with timestamps under `--verbose`; else facediff's own records only.

    DeepSpeed's logger prints to stdout with its own handler, set up when something first imports deepspeed: in
    the driver, transformers' `save_pretrained` does (through accelerate) when a run exports an SD pipeline,
    and DeepSpeed's "Setting accelerator to CPU" warning headed the `sd_lora` demo stage's output. A filter on
    the logger (which DeepSpeed's set-up keeps) lets only its errors through unless `--verbose`; the workers,
    which run the engines, log DeepSpeed to `RUN/logs/` as before (`log_to_file`)."""
    set_verbose(loud)
    deepspeed_logger = logging.getLogger("DeepSpeed")
    for old in [f for f in deepspeed_logger.filters if isinstance(f, _ErrorsOnly)]:
        deepspeed_logger.removeFilter(old)
    if loud:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return
    deepspeed_logger.addFilter(_ErrorsOnly())
    handler = logging.StreamHandler()
    handler.setFormatter(ConsoleFormatter())
    logging.basicConfig(level=logging.ERROR, handlers=[handler])
    logging.getLogger("facediff").setLevel(logging.INFO)


_WORKER_LOGGERS = ("facediff", "DeepSpeed")


def log_to_file(path: Path) -> logging.Handler:
    """A Ray Train worker's own log: facediff's and DeepSpeed's records at INFO, into the run folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in _WORKER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(getattr(h, "baseFilename", None) == str(path) for h in logger.handlers):
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return handler


class _Held(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def hold_log(path: Path) -> Callable[[], None]:
    """A worker's log (`log_to_file`) whose records are held in memory until the returned function is called, then
    written first: a worker whose start fails (a resume refused by the checkpoint) leaves the run folder as it was."""
    held = _Held()
    for name in _WORKER_LOGGERS:
        logging.getLogger(name).addHandler(held)
        logging.getLogger(name).setLevel(logging.INFO)

    def open_file() -> None:
        handler = log_to_file(path)
        for name in _WORKER_LOGGERS:
            logging.getLogger(name).removeHandler(held)
        for record in held.records:
            handler.handle(record)
        held.records.clear()

    return open_file
