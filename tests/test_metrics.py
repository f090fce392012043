"""Image distance: where the Inception weights are looked for, the ONet fallback, and that the metric discriminates."""

import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from facediff.config.schema import EvalConfig
from forked_ranks import run_forked_ranks
from facediff.eval import metrics
from facediff.eval.metrics import (
    ImageDistance,
    InceptionWeightsNotFound,
    MTCNNONetFeatures,
    build_image_distance,
    load_inception,
)


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """An empty torch hub cache and no download attempt: the state of a machine without the FID weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(metrics.DOWNLOAD_ENV, "0")
    return tmp_path


@pytest.fixture(scope="module")
def onet():
    return MTCNNONetFeatures()


@pytest.fixture(scope="module")
def lfw():
    """scikit-image's LFW subset as (N, 3, 25, 25) floats in [-1, 1]: 100 real face crops, then 100 non-faces."""
    from skimage import data

    gray = torch.from_numpy(data.lfw_subset()).float()
    return (gray[:, None].expand(-1, 3, -1, -1) * 2 - 1).contiguous()


def _astronaut_face():
    from skimage import data

    return torch.from_numpy(data.astronaut()[62:172, 169:279].copy()).permute(2, 0, 1)[None]  # MTCNN's box, squared


def _noise(n, size, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _shuffle_pixels(images, seed=1):
    n, c, h, w = images.shape
    perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(seed))
    return images.reshape(n, c, h * w)[:, :, perm].reshape(n, c, h, w)


def _distance(real, fake, **kwargs):
    metric = ImageDistance(**kwargs)
    metric.update_real(real)
    metric.update_fake(fake)
    return metric.compute()


# ------------------------------------------------------------------------------------------------ weights
def test_without_weights_load_inception_warns_once_naming_every_path(no_weights, caplog):
    configured = no_weights / "nowhere" / "inception.pth"
    with caplog.at_level(logging.WARNING, logger="facediff.eval.metrics"):
        assert load_inception(str(configured)) is None
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    for path in metrics.inception_candidates(str(configured)):
        assert str(path) in message
    assert str(no_weights / "torch" / "hub" / "checkpoints") in message  # the hub cache follows TORCH_HOME
    assert metrics.INCEPTION_URL in message and "fd_mtcnn_onet" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="facediff.eval.metrics"):
        assert load_inception(str(configured)) is None  # the same job's next run (the demo's next stage)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_unreadable_checkpoint_is_reported_and_skipped(no_weights, caplog):
    broken = no_weights / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="facediff.eval.metrics"):
        assert load_inception(str(broken)) is None
    assert f"{broken} (unreadable" in caplog.text


def test_build_image_distance_falls_back_and_never_reports_fid(no_weights):
    metric = build_image_distance(EvalConfig())
    assert metric.name == "fd_mtcnn_onet"
    with pytest.raises(InceptionWeightsNotFound, match="checkpoints"):
        build_image_distance(EvalConfig(fallback_features="none"))
    with pytest.raises(InceptionWeightsNotFound):
        ImageDistance(None, fallback="none")


def _random_inception_checkpoint(path, monkeypatch):
    """A randomly initialised torch-fidelity InceptionV3 saved like the real FID weights (same keys and shapes)."""
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    with monkeypatch.context() as m:
        m.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = tf_inception.FeatureExtractorInceptionV3("random", ["2048"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def test_weights_in_the_hub_cache_give_fid(no_weights, monkeypatch, caplog):
    cached = no_weights / "torch" / "hub" / "checkpoints" / metrics.INCEPTION_FILES[0]
    _random_inception_checkpoint(cached, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="facediff.eval.metrics"):
        metric = build_image_distance(EvalConfig(fallback_features="none"))
    assert metric.name == "fid" and not caplog.records
    metric.update_real(_noise(2, 32, seed=1))  # Inception gets uint8, resized to 299 inside
    assert metric.num_real == 2 and metric.sets.real[0].shape == (2, 2048)
    # no compute(): the eigenvalues of a 2048x2048 float64 product take tens of seconds on 2 CPU cores


def test_reachability_probe_is_bounded():
    # the download is only tried after this probe; a name that cannot resolve must answer quickly, not hang
    assert not metrics._reachable("https://weights.invalid/x.pth", timeout_s=3.0)


# ------------------------------------------------------------------------------------------------ ONet
def test_onet_weights_are_the_pretrained_ones(onet, lfw):
    assert onet.face_probability(_astronaut_face()).item() > 0.9
    assert onet.face_probability(_noise(4, 110)).max().item() < 0.1
    assert onet.face_probability((lfw[:100] + 1) / 2).mean().item() > 0.9  # real faces
    assert onet.face_probability((lfw[100:] + 1) / 2).mean().item() < 0.2  # LFW's non-face crops


def test_onet_features_accept_uint8_and_unit_floats(onet):
    face = _astronaut_face()
    as_uint8, as_float = onet(face), onet(face.float() / 255)
    assert as_uint8.shape == (1, MTCNNONetFeatures.num_features)
    torch.testing.assert_close(as_uint8, as_float)


# ------------------------------------------------------------------------------------------------ distance
def test_fallback_distance_separates_faces_from_noise(lfw):
    faces_a, faces_b, non_faces = lfw[:50], lfw[50:100], lfw[100:150]
    same = _distance(faces_a, faces_b)
    noise = _distance(faces_a, _noise(50, 25))
    shuffled = _distance(faces_a, _shuffle_pixels(faces_b))
    other = _distance(faces_a, non_faces)
    print(f"lfw faces A vs B {same:.4f}, vs noise {noise:.4f}, vs shuffled pixels {shuffled:.4f}, "
          f"vs non-faces {other:.4f}")
    assert 0 <= same and 10 * same < min(noise, shuffled, other)


def test_fallback_distance_on_synthetic_faces():
    synthetic = pytest.importorskip("facediff.data.synthetic.celebamask")
    faces = torch.stack([torch.from_numpy(synthetic.render_face(i, 64, 0).image).permute(2, 0, 1)
                         for i in range(256)]).float() / 127.5 - 1
    same = _distance(faces[:128], faces[128:])
    noise = _distance(faces[:128], _noise(128, 64))
    shuffled = _distance(faces[:128], _shuffle_pixels(faces[128:]))
    print(f"synthetic faces A vs B {same:.4f}, vs noise {noise:.4f}, vs shuffled pixels {shuffled:.4f}")
    assert 5 * same < min(noise, shuffled)


class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.num_features = 32

    def forward(self, x):
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1  # injected networks see [0, 1] floats
        return self.net(x)


def test_injected_feature_network(lfw):
    metric = ImageDistance(feature_network=TinyConv())
    assert metric.name == "fd_tinyconv"
    metric.update_real(lfw[:60])
    metric.update_fake(lfw[:60])
    identical = metric.compute()

    metric.reset_fake()  # the real statistics stay
    assert (metric.num_real, metric.num_fake) == (60, 0)
    metric.update_fake(_noise(60, 25))
    value = metric.compute()
    print(f"tiny conv features: identical sets {identical:.2e}, faces vs noise {value:.4f}")
    assert math.isfinite(value) and abs(identical) < 1e-3 * value
    assert value == pytest.approx(_distance(lfw[:60], _noise(60, 25), feature_network=TinyConv()), rel=1e-4)


def _rank(rank, world, port, real, fake, out):
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (it deadlocks)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        metric = ImageDistance(feature_network=TinyConv())
        metric.update_real(real[rank::world])
        metric.update_fake(fake[rank::world])
        out.put((rank, metric.compute(), metric.num_real))  # every rank calls compute(): it all-gathers
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_compute_gathers_every_rank(lfw):
    real, fake = lfw[:80], _noise(80, 25)
    results = run_forked_ranks(_rank, 2, (real, fake), timeout=30)
    expected = _distance(real, fake, feature_network=TinyConv())
    for rank, value, local_real in results:
        assert value == pytest.approx(expected, rel=1e-4)
        assert local_real == 40  # compute() restored the local (unsynced) states
    assert np.isfinite(expected)
