"""The metrics an evaluation of a config measures, built in one place for training and `facediff evaluate`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from facediff.config.schema import ExperimentConfig
from facediff.data.stream.local_batches import local_test_batches
from facediff.eval.attributes import AttributeAccuracy, load_or_train_attribute_reader
from facediff.eval.metrics import ImageDistance, build_image_distance
from facediff.eval.people import PeopleMetric
from facediff.eval.real_stats import use_real_cache


def build_attribute_metric(cfg: ExperimentConfig) -> AttributeAccuracy | None:
    """Attribute-control accuracy for conditional families (None otherwise, or when `eval.attribute_accuracy` is
    off). The reader is trained on the first call for a dataset and image size, then read from its cache."""
    if cfg.model.family != "lc_unet" or not cfg.eval.attribute_accuracy:
        return None
    return AttributeAccuracy(load_or_train_attribute_reader(cfg.data.path, cfg.data.image_size, progress=False))


def build_people_metric(cfg: ExperimentConfig) -> PeopleMetric | None:
    """Face rate, confidence and face-crop distance for the people family (None otherwise)."""
    if cfg.model.family != "controlnet":
        return None
    return PeopleMetric(build_image_distance(cfg.eval))


@dataclass
class Metrics:
    """The image distance, and the family's extra measures (None where the config has none)."""

    distance: ImageDistance
    attributes: AttributeAccuracy | None
    people: PeopleMetric | None


def build_metrics(cfg: ExperimentConfig, device: torch.device | str) -> Metrics:
    """Every metric of the config, its states on `device` (in training the worker's: `compute()` all-gathers them,
    and NCCL only moves GPU tensors)."""
    attributes, people = build_attribute_metric(cfg), build_people_metric(cfg)
    if people is not None:
        people.crop_distance.to(device)  # not a registered child: moved on its own
    return Metrics(build_image_distance(cfg.eval).to(device), None if attributes is None else attributes.to(device),
                   None if people is None else people.to(device))


def prepare_real_features(cfg: ExperimentConfig) -> bool:
    """Extract and cache the real split's features of an ExperimentConfig now, in this process: the Tune driver
    calls it before trials start in parallel (each would otherwise miss the cache and extract them itself).
    True when they were cached already."""
    metric = build_image_distance(cfg.eval)
    if use_real_cache(metric, cfg.data.path, cfg.data.eval_split, cfg.data.image_size):
        return True
    for batch in local_test_batches(cfg)():
        metric.update_real(batch["image"].float())
    metric.cache_real()
    return False
