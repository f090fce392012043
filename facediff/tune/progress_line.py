"""The driver's progress line for a Tune experiment; Tune's own trial tables only with `--verbose`.

Tune's default reporter prints a table of every trial every 30 s (five tables in a two-minute grid, hundreds in
a day's). `TuneProgressLine` is a Tune callback on the driver that keeps one line instead: how many trials are
running, completed, stopped early by ASHA and errored, and the best value of the metric so far. On a terminal
it is redrawn in place; otherwise a line is printed only when a trial starts or ends, so logs stay short.
"""

from __future__ import annotations

import sys
import time

from ray.tune import Callback

from facediff.console import duration_text, redraw


class TuneProgressLine(Callback):
    def __init__(self, name: str, metric: str, mode: str, total_kimg: float, stream=None):
        self.name, self.metric, self.mode, self.total_kimg = name, metric, mode, total_kimg
        self._stream = stream
        self._start = time.time()
        self._printed_counts: tuple | None = None

    # Tune pickles its run config, callbacks included, with the experiment (and a resumed experiment gets them
    # back from there): the stream is not pickled, and a resumed experiment counts its time from the restore.
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stream": None, "_printed_counts": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _start=time.time())

    @property
    def stream(self):
        return self._stream or sys.stderr

    @property
    def tty(self) -> bool:
        return hasattr(self.stream, "isatty") and self.stream.isatty()

    def _best(self, trials) -> tuple[float, str] | None:
        """(value, trial id) of the best metric any trial has reported so far."""
        best = None
        for trial in trials:
            value = (trial.metric_analysis.get(self.metric) or {}).get(self.mode)
            if value is None:
                continue
            if best is None or (value < best[0] if self.mode == "min" else value > best[0]):
                best = (float(value), trial.trial_id)
        return best

    def _outcome(self, trial) -> str:
        if trial.status == "ERROR":
            return "errored"
        if trial.status != "TERMINATED":
            return trial.status.lower()  # pending, running, paused
        kimg = float((trial.last_result or {}).get("kimg", 0.0))
        return "completed" if kimg >= self.total_kimg - 1e-9 else "stopped early"

    def line(self, trials) -> tuple[str, tuple]:
        counts = {}
        for trial in trials:
            outcome = self._outcome(trial)
            counts[outcome] = counts.get(outcome, 0) + 1
        order = ("running", "pending", "paused", "completed", "stopped early", "errored")
        parts = [f"tune {self.name}: {len(trials)} trials"] + [f"{counts[k]} {k}" for k in order if counts.get(k)]
        best = self._best(trials)
        if best is not None:
            parts.append(f"best {self.metric} {best[0]:.3f} (trial {best[1]})")
        parts.append(duration_text(time.time() - self._start))
        return "  ".join(parts), tuple(counts.get(k, 0) for k in order)

    def _show(self, trials, final: bool = False) -> None:
        text, counts = self.line(trials)
        if self.tty:
            redraw(self.stream, True, text, final)
        elif final or counts != self._printed_counts:
            self._printed_counts = counts
            redraw(self.stream, False, text, True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._show(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._show(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._show(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._show(trials)

    def on_experiment_end(self, trials, **info):
        self._show(trials, final=True)
