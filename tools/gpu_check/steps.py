"""The check's machinery: a row of the table, and the runner that runs each step of a row as a child process
with its full output in the row's log, within the check's time budget."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# `python -m facediff.cli.main` would only define the app (main.py has main() but no __main__ guard)
FACEDIFF = [sys.executable, "-c", "from facediff.cli.main import main; main()"]
MIN_STEP_S = 15  # a step does not start with less of the budget left


@dataclass
class Row:
    name: str
    status: str = "PASS"
    seconds: float = 0.0
    details: list[str] = field(default_factory=list)
    log: Path | None = None

    def fail(self, why: str) -> None:
        self.status = "FAIL"
        self.details.append(why)

    def skip(self, why: str) -> None:
        if self.status != "FAIL":
            self.status = "SKIP"
        self.details.append(why)

    @property
    def passed(self) -> bool:
        return self.status == "PASS"


class Runner:
    def __init__(self, logs: Path, deadline: float):
        self.logs, self.deadline = logs, deadline

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, row: Row, label: str, cmd: list[str], timeout_s: float, cwd: Path = ROOT) -> int | None:
        """Run one step, appending its full output to the row's log; None when it did not run to its end.

        A step that would start with under MIN_STEP_S of the budget left, or that the budget cuts off, makes the
        row SKIP (the budget, not the code, ended it); one that exceeds its own timeout_s makes it FAIL."""
        row.log = row.log or self.logs / f"{row.name}.log"
        left = self.left()
        if left < MIN_STEP_S:
            row.skip(f"{label}: not run (the check's --budget-s is spent)")
            return None
        cut_by_budget = left < timeout_s
        timeout_s = min(timeout_s, left)
        start = time.monotonic()
        with row.log.open("a") as log:
            log.write(f"\n===== {label}: $ {' '.join(cmd)}\n")
            log.flush()
            try:
                proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)  # its own group: a timeout ends Ray's helpers too
            except OSError as err:
                log.write(f"could not start: {err}\n")
                row.fail(f"{label}: could not start ({err})")
                return None
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _end_group(proc)
                rc = None
            seconds = time.monotonic() - start
            log.write(f"===== {label}: {'timed out after' if rc is None else f'exit {rc},'} {seconds:.1f} s\n")
        row.seconds += seconds
        if rc is None and cut_by_budget:
            row.skip(f"{label}: cut off after {seconds:.0f} s by the check's --budget-s (not a verdict)")
        elif rc is None:
            row.fail(f"{label}: timed out after {seconds:.0f} s")
        elif rc != 0:
            row.fail(f"{label}: exit {rc}")
        return rc

    def output(self, cmd: list[str], timeout_s: float = 120) -> str:
        try:
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s).stdout
        except (subprocess.TimeoutExpired, OSError):
            return ""


def last_output(row: Row, label: str) -> str:
    """What the row's last step named `label` printed (its part of the row's log)."""
    text = row.log.read_text() if row.log and row.log.exists() else ""
    return text.rsplit(f"\n===== {label}: $ ", 1)[-1]


def _end_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def guarded(row: Row, build) -> Row:
    """A row whose checking code itself broke is a FAIL row, not the end of the check."""
    try:
        return build(row)
    except Exception as err:  # noqa: BLE001
        row.fail(f"check raised {type(err).__name__}: {err}")
        return row
