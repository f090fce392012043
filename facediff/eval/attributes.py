"""Attribute-control accuracy: read the requested attributes back from generated faces, report balanced accuracy.

    reader = load_or_train_attribute_reader(cfg.data.path, image_size=64)  # trained once, cached by the dataset
    metric = AttributeAccuracy(reader)
    metric.update(generated_images, requested_attributes)  # images in [-1, 1], attributes (B, 40) in {0, 1}
    metric.compute()  # {"attr_acc": 0.93, "attr_acc/Eyeglasses": 0.99, ...}

The reader is a small CNN trained on a prepared dataset's train split to predict the visible attributes
(`VISIBLE_ATTRIBUTES` of the synthetic faces by default; any CelebA attribute names work for real CelebAMask-HQ
shards). Its loss weighs positives by negatives/positives per attribute, so rare attributes are not simply
predicted absent. It is cached under `<dataset>/attribute_reader/<size>px/` (model.safetensors + reader.json,
written to a temporary folder and renamed) and reused when the attribute list, steps and seed match.

Balanced accuracy, (TPR + TNR) / 2 per attribute, is 0.5 for any reader whose outputs ignore the condition,
whatever the attribute's prevalence (plain accuracy would reward always answering "absent" for a 5% attribute).
An attribute whose requested values hold only one class in the evaluated set has no balanced accuracy: it is
reported as NaN and left out of the mean `attr_acc`.

Distributed: the confusion counts are torchmetrics states with `dist_reduce_fx="sum"`, so `compute()` gathers
them across ranks like the FID metric (every rank must call it).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn.functional import interpolate
from torchmetrics import Metric

from facediff.data.celebamask import ATTRIBUTE_NAMES
from facediff.data.shards import shard_paths
from facediff.data.synthetic.celebamask import VISIBLE_ATTRIBUTES

log = logging.getLogger(__name__)
CACHE_DIR = "attribute_reader"
WEIGHTS, META = "model.safetensors", "reader.json"


class AttributeReader(nn.Module):
    """Images (B, 3, S, S) in [-1, 1] -> one logit per attribute. Three conv stages halve the size each; a 4x4
    grid of pooled features keeps *where* things are (bangs vs. a hat, a beard vs. a collar)."""

    def __init__(self, attributes: Sequence[str], image_size: int, width: int = 32):
        super().__init__()
        unknown = [a for a in attributes if a not in ATTRIBUTE_NAMES]
        if unknown or not attributes:
            raise ValueError(f"unknown or no attribute names {unknown}; known: {list(ATTRIBUTE_NAMES)}")
        self.attributes, self.image_size, self.width = tuple(attributes), int(image_size), int(width)
        self.register_buffer("index", torch.tensor([ATTRIBUTE_NAMES.index(a) for a in attributes]), persistent=False)

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                    nn.Conv2d(cout, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = self.width
        self.net = nn.Sequential(*block(3, w), *block(w, 2 * w), *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(4),
                                 nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * w * 16, len(attributes)))

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                 antialias=True, align_corners=False)
        return self.net(images.clamp(-1, 1))

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """(B, A) bool: whether each attribute is read as present (logit > 0)."""
        was_training = self.training
        self.eval()
        logits = self(images.to(next(self.parameters()).device, torch.float32))
        self.train(was_training)
        return logits > 0

    def save(self, folder: str | Path, extra: dict | None = None) -> Path:
        """model.safetensors + reader.json into `folder`, atomically (a temporary sibling, then a rename)."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.partial"
        staging.mkdir()
        try:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(staging / WEIGHTS))
            meta = {"attributes": list(self.attributes), "image_size": self.image_size, "width": self.width,
                    **(extra or {})}
            (staging / META).write_text(json.dumps(meta, indent=2))
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> AttributeReader:
        folder = Path(folder)
        for name in (META, WEIGHTS):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name}: attribute reader file missing")
        meta = json.loads((folder / META).read_text())
        reader = cls(meta["attributes"], meta["image_size"], meta.get("width", 32))
        state = load_file(str(folder / WEIGHTS))  # safetensors: tensors only, no pickled code
        missing, unexpected = reader.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder / WEIGHTS}: weights do not fit the reader in {META}: "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        reader.meta = meta
        return reader.eval()


# ------------------------------------------------------------------------------------------------- data
def read_split(dataset: str | Path, split: str, image_size: int) -> tuple[Tensor, Tensor]:
    """All images (N, 3, S, S) float in [-1, 1] and attributes (N, 40) of a prepared split, decoded in process
    (a few thousand small images per second; no Ray needed)."""
    images, attributes = [], []
    for path in shard_paths(Path(dataset), split):
        for row in pq.read_table(path, columns=["image", "attributes"]).to_pylist():
            image = Image.open(io.BytesIO(row["image"])).convert("RGB")
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
            images.append(np.asarray(image))
            attributes.append(row["attributes"])
    if not images:
        raise ValueError(f"{dataset}: split {split!r} has no records")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.tensor(attributes, dtype=torch.float32)


def train_attribute_reader(
    dataset: str | Path,
    image_size: int,
    attributes: Sequence[str] = VISIBLE_ATTRIBUTES,
    steps: int = 600,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 2e-3,
    width: int = 32,
    split: str = "train",
    progress: bool = True,
) -> AttributeReader:
    """Train a reader on a prepared split (random flips and shifts; AdamW with a cosine decay); returns it in
    eval mode. Progress lines every fifth of the steps."""
    torch.manual_seed(seed)
    images, all_attributes = read_split(dataset, split, image_size)
    reader = AttributeReader(attributes, image_size, width)
    targets = all_attributes[:, reader.index]
    positives = targets.sum(0)
    absent = [a for a, p, in zip(attributes, positives) if p in (0, len(targets))]
    if absent:
        log.warning("%s: attributes %s have a single class in split %r; the reader cannot learn them",
                    dataset, absent, split)
    pos_weight = ((len(targets) - positives) / positives.clamp(min=1)).clamp(0.05, 20)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optimizer = torch.optim.AdamW(reader.parameters(), lr=lr, weight_decay=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    reader.train()
    start, log_every = time.time(), max(1, steps // 5)
    for step in range(1, steps + 1):
        pick = torch.randint(len(images), (min(batch_size, len(images)),), generator=generator)
        x = images[pick]
        flip = torch.rand(len(x), generator=generator) < 0.5  # every visible attribute is left-right symmetric
        x[flip] = x[flip].flip(-1)
        # a shift of up to 1/16 of the side (faces already vary in position): fights overfitting small sets
        limit = max(1, image_size // 16)
        dy, dx = torch.randint(-limit, limit + 1, (2,), generator=generator).tolist()
        x = x.roll((dy, dx), dims=(-2, -1))
        loss = loss_fn(reader(x), targets[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress and (step % log_every == 0 or step == steps):
            print(f"[attribute reader] step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)",
                  flush=True)
    return reader.eval()


def load_or_train_attribute_reader(
    dataset: str | Path,
    image_size: int,
    attributes: Sequence[str] = VISIBLE_ATTRIBUTES,
    steps: int = 600,
    seed: int = 0,
    width: int = 32,
    eval_split: str | None = "test",
    progress: bool = True,
) -> AttributeReader:
    """The cached reader of `dataset` at `image_size`, trained (and cached) first when missing or different.

    The cache folder's reader.json also records the reader's own balanced accuracy on real faces of
    `eval_split` (`real_attr_acc`): the ceiling that generated faces are compared with.
    """
    folder = Path(dataset) / CACHE_DIR / f"{image_size}px"
    wanted = {"attributes": list(attributes), "image_size": image_size, "steps": steps, "seed": seed,
              "width": width}
    if (folder / META).is_file():
        meta = json.loads((folder / META).read_text())
        if all(meta.get(k) == v for k, v in wanted.items()):
            return AttributeReader.load(folder)
        log.info("%s: cached attribute reader was trained differently; training a new one", folder)
    log.info("attribute reader: training it on %s at %d px (%d steps; cached for later runs)", dataset, image_size,
             steps)
    reader = train_attribute_reader(dataset, image_size, attributes, steps=steps, seed=seed, width=width,
                                    progress=progress)
    extra = {"steps": steps, "seed": seed, "dataset": str(Path(dataset).resolve())}
    if eval_split is not None:
        images, conditions = read_split(dataset, eval_split, image_size)
        metric = AttributeAccuracy(reader)
        metric.update(images, conditions)
        extra["real_attr_acc"] = metric.compute()
    reader.save(folder, extra)
    reader.meta = {**wanted, **extra}
    return reader


# ----------------------------------------------------------------------------------------------- metric
class AttributeAccuracy(Metric):
    """Per-attribute balanced accuracy of a reader's answers against the requested attributes (see module doc)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, reader: AttributeReader, batch_size: int = 256, **kwargs):
        super().__init__(**kwargs)
        self.reader = reader.eval().requires_grad_(False)
        self.batch_size = batch_size
        n = len(reader.attributes)
        for name in ("tp", "fn", "tn", "fp"):
            self.add_state(name, default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def train(self, mode: bool = True) -> AttributeAccuracy:
        super().train(mode)
        self.reader.eval()  # BatchNorm statistics stay those of training
        return self

    def update(self, images: Tensor, attributes: Tensor) -> None:
        """images (B, 3, H, W) in [-1, 1] (resized to the reader's size); attributes (B, 40) the conditions."""
        if attributes.ndim != 2 or attributes.shape[1] != len(ATTRIBUTE_NAMES) or len(attributes) != len(images):
            raise ValueError(f"attributes must be (B={len(images)}, {len(ATTRIBUTE_NAMES)}), got "
                             f"{tuple(attributes.shape)}")
        wanted = attributes[:, self.reader.index.to(attributes.device)].to(self.tp.device) > 0.5
        read = torch.cat([self.reader.predict(chunk) for chunk in images.split(self.batch_size)]).to(wanted.device)
        self.tp += (read & wanted).sum(0)
        self.fn += (~read & wanted).sum(0)
        self.tn += (~read & ~wanted).sum(0)
        self.fp += (read & ~wanted).sum(0)

    def compute(self) -> dict[str, float]:
        positives, negatives = self.tp + self.fn, self.tn + self.fp
        balanced = (self.tp / positives + self.tn / negatives) / 2  # NaN where a class is missing (0 / 0)
        balanced = torch.where((positives > 0) & (negatives > 0), balanced, torch.full_like(balanced, math.nan))
        values = {f"attr_acc/{name}": float(v) for name, v in zip(self.reader.attributes, balanced)}
        finite = balanced[~balanced.isnan()]
        return {"attr_acc": float(finite.mean()) if len(finite) else math.nan, **values}


# ----------------------------------------------------------------------------------------------- edits
def edit_rate(reader: AttributeReader, images: Tensor, before: Tensor, edits: dict[str, float]) -> float | None:
    """How often an attribute edit shows: of the records that lacked every attribute the edit switches on
    (`before`, (B, 40)), the fraction whose generated image (`images`, made with the edit applied) the reader
    reads with all of them present. None when the edit switches nothing on that the reader reads, or when no
    record lacked it (there is nothing to measure then)."""
    switched = [name for name, value in edits.items() if value > 0.5 and name in reader.attributes]
    if not switched:
        return None
    columns = torch.tensor([ATTRIBUTE_NAMES.index(name) for name in switched])
    lacking = (before[:, columns] < 0.5).all(1).cpu()
    if not lacking.any():
        return None
    read = torch.cat([reader.predict(chunk) for chunk in images[lacking.to(images.device)].split(256)]).cpu()
    present = read[:, [reader.attributes.index(name) for name in switched]].all(1)
    return float(present.float().mean())
