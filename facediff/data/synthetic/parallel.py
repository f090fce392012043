"""A process pool over independent per-image jobs, with a progress bar (the synthetic dataset writers)."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

from tqdm import tqdm


def map_jobs(fn, jobs: list, workers: int | None, desc: str, progress: bool = True) -> list:
    """`fn` over `jobs` in order, in a process pool (in this process for one worker), with a progress bar."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    bar = {"total": len(jobs), "desc": desc, "unit": "img", "disable": not progress}
    if workers == 1:
        return [fn(job) for job in tqdm(jobs, **bar)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        chunk = max(1, min(32, len(jobs) // (4 * workers)))
        return list(tqdm(pool.map(fn, jobs, chunksize=chunk), **bar))
