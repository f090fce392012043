"""Fréchet distance between real test images and generated ones (FID when the Inception weights can be had).

The metric is torchmetrics' `FrechetInceptionDistance` with a feature module: torch-fidelity's InceptionV3
(2048-d pool features, i.e. FID) when its weights are found, else the 256-d penultimate layer of MTCNN's ONet,
whose weights ship inside facenet-pytorch (so it works offline). A fallback value is reported as
`fd_mtcnn_onet`, never as `fid`: the numbers are not comparable with published FIDs.

Distributed: the feature sums are torchmetrics states with `dist_reduce_fx="sum"`; `compute()` all-gathers
them when torch.distributed is initialised, so EVERY rank must call `compute()` (it is a collective), and the
states must sit on a device the process group's backend supports (NCCL: `.to("cuda")`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torch.nn.functional import interpolate
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3

from facediff.config.schema import EvalConfig

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
    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                             feature_extractor_weights_path=str(path))
    net.num_features = 2048  # spares torchmetrics a dummy 299x299 forward to find the width
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


_WARNED_MISSING: set[tuple[str | None, str]] = set()


def load_inception(weights: str | None, fallback: str = "mtcnn_onet") -> nn.Module | None:
    """torch-fidelity's FID InceptionV3 from `weights`, the torch hub cache or (network allowing) a download;
    None, with one warning naming every place looked at, when none works."""
    module, looked = _search_inception(weights)
    if module is None:
        # once per process and setting: the demo's second stage would repeat the first's warning word for word
        report = log.debug if (weights, fallback) in _WARNED_MISSING else log.warning
        _WARNED_MISSING.add((weights, fallback))
        report("FID Inception weights not available; looked at: %s. Falling back to %s.", "; ".join(looked),
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


class ImageDistance:
    """Fréchet distance of feature statistics, real vs generated; images are (N, 3, H, W) floats in [-1, 1].

    The Inception module receives uint8 images (torch-fidelity requires them); other feature modules
    (the ONet fallback, or an injected `feature_network`) receive floats in [0, 1]. Both are quantised to
    8 bits first, so real and generated images go through the same path. The real statistics survive
    `reset_fake()`: feed the fixed real set once, then only new generated sets. An injected network should
    have an int `num_features`; without it torchmetrics runs it once on a random (1, 3, 299, 299) input.
    """

    def __init__(self, inception: nn.Module | None = None, fallback: str = "mtcnn_onet",
                 feature_network: nn.Module | None = None):
        if feature_network is not None:
            feature, self.name = feature_network, f"fd_{type(feature_network).__name__.lower()}"
        elif inception is not None:
            feature, self.name = inception, "fid"
        elif fallback == "mtcnn_onet":
            feature, self.name = MTCNNONetFeatures(), "fd_mtcnn_onet"
        elif fallback == "none":
            raise InceptionWeightsNotFound(
                "no FID Inception module and fallback_features='none'; load_inception() looks at "
                + ", ".join(map(str, inception_candidates(None))) + " (and eval.inception_weights when set)")
        else:
            raise ValueError(f"unknown fallback {fallback!r} (expected 'mtcnn_onet' or 'none')")
        self._uint8_input = self.name == "fid"
        self.metric = FrechetInceptionDistance(feature=feature, reset_real_features=False,
                                               normalize=not self._uint8_input)
        # torchmetrics sets this in update(); a rank that got no images must still join compute()'s gather
        self.metric.orig_dtype = torch.float32

    @property
    def device(self) -> torch.device:
        return self.metric.device

    def to(self, device) -> ImageDistance:
        self.metric = self.metric.to(device)
        return self

    @torch.no_grad()
    def _update(self, images: Tensor, real: bool) -> None:
        if images.device.type != "cpu" and self.device.type == "cpu":
            self.to(images.device)  # follow the accelerator the samples come from (once)
        x = to_uint8(images.to(self.device))
        self.metric.update(x if self._uint8_input else x.float() / 255.0, real=real)

    def update_real(self, images: Tensor) -> None:
        self._update(images, real=True)

    def update_fake(self, images: Tensor) -> None:
        self._update(images, real=False)

    def compute(self) -> float:
        """The distance; a collective under torch.distributed: call it on every rank."""
        return float(self.metric.compute())

    def reset_fake(self) -> None:
        self.metric.reset()  # reset_real_features=False keeps the real sums

    @property
    def num_real(self) -> int:
        return int(self.metric.real_features_num_samples)

    @property
    def num_fake(self) -> int:
        return int(self.metric.fake_features_num_samples)


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
