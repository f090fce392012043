"""What reaches the terminal: facediff's own progress, warnings that matter, once; Ray's, Ray Data's and
DeepSpeed's internals only with `--verbose`.

Ray forwards every worker's and actor's stdout/stderr to the driver (`log_to_driver`): DeepSpeed's banners,
Ray Train's controller reports, the `uv run` environment notes of each worker start. Quiet mode turns that off
(`facediff.ray_start`). Progress comes from the driver instead: `RunProgressLine` follows the run's `metrics.jsonl`
(written by rank 0) and redraws one line per run.
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


class RunProgressLine:
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
        # total_kimg: what the run trains in whole steps (`run_log.planned_kimg`), so the line ends at N/N;
        # `note` says once, before the line, when that differs from trainer.total_kimg (`run_log.rounding_note`)
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

    def __enter__(self) -> RunProgressLine:
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
            if row.get("async_eval"):  # an earlier checkpoint's evaluation (`train.async_eval`): not progress
                self._metric.update({k: v for k, v in row.items() if k in ("fid", "attr_acc") or k.startswith("fd_")})
                continue
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
