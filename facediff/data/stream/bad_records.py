"""Bad data found mid-run: records that do not decode, and shard files that are not Parquet.

A record whose image or label map fails to decode is dropped by the decode step (`stream.decode_batch`), logged
with its id and shard file, and counted once per (file, id) in a `BadRecordTally`: one small Ray actor per run,
which every decode task of every pass reports to (the decode tasks run anywhere on the cluster; only an actor
sees them all). The training loop reads the count at each log step (`BadRecordWatch`), writes it to
metrics.jsonl as `bad_records` and stops the run once it passes `data.max_bad_records`, naming the files.
A dropped record never reaches the loop, so it is never among a checkpoint's consumed records: a resumed pass
reads it again, drops it again, and the tally (a set) does not count it twice.

A shard that is not Parquet at all (truncated, overwritten) is found before Ray starts by `check_parquet_files`:
two reads of a few bytes per file, cheap for thousands of shards.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger("facediff.data")

# The column `passes.ShardPasses` adds to every row read: the shard file it came from (dropped by the decode step).
SHARD_FILE_COLUMN = "shard_file"
PARQUET_MAGIC = b"PAR1"
# Records a summary names (the tally counts all of them).
LISTED = 20


class TooManyBadRecords(RuntimeError):
    """More records failed to decode than `data.max_bad_records` allows."""


def check_parquet_files(paths: Sequence[str | Path]) -> None:
    """Each file starts and ends with Parquet's magic bytes and its footer length fits the file (what a truncated
    or overwritten shard fails); ValueError naming the first file that does not."""
    for path in paths:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
            if size >= 12:
                f.seek(size - 8)
                footer_length, tail = struct.unpack("<I4s", f.read(8))
        if size < 12 or head != PARQUET_MAGIC or tail != PARQUET_MAGIC or footer_length + 12 > size:
            raise ValueError(f"{path}: not a whole Parquet file ({size} bytes; truncated or overwritten?); "
                             "prepare the dataset again or restore the file")


def bad_record(batch: dict, row: int, ids: np.ndarray, error: Exception) -> tuple[str, int, str]:
    """(shard file, id, reason) of a row that failed to decode."""
    files = batch.get(SHARD_FILE_COLUMN)
    file = str(files[row]) if files is not None else "(unknown shard)"
    reason = f"{type(error).__name__}: {error}".splitlines()[0][:200]
    return file, int(ids[row]), reason


def report(bad: list[tuple[str, int, str]], tally) -> None:
    """Log the rows a decode call dropped and add them to the run's tally (None outside a run: logged only)."""
    for file, record, reason in bad:
        log.warning("record %d of %s does not decode (%s): skipped", record, file, reason)
    if bad and tally is not None:
        import ray

        ray.get(tally.add.remote(bad))


def keep_rows(columns: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    """The decoded columns without the rows that failed (every column has the rows first)."""
    return columns if keep.all() else {name: np.ascontiguousarray(value[keep]) for name, value in columns.items()}


class _Tally:
    """Every bad record of a run, once per (file, id), with the first reason seen."""

    def __init__(self):
        self.records: dict[tuple[str, int], str] = {}

    def add(self, records: list[tuple[str, int, str]]) -> int:
        for file, record, reason in records:
            self.records.setdefault((file, int(record)), reason)
        return len(self.records)

    def summary(self) -> dict:
        listed = sorted(self.records.items())
        return {"count": len(listed), "files": sorted({file for file, _ in self.records}),
                "records": [[file, record, reason] for (file, record), reason in listed[:LISTED]]}


def start_tally():
    """The run's tally actor (no CPU: it only keeps a set); lives as long as the driver that made it, on the
    driver's node: a worker node that leaves (elastic runs, preemption) must not take the count with it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(_Tally).options(scheduling_strategy=here).remote()


def describe(summary: dict, limit: int | None = None, most: int = 3) -> str:
    """One short line: how many records failed, in which files (and the limit they passed). Short because Ray
    Train keeps only the last 500 characters of a worker's traceback, whose last line this ends."""
    files = summary["files"]
    if len(files) > 1:  # the folder once, then the names
        folder = os.path.commonpath(files)
        files = [os.path.relpath(f, folder) for f in files]
    named = ", ".join(files[:most]) + (f" and {len(files) - most} more" if len(files) > most else "")
    where = f"in {folder}: {named}" if len(files) > 1 else f"in {named}"
    over = f", more than data.max_bad_records={limit}" if limit is not None else ""
    return f"{summary['count']} records did not decode{over}, {where}"


class BadRecordWatch:
    """The training loop's view of the tally: the count all ranks agree on (the largest any rank read, so every rank
    takes the same branch), with rank 0 logging each new bad record's id and file to its log."""

    def __init__(self, tally, limit: int, rank: int):
        self.tally, self.limit, self.rank = tally, limit, rank
        self.logged: set[tuple[str, int]] = set()
        self.summary = {"count": 0, "files": [], "records": []}

    def count(self, device) -> int:
        """A collective: every rank calls it at the same step."""
        import ray
        import torch
        import torch.distributed as dist

        if self.tally is not None:
            self.summary = ray.get(self.tally.summary.remote())
        count = torch.tensor([self.summary["count"]], dtype=torch.int64, device=device)
        if dist.is_initialized():
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
        if self.rank == 0:
            for file, record, reason in self.summary["records"]:
                if (file, record) not in self.logged:
                    self.logged.add((file, record))
                    log.warning("record %d of %s does not decode (%s): skipped", record, file, reason)
        return int(count.item())

    def check(self, count: int) -> None:
        """Stop the run once more records failed than `data.max_bad_records` allows."""
        if count > self.limit:
            raise TooManyBadRecords(f"{describe({**self.summary, 'count': count}, self.limit)} (ids in "
                                    "logs/rank0.log); prepare those shards again or raise data.max_bad_records")
