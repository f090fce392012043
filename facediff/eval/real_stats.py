"""The real split's features, extracted once and cached beside the dataset.

Key: (dataset manifest hash, split, feature extractor identity, image size, and for a capped split the record
count). The file is `<dataset>/real_features/<split>-<extractor>-<size>px.safetensors` (`<split>-first<N>-...` for
the first N records) with the key in its metadata; it is written
to a temporary sibling and renamed into place, and rebuilt (overwritten at the next evaluation) when the
manifest's hash no longer matches, i.e. when the dataset was prepared again. Every evaluation in training, every
Tune trial and `facediff evaluate` then feed only generated images.

Under torch.distributed the ranks decide together (a hit only if every rank found the file), and the cached
features sit on rank 0 alone: the metric's gather then yields each real vector once. `cached_features` is the
single-process form (the memorisation audit's face embeddings).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from facediff.data.shards import MANIFEST

CACHE_DIR = "real_features"


def manifest_hash(dataset: str | Path) -> str:
    return hashlib.sha256((Path(dataset) / MANIFEST).read_bytes()).hexdigest()


@dataclass(frozen=True)
class RealFeaturesKey:
    dataset: str
    split: str
    extractor: str
    image_size: int
    records: int | None = None  # only the split's first N records (file order); None = all of them

    @property
    def path(self) -> Path:
        first = "" if self.records is None else f"-first{self.records}"
        return (Path(self.dataset) / CACHE_DIR
                / f"{self.split}{first}-{self.extractor}-{self.image_size}px.safetensors")

    def metadata(self) -> dict[str, str]:
        meta = {"manifest_sha256": manifest_hash(self.dataset), "split": self.split, "extractor": self.extractor,
                "image_size": str(self.image_size)}
        return meta if self.records is None else {**meta, "records": str(self.records)}


def load_real_features(key: RealFeaturesKey) -> torch.Tensor | None:
    """The cached features, or None when there are none or they belong to another manifest (or are unreadable)."""
    try:
        with safe_open(str(key.path), "pt") as f:
            if f.metadata() != key.metadata():
                return None
        return load_file(str(key.path))["features"]
    except Exception:  # missing, truncated or foreign (safetensors raises its own errors): rebuild
        return None


def save_real_features(key: RealFeaturesKey, features: torch.Tensor) -> None:
    key.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = key.path.with_name(f"{key.path.name}.{uuid.uuid4().hex}.partial")
    try:
        save_file({"features": features.detach().float().cpu().contiguous()}, str(tmp), metadata=key.metadata())
        os.replace(tmp, key.path)
    finally:
        tmp.unlink(missing_ok=True)


def cached_features(key: RealFeaturesKey, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The features cached under `key`, else `compute()`'s, saved for the next call (one process, no ranks)."""
    features = load_real_features(key)
    if features is None:
        features = compute().detach().float().cpu()
        save_real_features(key, features)
    return features


def _every_rank(found: bool, device: torch.device) -> bool:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return found
    flag = torch.tensor([int(found)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def use_real_cache(metric, dataset: str | Path, split: str, image_size: int, rank: int = 0) -> bool:
    """Give `metric` (an ImageDistance) the cached real features (True), or tell it where to save them after its
    first compute (False). A collective under torch.distributed: call it on every rank. Metrics without an
    extractor identity (an injected feature network) are never cached."""
    if metric.extractor_id is None:
        return False
    key = RealFeaturesKey(str(dataset), split, metric.extractor_id, image_size)
    features = load_real_features(key)
    if _every_rank(features is not None, metric.device):
        if rank == 0:
            metric.add_real_features(features)
        metric.real_from_cache = True
        return True
    metric.save_real_to = key
    return False
