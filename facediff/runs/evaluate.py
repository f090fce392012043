"""`facediff evaluate RUN`: a run's (or export's) model against a split, in this process, without Ray."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq

from facediff.config.schema import ExperimentConfig
from facediff.data.stream.local_batches import local_test_batches
from facediff.data.shards import MANIFEST, shard_paths
from facediff.eval import memorisation as memorisation_audit
from facediff.eval import protocol
from facediff.eval.build import build_metrics
from facediff.eval.real_stats import use_real_cache
from facediff.eval.evaluate import evaluate_task
from facediff.runs.load import load_model_and_source, resolve_device
from facediff.runs.mask_adherence import build_mask_adherence


def evaluate_run(path: str | Path, split: str | None = None, overrides: list[str] = (), device: str = "auto",
                 announce: Callable[[dict, str], None] | None = None, memorisation: bool = False,
                 out: Path | None = None) -> dict:
    """The run's (or export's) EMA model against a split, on `device` ("auto": the GPU when there is one).
    Returns the evaluation record (`protocol.record`: metric, value, every result, the protocol, overrides, date,
    commit); `announce(protocol, metric)` is called before sampling. `memorisation`: also the memorisation audit
    of the same samples (its numbers in the results, its protocol under "memorisation", its closest pairs in a PNG
    beside `out` or in the evaluated folder). `eval.mask_segmenter` (mask models): also the samples' mask mIoU."""
    records, masks, target = {}, {}, resolve_device(device)

    def enough_records(cfg: ExperimentConfig) -> None:  # Fréchet distances need two images a side
        name = split or cfg.data.eval_split
        count = sum(pq.ParquetFile(p).metadata.num_rows for p in shard_paths(cfg.data.path, name))
        if count < 2:
            raise ValueError(f"{Path(cfg.data.path) / MANIFEST}: split {name!r} holds {count} record(s), the image "
                             "distance needs at least 2; evaluate on a larger split (--split) or prepare the dataset "
                             "with a larger --test-size")
        records[name] = count
        masks["metric"] = build_mask_adherence(cfg, target)  # eval.mask_segmenter checked before the model loads

    cfg, task, source = load_model_and_source(path, overrides, check=enough_records)
    task = task.to(target)
    metrics = build_metrics(cfg, target)
    use_real_cache(metrics.distance, cfg.data.path, split or cfg.data.eval_split, cfg.data.image_size)
    name = split or cfg.data.eval_split
    described = protocol.describe(cfg, name, records[name], source, str(target))
    if masks["metric"] is not None:
        described["mask_segmenter"] = masks["metric"].source
    # before the protocol is printed: a bad weights path or split fails before anything is announced
    audit = memorisation_audit.build_audit(cfg, split, target) if memorisation else None
    if announce is not None:
        announce(described, metrics.distance.name)
    results = evaluate_task(task if audit is None else memorisation_audit.Audited(task, audit), cfg,
                            local_test_batches(cfg, split), metrics.distance,
                            attribute_metric=metrics.attributes, people_metric=metrics.people,
                            mask_metric=masks["metric"])
    if audit is not None:
        results.update(audit.compute())
    evaluation = protocol.record(described, metrics.distance.name, results, list(overrides))
    if audit is not None:
        evaluation["memorisation"] = {**audit.describe(cfg.eval.memorisation_train_cap),
                                      "pairs_png": memorisation_audit.save_pairs_beside(audit, cfg, source, out)}
    return evaluation
