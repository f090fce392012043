"""Shard rows read for whole data epochs: a Ray Data `Datasource` whose every execution (a *pass*) reads
`epochs_per_pass` epochs of a split in a row, each epoch in its own seeded file order, every row tagged with its
epoch.

Why a Datasource of our own and not `read_parquet`: Ray Train starts one streaming execution per pass over a
Dataset, and each start costs ~0.2-0.6 s before the first batch (measured on 2 cores: 0.17-0.2 s even with
tiny blocks), which at 2,048 rows an epoch is a quarter of the epoch. Reading several epochs per execution pays
that once for all of them. `read_parquet` cannot say which copy of a file a row came from, so it cannot tag
epochs, and its file shuffle reseeds by execution only. Here the read tasks are made when an execution starts
(Ray calls `get_read_tasks` with the Dataset's context, which counts its executions), in epoch order, so the
epochs stream one after the other.

Execution x of a training Dataset reads epochs `first_epoch + x*K .. + K-1` (K = epochs_per_pass); `skip` drops
records a resumed run already consumed, from the first execution only. With `advance=False` every execution
reads the one epoch `first_epoch` (evaluation: the same rows each time).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from facediff.data.stream.bad_records import SHARD_FILE_COLUMN

EPOCH_COLUMN = "epoch"


def file_order(num_files: int, seed: int, epoch: int) -> list[int]:
    """The order files are read in for one epoch: a permutation seeded by (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(num_files).tolist()


def _read_row_groups(path: str, groups: list[int], columns: list[str] | None, epoch: int,
                     skip: np.ndarray | None) -> Iterable[pa.Table]:
    table = pq.ParquetFile(path).read_row_groups(groups, columns=columns)
    if skip is not None and len(skip):
        table = table.filter(pc.invert(pc.is_in(table["id"], value_set=pa.array(skip, type=pa.int64()))))
    table = table.append_column(EPOCH_COLUMN, pa.array(np.full(table.num_rows, epoch, dtype=np.int64)))
    # which file each row came from, for the decode step to name a record that does not decode (`bad_records`);
    # dictionary-encoded: one string per read task, not per row
    files = pa.DictionaryArray.from_arrays(pa.array(np.zeros(table.num_rows, dtype=np.int32)), pa.array([path]))
    yield table.append_column(SHARD_FILE_COLUMN, files)


class ShardPasses(Datasource):
    """Read tasks of about `rows_per_task` rows (whole Parquet row groups of one file) for the epochs of each
    execution; see the module docstring."""

    def __init__(self, paths: list[str], *, columns: list[str] | None, rows_per_task: int, seed: int,
                 shuffle: bool, first_epoch: int, epochs_per_pass: int = 1, advance: bool = True,
                 skip: dict[int, Iterable[int]] | None = None):
        super().__init__()
        if epochs_per_pass < 1 or (not advance and epochs_per_pass != 1):
            raise ValueError(f"epochs_per_pass must be >= 1 (1 for a fixed epoch), got {epochs_per_pass}")
        self.paths, self.columns = list(paths), columns
        self.seed, self.shuffle = seed, shuffle
        self.first_epoch, self.epochs_per_pass, self.advance = first_epoch, epochs_per_pass, advance
        self.skip = {int(e): np.array(sorted(ids), dtype=np.int64) for e, ids in (skip or {}).items() if ids}
        # per file, its read tasks as (row groups, rows, bytes), planned once from the files' footers
        self.tasks_per_file = [self._plan_file(path, max(1, rows_per_task)) for path in self.paths]

    def _plan_file(self, path: str, rows_per_task: int) -> list[tuple[list[int], int, int]]:
        try:
            meta = pq.ParquetFile(path).metadata
        except (OSError, pa.ArrowException) as err:  # pyarrow's message does not say which file
            raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
        tasks, groups, rows, size = [], [], 0, 0
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            groups, rows, size = groups + [g], rows + group.num_rows, size + group.total_byte_size
            if rows >= rows_per_task:
                tasks.append((groups, rows, size))
                groups, rows, size = [], 0, 0
        if groups:
            tasks.append((groups, rows, size))
        return tasks

    def epochs(self, execution: int) -> list[int]:
        """The data epochs execution `execution` reads, in order."""
        if not self.advance:
            return [self.first_epoch]
        start = self.first_epoch + execution * self.epochs_per_pass
        return list(range(start, start + self.epochs_per_pass))

    def num_tasks(self) -> int:
        return len(self.epochs(0)) * sum(len(tasks) for tasks in self.tasks_per_file)

    def estimate_inmemory_data_size(self) -> int:
        return len(self.epochs(0)) * sum(size for tasks in self.tasks_per_file for _, _, size in tasks)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        # Ray also calls this without a context, to count the tasks while planning: any execution has as many
        execution = int(getattr(data_context, "_execution_idx", 0)) if data_context is not None else 0
        read_tasks = []
        for epoch in self.epochs(execution):
            skip = self.skip.get(epoch) if execution == 0 else None
            order = file_order(len(self.paths), self.seed, epoch) if self.shuffle else range(len(self.paths))
            for f in order:
                path = self.paths[f]
                for groups, rows, size in self.tasks_per_file[f]:
                    metadata = BlockMetadata(num_rows=rows, size_bytes=size, input_files=[path], exec_stats=None)
                    read_tasks.append(ReadTask(partial(_read_row_groups, path, groups, self.columns, epoch, skip),
                                               metadata, per_task_row_limit=per_task_row_limit))
        return read_tasks


def epochs_per_pass(configured: int | None, rows: int, min_rows: int = 65_536, most: int = 8) -> int:
    """`data.epochs_per_pass`, or by default enough epochs for `min_rows` rows a pass, at most `most` (which
    bounds the ids a checkpoint keeps for the pass in progress): the 2,700-face split reads 8 epochs a pass,
    the 27k-face one 3."""
    if configured is not None:
        return configured
    return max(1, min(most, math.ceil(min_rows / max(1, rows))))
