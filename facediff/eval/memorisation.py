"""Memorisation audit: does the model hand back its training faces? Each generated face's distance to its nearest
training face and to its nearest held-out face, in a face-embedding space (facenet-pytorch's InceptionResnetV1).

    audit = build_audit(cfg, split, device)       # embeds the training faces (capped) and the held-out split
    audit.update(generated)                       # per batch of samples in [-1, 1]
    audit.compute() -> {"memorisation_fraction", "memorisation_threshold", ...}
    audit.save_pairs(cfg, path)                   # PNG: the closest generated / training pairs side by side

The number: a held-out face was never trained on, so its distance to the nearest training face is what "a new
face that merely looks like the data" measures. The threshold is the 1st percentile of those held-out distances;
`memorisation_fraction` is the share of generated faces closer than that to some training face. A model that
generalises sits near 0.01 or below; one that copies its training set near 1 (docs/evaluation.md#memorisation).

The training and held-out embeddings are cached beside the dataset like the real features of the image distance
(`eval/real_stats.py`), keyed also by the embedder's weights and the training cap: each split is embedded once.

Embeddings: the VGGFace2 weights (`eval.face_embedding_weights`, or facenet-pytorch's file in the torch hub cache);
without them a seeded random-init InceptionResnetV1, labelled `random_init` everywhere the number is shown: it
still finds exact and near-exact copies, but its distances say little about identity.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from facediff.config.schema import ExperimentConfig
from facediff.data.stream.local_batches import local_test_batches
from facediff.eval.metrics import file_digest, to_uint8, warn_once
from facediff.eval.real_stats import RealFeaturesKey, cached_features
from facediff.models.perceptual import RANDOM_INIT_SEED, VGGFACE2_CLASSES, VGGFACE2_FILE, _hub_file, _read_state_dict
from facediff.rng import seeded_build

log = logging.getLogger(__name__)

FACE_SIZE = 160  # InceptionResnetV1's input size
HELDOUT_PERCENTILE = 1.0
PAIRS = 8  # closest generated / training pairs in the PNG
PAIRS_FILE = "memorisation_pairs.png"
FALLBACK_CAVEAT = ("fallback features: random-init InceptionResnetV1, no VGGFace2 weights; it finds copies, not "
                   "look-alikes; name the weights with eval.face_embedding_weights")


class FaceEmbedder(torch.nn.Module):
    """L2-normalised 512-d InceptionResnetV1 embeddings of whole images in [-1, 1] (resized to 160 px).
    `features`: `vggface2`, the weights file's path, or `random_init` (the labelled fallback); `identity`: what
    the embedding cache is keyed by (the weights file's digest, or the fallback's seed and torch version)."""

    def __init__(self, weights: str | None = None):
        super().__init__()
        from facenet_pytorch import InceptionResnetV1

        if weights is None and _hub_file(VGGFACE2_FILE).is_file():
            weights = "vggface2"
        elif weights is None:
            warn_once(log, ("vggface2",), "memorisation audit: no VGGFace2 weights at %s; %s",
                      _hub_file(VGGFACE2_FILE), FALLBACK_CAVEAT)
        state, self.features = None, "random_init"
        # a seeded init is the same network only under the same torch: its version is part of the identity
        self.identity = f"inception_resnet_v1-random_init-seed{RANDOM_INIT_SEED}-torch{torch.__version__}"
        if weights not in (None, "random"):  # read first: a wrong path fails before the network is built
            published = weights == "vggface2"
            path = _hub_file(VGGFACE2_FILE) if published else Path(weights).expanduser()
            state = _read_state_dict(path, "eval.face_embedding_weights (InceptionResnetV1)",
                                     "facenet-pytorch VGGFace2" if published else None)
            self.features = "vggface2" if published else str(path)
            self.identity = f"inception_resnet_v1-{file_digest(path)}"
        with seeded_build(RANDOM_INIT_SEED):
            self.net = InceptionResnetV1(pretrained=None, classify=False, num_classes=VGGFACE2_CLASSES)
        if state is not None:
            try:
                self.net.load_state_dict(state)
            except RuntimeError as err:  # another network's weights: one line, not a traceback
                raise ValueError(f"eval.face_embedding_weights={weights}: not an InceptionResnetV1 state_dict "
                                 f"({str(err).splitlines()[0]}); name facenet-pytorch's VGGFace2 file") from None
        self.net.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = images.float().clamp(-1, 1)
        if x.shape[-1] != FACE_SIZE or x.shape[-2] != FACE_SIZE:
            x = F.interpolate(x, size=(FACE_SIZE, FACE_SIZE), mode="bilinear", align_corners=False, antialias=True)
        return self.net(x)  # facenet's own input range is (x - 127.5) / 128, i.e. about [-1, 1]; it normalises


def embed_split(embedder: FaceEmbedder, batches, cap: int | None = None) -> Tensor:
    """The embeddings of a split's first `cap` records (all with None), in file order."""
    device = next(embedder.parameters()).device
    out, count = [], 0
    for batch in batches():
        images = batch["image"][: None if cap is None else cap - count]
        out.append(embedder(images.to(device)).cpu())
        count += len(images)
        if cap is not None and count >= cap:
            break
    return torch.cat(out) if out else torch.zeros(0, 512)


def embed_cached(embedder: FaceEmbedder, cfg: ExperimentConfig, split: str, cap: int | None = None) -> Tensor:
    """`embed_split` of the split's first `cap` records, cached beside the dataset (key: manifest hash, split,
    cap, the embedder's identity, data.image_size): computed once, read back by every later audit."""
    key = RealFeaturesKey(str(cfg.data.path), split, embedder.identity, cfg.data.image_size, cap)

    def embed() -> Tensor:
        log.info("memorisation audit: embedding split %r%s once, cached in %s", split,
                 "" if cap is None else f" (first {cap} records)", key.path)
        return embed_split(embedder, local_test_batches(cfg, split), cap)

    return cached_features(key, embed)


def nearest(queries: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    """Per query the Euclidean distance to its nearest key and that key's index."""
    return torch.cdist(queries.double(), keys.double()).min(dim=1)


class MemorisationAudit:
    """Generated faces against the training and held-out embeddings; keeps the `pairs` closest samples' pixels."""

    def __init__(self, embedder: FaceEmbedder, train: Tensor, heldout: Tensor, pairs: int = PAIRS):
        if len(train) < 1 or len(heldout) < 1:
            raise ValueError(f"the memorisation audit needs training and held-out faces, got {len(train)} and "
                             f"{len(heldout)}")
        self.embedder, self.train, self.heldout, self.pairs = embedder, train, heldout, pairs
        heldout_to_train, _ = nearest(heldout, train)
        self.heldout_to_train = heldout_to_train
        self.threshold = float(np.percentile(heldout_to_train.numpy(), HELDOUT_PERCENTILE))
        self.to_train: list[Tensor] = []
        self.to_heldout: list[Tensor] = []
        self.closest: list[tuple[float, int, np.ndarray]] = []  # (distance, training index, generated HWC uint8)

    @torch.no_grad()
    def update(self, images: Tensor) -> None:
        embedded = self.embedder(images.to(next(self.embedder.parameters()).device)).cpu()
        to_train, index = nearest(embedded, self.train)
        self.to_train.append(to_train)
        self.to_heldout.append(nearest(embedded, self.heldout)[0])
        pixels = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
        for k in torch.argsort(to_train)[: self.pairs].tolist():
            self.closest.append((float(to_train[k]), int(index[k]), pixels[k]))
        self.closest = sorted(self.closest, key=lambda c: c[0])[: self.pairs]

    def compute(self) -> dict[str, float]:
        to_train = torch.cat(self.to_train) if self.to_train else torch.zeros(0, dtype=torch.float64)
        to_heldout = torch.cat(self.to_heldout) if self.to_heldout else torch.zeros(0, dtype=torch.float64)

        def median(values: Tensor) -> float:
            return float(values.median()) if len(values) else math.nan

        return {
            "memorisation_fraction": float((to_train < self.threshold).double().mean()) if len(to_train) else math.nan,
            "memorisation_threshold": self.threshold,
            "memorisation_median_to_train": median(to_train),  # generated -> nearest training face
            "memorisation_median_to_heldout": median(to_heldout),  # generated -> nearest held-out face
            "memorisation_heldout_median_to_train": median(self.heldout_to_train),  # the reference
        }

    def describe(self, train_cap: int | None) -> dict:
        """The audit's protocol, saved in evaluation.json beside the numbers."""
        return {"features": self.embedder.features, "train_faces": len(self.train), "train_cap": train_cap,
                "heldout_faces": len(self.heldout), "samples": sum(len(t) for t in self.to_train),
                "heldout_percentile": HELDOUT_PERCENTILE, "face_size": FACE_SIZE}

    def save_pairs(self, train_batches, path: str | Path) -> Path | None:
        """The closest generated / nearest-training pairs, one pair a row, closest first; None without samples."""
        from facediff.viz import labelled_grid

        if not self.closest:
            return None
        wanted = {index for _, index, _ in self.closest}
        found, seen = {}, 0
        for batch in train_batches():  # the same file order `embed_split` read: index k is the k-th record
            for image in to_uint8(batch["image"]).permute(0, 2, 3, 1).numpy():
                if seen in wanted:
                    found[seen] = image
                seen += 1
            if len(found) == len(wanted):
                break
        tiles = [tile for _, index, generated in self.closest for tile in (generated, found[index])]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        labelled_grid(np.stack(tiles), ncols=2, column_labels=["generated", "nearest train"]).save(path)
        return path


def train_batches(cfg: ExperimentConfig):
    """The training split's records in file order (the split the run trained on)."""
    return local_test_batches(cfg, cfg.data.train_split)


def build_audit(cfg: ExperimentConfig, heldout_split: str | None, device: torch.device | str) -> MemorisationAudit:
    """Embed the run's training split (the first `eval.memorisation_train_cap` records) and the held-out split, or
    read them from the cache beside the dataset."""
    heldout_split = heldout_split or cfg.data.eval_split
    if heldout_split == cfg.data.train_split:
        raise ValueError(f"--memorisation: the held-out split {heldout_split!r} is the training split "
                         f"(data.train_split); evaluate against a split the model never trained on")
    embedder = FaceEmbedder(cfg.eval.face_embedding_weights).to(device)
    train = embed_cached(embedder, cfg, cfg.data.train_split, cfg.eval.memorisation_train_cap)
    heldout = embed_cached(embedder, cfg, heldout_split)
    return MemorisationAudit(embedder, train, heldout)


def memorisation_line(evaluation: dict) -> str:
    """`memorisation 0.0125 (of 300 samples closer to a training face than 99% of held-out faces are; ...)`."""
    r, m = evaluation["results"], evaluation["memorisation"]
    features = FALLBACK_CAVEAT if m["features"] == "random_init" else f"features {m['features']}"
    pairs = f"; closest pairs in {m['pairs_png']}" if m.get("pairs_png") else ""
    return (f"memorisation {r['memorisation_fraction']:.4g} (of {m['samples']} samples, the share closer to one of "
            f"{m['train_faces']} training faces than {HELDOUT_PERCENTILE:g}% of {m['heldout_faces']} held-out faces "
            f"are: distance {r['memorisation_threshold']:.4g}; median nearest-training distance "
            f"{r['memorisation_median_to_train']:.4g}, held-out {r['memorisation_heldout_median_to_train']:.4g}; "
            f"{features}{pairs})")


class Audited:
    """A task whose samples also go to the audit, so the audit sees exactly the samples the distance scores
    (`evaluate_task` only calls `sample`)."""

    def __init__(self, task, audit: MemorisationAudit):
        self.task, self.audit = task, audit

    def sample(self, *args, **kwargs) -> Tensor:
        images = self.task.sample(*args, **kwargs)
        self.audit.update(images)
        return images


def save_pairs_beside(audit: MemorisationAudit, cfg: ExperimentConfig, source: dict, out: Path | None) -> str | None:
    """The pairs PNG beside the evaluation JSON: beside `out`, else in the run (local or remote) or export folder;
    None for an untrained config without `out` (no folder of its own), as `protocol.save` does."""
    from facediff.storage import RunStorage, is_remote

    if out is None and source["kind"] == "untrained config":
        return None
    if out is None and is_remote(source["path"]):
        parent, _, name = source["path"].rstrip("/").rpartition("/")
        storage = RunStorage(parent, name)
        if audit.save_pairs(train_batches(cfg), storage.local / PAIRS_FILE) is None:
            return None
        storage.push(PAIRS_FILE)
        return f"{storage.uri}/{PAIRS_FILE}"
    target = (Path(out).parent if out is not None else Path(source["path"])) / PAIRS_FILE
    saved = audit.save_pairs(train_batches(cfg), target)
    return None if saved is None else str(saved)
