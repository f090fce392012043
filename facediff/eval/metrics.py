"""FID and KID between real test images and generated ones (or labelled fallbacks without the Inception weights).

Features come from torch-fidelity's InceptionV3 (2048-d pool features, i.e. FID; fed uint8 and resized as
torch-fidelity resizes) when its weights are found, else from the 256-d penultimate layer of MTCNN's ONet,
whose weights ship inside facenet-pytorch (so it works offline). A fallback value is reported as
`fd_mtcnn_onet` / `kd_mtcnn_onet`, never as `fid` / `kid`: the numbers are not comparable with published ones.
The distances themselves are torch-fidelity's functions (`eval/distances.py`); intervals: `eval/bootstrap.py`.

Distributed: the feature vectors are torchmetrics list states concatenated across ranks when torch.distributed
is initialised, so EVERY rank must call `compute()` / `compute_all()` (a collective), and the states must sit on a
device the process group's backend supports (NCCL: `.to("cuda")`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import urllib.request
import uuid
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torch.nn.functional import interpolate
from torchmetrics import Metric
from torchmetrics.image.fid import NoTrainInceptionV3
from torchmetrics.utilities import dim_zero_cat

from facediff.config.schema import EvalConfig
from facediff.eval.bootstrap import bootstrap_intervals
from facediff.eval.distances import frechet_distance, kernel_distance
from facediff.eval.real_stats import save_real_features

log = logging.getLogger(__name__)

# torch-fidelity's FID Inception (the TF 2015-12-05 graph), cached by torch.hub under the URL's file name.
# pytorch-fid's `pt_inception-*` file is tried too; a file whose keys do not fit is reported and skipped.
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
DOWNLOAD_ENV = "FACEDIFF_ALLOW_DOWNLOAD"  # "0": never try to download
PROBE_TIMEOUT_S = 10.0  # DNS + TCP connect to the download host; a resolver with no network may block for long
SOCKET_TIMEOUT_S = 30.0  # per blocking read once connected


class InceptionWeightsNotFound(FileNotFoundError):
    pass


def inception_candidates(weights: str | None) -> list[Path]:
    """Where the Inception weights are looked for, in order: the configured path, then the torch hub cache."""
    cache = Path(torch.hub.get_dir()) / "checkpoints"  # $TORCH_HOME/hub/checkpoints
    return ([Path(weights).expanduser()] if weights else []) + [cache / name for name in INCEPTION_FILES]


def _reachable(url: str, timeout_s: float) -> bool:
    """True when a TCP connection to the URL's host opens within timeout_s (run in a thread: DNS has no timeout)."""
    proxy = urllib.request.getproxies().get(urlparse(url).scheme)
    parsed, ok = urlparse(proxy or url), []
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(ok)


def _download(url: str, dst: Path) -> None:
    """Fetch to a unique temporary name, then rename: ranks downloading at once never see a partial file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}.{uuid.uuid4().hex}.partial")
    try:
        with urllib.request.urlopen(url, timeout=SOCKET_TIMEOUT_S) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _inception_from(path: Path) -> nn.Module:
    # torch-fidelity torch.load()s the path with weights_only=False: only point it at trusted files
    # antialias=False: torch-fidelity's TensorFlow-1.x-compatible bilinear resize to 299 (torchmetrics' default,
    # torch's antialiased resize, moves FID by ~0.5% on the same images: docs/evaluation.md#reference)
    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                             feature_extractor_weights_path=str(path), antialias=False)
    net.num_features = 2048
    net.weights_path = str(path)  # its digest is part of the cached real features' key
    return net


def _search_inception(weights: str | None) -> tuple[nn.Module | None, list[str]]:
    """The Inception feature module and notes on every place looked at."""
    looked = []
    for path in inception_candidates(weights):
        if not path.is_file():
            looked.append(f"{path} (missing)")
            continue
        try:
            return _inception_from(path), looked
        except Exception as e:  # a truncated or foreign checkpoint: keep looking
            looked.append(f"{path} (unreadable: {type(e).__name__}: {e})")
    target = inception_candidates(None)[0]
    if os.environ.get(DOWNLOAD_ENV, "1") == "0":
        looked.append(f"{INCEPTION_URL} (not tried: {DOWNLOAD_ENV}=0)")
    elif not _reachable(INCEPTION_URL, PROBE_TIMEOUT_S):
        looked.append(f"{INCEPTION_URL} (host unreachable)")
        # one probe per job: the processes started after this one (Ray's workers, the next stage) inherit it
        os.environ[DOWNLOAD_ENV] = "0"
    else:
        try:
            _download(INCEPTION_URL, target)
            return _inception_from(target), looked
        except Exception as e:
            looked.append(f"{INCEPTION_URL} (download failed: {type(e).__name__}: {e})")
    return None, looked


_WARNED: set[tuple] = set()


def warn_once(logger: logging.Logger, key: tuple, message: str, *args) -> None:
    """`logger.warning` the first time `key` comes up in this process, `debug` after: the demo's later stages
    would repeat an earlier stage's warning word for word."""
    (logger.debug if key in _WARNED else logger.warning)(message, *args)
    _WARNED.add(key)


def load_inception(weights: str | None, fallback: str = "mtcnn_onet") -> nn.Module | None:
    """torch-fidelity's FID InceptionV3 from `weights`, the torch hub cache or (network allowing) a download;
    None, with one warning naming every place looked at, when none works."""
    module, looked = _search_inception(weights)
    if module is None:
        warn_once(log, ("inception", weights, fallback),  # once per process and setting
                  "FID Inception weights not available; looked at: %s. Falling back to %s.", "; ".join(looked),
                  "no metric" if fallback == "none" else f"{fallback} features (reported as fd_{fallback}, not fid)")
    return module


class MTCNNONetFeatures(nn.Module):
    """The 256-d dense layer of MTCNN's ONet (a face / not-face classifier) as an image feature extractor.

    Input: (N, 3, H, W) RGB, uint8 in [0, 255] or float in [0, 1]; resized to ONet's 48x48 and normalised as
    MTCNN does, (x - 127.5) / 128. The weights come from facenet-pytorch's package data (no download).
    """

    num_features = 256  # read by torchmetrics instead of a dummy forward
    size = 48

    def __init__(self):
        super().__init__()
        from facenet_pytorch.models.mtcnn import ONet

        self.onet = ONet(pretrained=True).eval().requires_grad_(False)

    def _prepare(self, images: Tensor) -> Tensor:
        x = images.float() if images.dtype == torch.uint8 else images.float() * 255.0
        x = interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return (x - 127.5) * 0.0078125

    def _trunk(self, x: Tensor) -> Tensor:
        o = self.onet
        x = o.pool1(o.prelu1(o.conv1(x)))
        x = o.pool2(o.prelu2(o.conv2(x)))
        x = o.pool3(o.prelu3(o.conv3(x)))
        x = o.prelu4(o.conv4(x))
        x = x.permute(0, 3, 2, 1).reshape(len(x), -1)  # the converted Caffe weights expect (N, W, H, C) order
        return o.prelu5(o.dense5(x))

    def forward(self, images: Tensor) -> Tensor:
        return self._trunk(self._prepare(images))

    @torch.no_grad()
    def face_probability(self, images: Tensor) -> Tensor:
        """ONet's own classifier output: P(face) per image (a check that the weights are the real ones)."""
        return self.onet.softmax6_1(self.onet.dense6_1(self.forward(images)))[:, 1]


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats (the diffusion models' range) to uint8, quantised as if the images were saved."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class _FeatureSets(Metric):
    """The real and generated feature vectors; torchmetrics concatenates them across ranks in compute()."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("real", default=[], dist_reduce_fx="cat")
        self.add_state("fake", default=[], dist_reduce_fx="cat")

    def update(self, features: Tensor, real: bool) -> None:
        (self.real if real else self.fake).append(features.float())

    def compute(self) -> tuple[Tensor, Tensor]:
        return dim_zero_cat(self.real), dim_zero_cat(self.fake)


class ImageDistance:
    """FID (or a labelled fallback Fréchet distance) and KID, real vs generated; images are (N, 3, H, W) floats
    in [-1, 1].

    Both are quantised to 8 bits first (as saved PNGs are), so real and generated images take the same path. The
    Inception module receives uint8 images (torch-fidelity requires them) and resizes them as torch-fidelity
    does; other feature modules (the ONet fallback, or an injected `feature_network`) receive floats in [0, 1].
    The features are kept (n x d floats: small at evaluation sizes), so KID and bootstrap intervals come from the
    same forward passes, and the statistics are torch-fidelity's (`eval/distances.py`). The real features survive
    `reset_fake()`: feed (or load, `eval/real_stats.py`) the fixed real set once, then only new generated sets.
    """

    def __init__(self, inception: nn.Module | None = None, fallback: str = "mtcnn_onet",
                 feature_network: nn.Module | None = None):
        if feature_network is not None:
            feature, self.name = feature_network, f"fd_{type(feature_network).__name__.lower()}"
            self.extractor_id = None  # not cached: nothing identifies an injected network's weights
        elif inception is not None:
            feature, self.name = inception, "fid"
            self.extractor_id = f"inception-{file_digest(inception.weights_path)}"
        elif fallback == "mtcnn_onet":
            feature, self.name = MTCNNONetFeatures(), "fd_mtcnn_onet"
            self.extractor_id = "mtcnn_onet"  # weights shipped inside facenet-pytorch
        elif fallback == "none":
            raise InceptionWeightsNotFound(
                "no FID Inception module and fallback_features='none'; load_inception() looks at "
                + ", ".join(map(str, inception_candidates(None))) + " (and eval.inception_weights when set)")
        else:
            raise ValueError(f"unknown fallback {fallback!r} (expected 'mtcnn_onet' or 'none')")
        # the kernel distance beside it, labelled the same way: kid for Inception features, kd_<name> otherwise
        self.kernel_name = "kid" if self.name == "fid" else "kd_" + self.name[len("fd_"):]
        self._uint8_input = self.name == "fid"
        self.feature = feature.eval().requires_grad_(False)
        self.sets = _FeatureSets()
        self.real_from_cache = False  # set by real_stats.use_real_cache: the real images need not be fed
        self.save_real_to = None  # a real_stats key: save the gathered real features after the first compute

    @property
    def device(self) -> torch.device:
        return self.sets.device

    def to(self, device) -> ImageDistance:
        self.feature = self.feature.to(device)
        self.sets = self.sets.to(device)
        return self

    @torch.no_grad()
    def _update(self, images: Tensor, real: bool) -> None:
        if images.device.type != "cpu" and self.device.type == "cpu":
            self.to(images.device)  # follow the accelerator the samples come from (once)
        x = to_uint8(images.to(self.device))
        features = self.feature(x if self._uint8_input else x.float() / 255.0)
        self.sets.update(features.reshape(len(x), -1), real=real)

    def update_real(self, images: Tensor) -> None:
        self._update(images, real=True)

    def update_fake(self, images: Tensor) -> None:
        self._update(images, real=False)

    def add_real_features(self, features: Tensor) -> None:
        self.sets.update(features.to(self.device), real=True)

    def _gathered(self) -> tuple[Tensor, Tensor]:
        """Every rank's features (a collective under torch.distributed: call it on every rank)."""
        width = getattr(self.feature, "num_features", None) or self._width()
        for state in (self.sets.real, self.sets.fake):  # a rank with no vectors still sends a (0, d) block
            state.append(torch.zeros(0, width, device=self.device))
        with warnings.catch_warnings():  # "compute before update" on a rank that was dealt no record
            warnings.simplefilter("ignore", UserWarning)
            real, fake = self.sets.compute()
        self.sets._computed = None  # the next call gathers again (new generated features)
        if self.save_real_to is not None:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
                    or torch.distributed.get_rank() == 0:
                try:
                    save_real_features(self.save_real_to, real)
                except OSError as e:  # a read-only dataset folder: evaluate on, extracting the features again
                    log.warning("real features not cached at %s: %s", self.save_real_to.path, e)
            self.save_real_to = None
        return real, fake

    def _width(self) -> int:
        blocks = [f for f in (*self.sets.real, *self.sets.fake) if len(f)]
        if blocks:
            return blocks[0].shape[1]
        size = 299 if self._uint8_input else 64  # a rank with no vectors: one dummy forward finds the width
        dummy = torch.zeros(1, 3, size, size, device=self.device)
        return self.feature(dummy.to(torch.uint8) if self._uint8_input else dummy).reshape(1, -1).shape[1]

    def cache_real(self) -> None:
        """Write the real features where `real_stats.use_real_cache` said (a collective, like compute)."""
        self._gathered()

    def compute(self) -> float:
        """The Fréchet distance; a collective under torch.distributed: call it on every rank."""
        real, fake = self._gathered()
        return frechet_distance(fake, real)

    def compute_all(self, bootstrap: int = 0, seed: int = 0) -> dict[str, float]:
        """{name, kernel_name} and, with `bootstrap` resamples of the generated features, `<key>_lo`/`<key>_hi`
        95% intervals. A collective under torch.distributed: call it on every rank."""
        real, fake = self._gathered()
        result = {self.name: frechet_distance(fake, real), self.kernel_name: kernel_distance(fake, real)}
        if bootstrap > 0:
            intervals = bootstrap_intervals(fake, real, bootstrap, seed)
            for key, interval in ((self.name, intervals["fd"]), (self.kernel_name, intervals["kd"])):
                result[f"{key}_lo"], result[f"{key}_hi"] = interval
        return result

    def reset_fake(self) -> None:
        self.sets.fake = []

    @property
    def num_real(self) -> int:
        return sum(len(f) for f in self.sets.real)

    @property
    def num_fake(self) -> int:
        return sum(len(f) for f in self.sets.fake)


_DIGESTS: dict[str, str] = {}


def file_digest(path: str | Path) -> str:
    """The first 16 hex digits of the weights file's sha256 (once per process and path)."""
    path = str(path)
    if path not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        _DIGESTS[path] = digest.hexdigest()[:16]
    return _DIGESTS[path]


def build_image_distance(eval_cfg: EvalConfig) -> ImageDistance:
    """FID when the Inception weights can be had, else the configured fallback (or an error for 'none')."""
    fallback = eval_cfg.fallback_features
    if fallback == "none":
        inception, looked = _search_inception(eval_cfg.inception_weights)
        if inception is None:
            raise InceptionWeightsNotFound("FID Inception weights not available and eval.fallback_features='none'; "
                                           "looked at: " + "; ".join(looked))
    else:
        inception = load_inception(eval_cfg.inception_weights, fallback)
    return ImageDistance(inception, fallback=fallback)
