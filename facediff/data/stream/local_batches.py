"""A split's batches read in this process with pyarrow, decoded as training decodes them (no Ray): what
standalone evaluation, `facediff sample`'s record conditions, the demo and `fit-autoencoder` read."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pyarrow.parquet as pq
import torch

from facediff.config.schema import ExperimentConfig
from facediff.data.stream.batch import finish_batch, part_group_table
from facediff.data.shards import shard_paths
from facediff.data.stream.bad_records import SHARD_FILE_COLUMN
from facediff.data.stream.dataset import decode_batch


def local_test_batches(cfg: ExperimentConfig, split: str | None = None) -> Callable[[], Iterable[dict]]:
    """Batches of `eval.batch_size` records of `split` (default `data.eval_split`), in file order, unflipped."""
    d = cfg.data
    paths = shard_paths(d.path, split or d.eval_split)
    groups = d.resolved_part_groups()
    table = None if groups is None else part_group_table(groups)

    def batches():
        for path in paths:
            for record_batch in pq.ParquetFile(path).iter_batches(batch_size=cfg.eval.batch_size):
                columns = {name: np.asarray(record_batch.column(name).to_pylist(), dtype=object)
                           for name in record_batch.schema.names}
                columns[SHARD_FILE_COLUMN] = np.full(record_batch.num_rows, path, dtype=object)  # names a bad record
                decoded = decode_batch(columns, image_size=d.image_size, hflip=False, seed=0, epoch=0)
                yield finish_batch({k: torch.as_tensor(v) for k, v in decoded.items() if k != "split"},
                                   groups, part_table=table)

    return batches
