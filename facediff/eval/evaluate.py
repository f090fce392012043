"""Image-distance evaluation of a model against a held-out split, in training (`Evaluator`) and standalone
(`runs.evaluate`). Like k-diffusion's evaluation it is handed what to sample with (a task) and what to compare
against (a batch source); it imports nothing from the trainer (`Evaluator.evaluate` is handed the EMA).

Generation follows the test records: records are dealt to ranks by id and each rank draws one image per
record (conditioned on that record for conditional families), so samples are made on all workers and the
metric's states are gathered across ranks by torchmetrics when `compute()` runs. Each batch has its own seed
(eval seed, step, rank, batch index).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from facediff.config.schema import ExperimentConfig
from facediff.data.hashing import owned_by
from facediff.data.stream.dataset import iter_train_batches
from facediff.eval.build import build_metrics
from facediff.eval.real_stats import use_real_cache
from facediff.models.weights import copy_weights
from facediff.rng import batch_generator
from facediff.tasks import DiffusionTask, build_task


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
    mask_metric=None,
) -> dict[str, float]:
    """Feed the real test images (unless already in the metric) and generated ones: one per test record
    (conditioned on it), or `eval.num_samples` in all; with `attribute_metric`, also read the conditioned
    attributes back from the generated images; with `people_metric`, also face rate, confidence and the face-crop
    distance (real crops at the records' face boxes); with `mask_metric` (`runs/mask_adherence.py`), also segment
    real and generated images against the records' part masks.

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
                if not metric.real_from_cache:
                    metric.update_real(real)
                if people_metric is not None:
                    pick = mine.to(batch["face_boxes"].device)
                    people_metric.update_real(real, batch["face_boxes"][pick], batch["face_valid"][pick])
                if mask_metric is not None:
                    mask_metric.update_real(real, batch["part_masks"][mine.to(batch["part_masks"].device)])
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
            if mask_metric is not None:
                mask_metric.update_fake(fake, cut["part_masks"])  # the masks it was conditioned on
        if quota is None or made >= quota or owned == 0:
            break
    result = metric.compute_all(e.bootstrap, e.seed)  # a collective when torch.distributed is initialised
    metric.reset_fake()
    if attribute_metric is not None:
        result.update(attribute_metric.compute())  # a collective too
        attribute_metric.reset()
    if people_metric is not None:
        result.update(people_metric.compute())  # a collective too
        people_metric.reset_fake()
    if mask_metric is not None:
        result.update(mask_metric.compute())
        mask_metric.reset_fake()
    return result


class Evaluator:
    """In-training evaluation on every Ray Train worker with the EMA weights."""

    def __init__(self, cfg: ExperimentConfig, test_shard, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.metrics = build_metrics(cfg, device)  # states on the worker's device: compute() all-gathers them
        use_real_cache(self.metrics.distance, cfg.data.path, cfg.data.eval_split, cfg.data.image_size, rank)
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
        m = self.metrics
        result = evaluate_task(self.task, self.cfg, self._batches, m.distance, step, self.rank, self.world,
                               feed_real=not self.real_done, attribute_metric=m.attributes, people_metric=m.people)
        self.real_done = True
        return result
