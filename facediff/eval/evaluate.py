"""Image-distance evaluation of a model against a held-out split, in training and standalone.

Generation follows the test records: records are dealt to ranks by id and each rank draws one image per
record (conditioned on that record for conditional families), so samples are made on all workers and the
metric's states are gathered across ranks by torchmetrics when `compute()` runs. Each batch has its own seed
(eval seed, step, rank, batch index).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from facediff.config.schema import ExperimentConfig
from facediff.data.bad_records import SHARD_FILE_COLUMN
from facediff.data.shards import MANIFEST, shard_paths
from facediff.data.batch import finish_batch, part_group_table
from facediff.data.stream import decode_batch, iter_train_batches
from facediff.eval.metrics import build_image_distance
from facediff.sampling import batch_generator
from facediff.tasks import DiffusionTask, build_task
from facediff.train.distributed import owned_by
from facediff.train.ema import copy_weights


def build_attribute_metric(cfg: ExperimentConfig):
    """Attribute-control accuracy for conditional families (None otherwise, or when `eval.attribute_accuracy` is
    off). The reader is trained on the first call for a dataset and image size, then read from its cache."""
    if cfg.model.family != "lc_unet" or not cfg.eval.attribute_accuracy:
        return None
    from facediff.eval.attributes import AttributeAccuracy, load_or_train_attribute_reader

    return AttributeAccuracy(load_or_train_attribute_reader(cfg.data.path, cfg.data.image_size, progress=False))


def build_people_metric(cfg: ExperimentConfig):
    """Face rate, confidence and face-crop distance for the people family (None otherwise)."""
    if cfg.model.family != "controlnet":
        return None
    from facediff.eval.people import PeopleMetric

    return PeopleMetric(build_image_distance(cfg.eval))


def evaluate_task(
    task: DiffusionTask,
    cfg: ExperimentConfig,
    batches: Callable[[], Iterable[dict[str, torch.Tensor]]],
    metric,
    step: int = 0,
    rank: int = 0,
    world: int = 1,
    feed_real: bool = True,
    attribute_metric=None,
    people_metric=None,
) -> dict[str, float]:
    """Feed the real test images (unless already in the metric) and generated ones: one per test record
    (conditioned on it), or `eval.num_samples` in all; with `attribute_metric`, also read the conditioned
    attributes back from the generated images; with `people_metric`, also face rate, confidence and the face-crop
    distance (real crops at the records' face boxes).

    Records are dealt to ranks by id (`owned_by`), never by stream position: every rank iterates the whole split
    in its own order, and each record is real data and a condition on exactly one rank. `eval.num_samples` is
    shared out as evenly as ranks allow; a rank cycles through its records when its share exceeds them."""
    e = cfg.eval
    quota = None if e.num_samples is None else e.num_samples // world + (rank < e.num_samples % world)
    made, batch_index = 0, 0
    for epoch in range(10**6):
        owned = 0
        for batch in batches():
            mine = owned_by(batch["id"], rank, world)
            owned += int(mine.sum())
            if not mine.any():
                continue
            if epoch == 0 and feed_real:
                real = batch["image"][mine.to(batch["image"].device)].float()
                metric.update_real(real)
                if people_metric is not None:
                    pick = mine.to(batch["face_boxes"].device)
                    people_metric.update_real(real, batch["face_boxes"][pick], batch["face_valid"][pick])
            if quota is None:
                take = int(mine.sum()) if epoch == 0 else 0
            else:
                take = max(0, min(int(mine.sum()), quota - made))
            if take == 0:
                continue
            rows = mine.nonzero().squeeze(1)[:take]
            cut = {k: v[rows.to(v.device)] for k, v in batch.items()}
            batch_index += 1
            generator = batch_generator(e.seed, step, rank, batch_index)
            fake = task.sample(take, generator, e.sampler, e.steps, cut)
            made += take
            metric.update_fake(fake)
            if attribute_metric is not None:
                attribute_metric.update(fake, cut["attributes"])
            if people_metric is not None:
                people_metric.update_fake(fake)
        if quota is None or made >= quota or owned == 0:
            break
    result = {metric.name: float(metric.compute())}  # a collective when torch.distributed is initialised
    metric.reset_fake()
    if attribute_metric is not None:
        result.update(attribute_metric.compute())  # a collective too
        attribute_metric.reset()
    if people_metric is not None:
        result.update(people_metric.compute())  # a collective too
        people_metric.reset_fake()
    return result


class Evaluator:
    """In-training evaluation on every Ray Train worker with the EMA weights."""

    def __init__(self, cfg: ExperimentConfig, test_shard, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world = cfg, rank, world
        # states on the worker's device: compute() all-gathers them, and NCCL only moves GPU tensors
        self.metric = build_image_distance(cfg.eval).to(device)
        self.attribute_metric = build_attribute_metric(cfg)
        if self.attribute_metric is not None:
            self.attribute_metric = self.attribute_metric.to(device)
        self.people_metric = build_people_metric(cfg)
        if self.people_metric is not None:
            self.people_metric = self.people_metric.to(device)
            self.people_metric.crop_distance.to(device)
        self.task = build_task(cfg).eval().to(device)  # a plain copy that receives the EMA weights
        self.test_shard = test_shard
        self.real_done = False

    def _batches(self):
        return iter_train_batches(self.test_shard, self.cfg.eval.batch_size, drop_last=False,
                                  part_groups=self.cfg.data.resolved_part_groups())

    @torch.no_grad()
    def evaluate(self, ema, trained: torch.nn.Module, step: int) -> dict[str, float]:
        """Evaluate the EMA weights (or, with `eval.use_ema: false`, the trained weights themselves)."""
        if self.cfg.eval.use_ema:
            ema.gather()  # every rank evaluates: each assembles the whole average
            ema.copy_to(self.task)
        else:
            copy_weights(trained, self.task)
        # the real statistics are fixed: feed them once, keep them between evaluations
        result = evaluate_task(self.task, self.cfg, self._batches, self.metric, step, self.rank, self.world,
                               feed_real=not self.real_done, attribute_metric=self.attribute_metric,
                               people_metric=self.people_metric)
        self.real_done = True
        return result


def local_test_batches(cfg: ExperimentConfig, split: str | None = None) -> Callable[[], Iterable[dict]]:
    """Test batches read in-process with pyarrow (standalone evaluation needs no Ray)."""
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


def evaluate_run(path: str | Path, split: str | None = None, overrides: list[str] = (), device: str = "auto",
                 announce: Callable[[dict, str], None] | None = None) -> dict:
    """`facediff evaluate RUN`: the run's (or export's) EMA model against a split, in this process, on `device`
    ("auto": the GPU when there is one). Returns the evaluation record (`protocol.record`: metric, value, every
    result, the protocol, overrides, date, commit); `announce(protocol, metric)` is called before sampling."""
    from facediff.eval import protocol
    from facediff.sampling import load_model_and_source, resolve_device

    records = {}

    def enough_records(cfg: ExperimentConfig) -> None:  # Fréchet distances need two images a side
        name = split or cfg.data.eval_split
        count = sum(pq.ParquetFile(p).metadata.num_rows for p in shard_paths(cfg.data.path, name))
        if count < 2:
            raise ValueError(f"{Path(cfg.data.path) / MANIFEST}: split {name!r} holds {count} record(s), the image "
                             "distance needs at least 2; evaluate on a larger split (--split) or prepare the dataset "
                             "with a larger --test-size")
        records[name] = count

    target = resolve_device(device)
    cfg, task, source = load_model_and_source(path, overrides, check=enough_records)
    task = task.to(target)
    metric = build_image_distance(cfg.eval).to(target)
    attribute_metric = build_attribute_metric(cfg)
    if attribute_metric is not None:
        attribute_metric = attribute_metric.to(target)
    people_metric = build_people_metric(cfg)
    if people_metric is not None:
        people_metric = people_metric.to(target)
        people_metric.crop_distance.to(target)
    name = split or cfg.data.eval_split
    described = protocol.describe(cfg, name, records[name], source, str(target))
    if announce is not None:
        announce(described, metric.name)
    results = evaluate_task(task, cfg, local_test_batches(cfg, split), metric, attribute_metric=attribute_metric,
                            people_metric=people_metric)
    return protocol.record(described, metric.name, results, list(overrides))
