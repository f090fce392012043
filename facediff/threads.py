"""Intra-op threads for the work the driver process does itself (the demo fits its autoencoder, trains the
attribute reader and samples in the driver; `facediff sample`, `evaluate` and `fit-autoencoder` on the CPU run
in it too): as many as the machine has idle cores, at most torch's default.

torch's OpenMP threads wait for each other at every parallel region, so a thread that loses its core to another
process stalls the rest. Measured on 2 cores beside two busy processes, one step of fitting the tiny VQ took
497 ms with 2 threads and 172 ms with 1 (idle: 76 and 108 ms); the demo's conditional stage took 1,189 s there,
most of it in the driver's autoencoder fit and reader training. Ray's workers are not affected: Ray gives each
one as many threads as the CPUs it reserves.
"""

from __future__ import annotations

import psutil
import torch

DEFAULT_THREADS = torch.get_num_threads()  # before anything here lowers it


def idle_cores(sample_s: float = 0.5) -> float:
    """Cores not busy over the next `sample_s` seconds (all processes, ours included)."""
    busy = psutil.cpu_percent(interval=sample_s) / 100.0
    return (psutil.cpu_count() or 1) * (1.0 - busy)


def threads_for_idle_cores(idle: float | None = None) -> int:
    """Set torch's intra-op threads to the idle cores (at least 1, at most the default) and return the count."""
    idle = idle_cores() if idle is None else idle
    threads = max(1, min(DEFAULT_THREADS, round(idle)))
    torch.set_num_threads(threads)
    return threads


def busy_cores_note(idle: float | None = None) -> str:
    """`threads_for_idle_cores`, said in words when it lowered the threads ("" when it kept the default)."""
    threads = threads_for_idle_cores(idle)
    return "" if threads == DEFAULT_THREADS else f"driver: {threads} of {DEFAULT_THREADS} threads, cores busy"
