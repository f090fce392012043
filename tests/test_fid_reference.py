"""FID and KID equal torch-fidelity's on the same PNG folders (random-weight Inception made here), the bootstrap
intervals' shortcuts equal the direct computation, and the real features are cached and rebuilt by manifest."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from facediff.config.schema import EvalConfig
from facediff.eval import metrics
from facediff.eval.bootstrap import _fid_resample, _kid_resample, _poly_kernel, bootstrap_intervals
from facediff.eval.distances import frechet_distance, kernel_distance
from facediff.eval.metrics import ImageDistance, build_image_distance
from facediff.eval.real_stats import RealFeaturesKey, load_real_features, use_real_cache

N_REAL, N_FAKE = 6, 5


def _random_inception(path):
    """torch-fidelity's FeatureExtractorInceptionV3 with seeded random weights, saved as its weight file. The convs
    get He initialisation: PyTorch's default shrinks the activations to ~1e-8 after 90 layers (a degenerate test)."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    torch.manual_seed(0)
    with mock.patch.object(tf_inception, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


def _png_folder(folder, n, shift, seed):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):  # blobs of colour over noise: features that vary between images
        pixels = rng.normal(120 + shift, 50, (32, 32, 3))
        pixels[rng.integers(0, 16):, : rng.integers(16, 32)] += rng.normal(0, 60, 3)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def _read_pngs(folder):
    """As facediff's pipelines hold images: (N, 3, H, W) floats in [-1, 1]."""
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidref")
    return (_random_inception(root / "inception.pth"), _png_folder(root / "real", N_REAL, 0, 0),
            _png_folder(root / "fake", N_FAKE, 30, 1))


def test_fid_and_kid_equal_torch_fidelity(folders, monkeypatch):
    import torch_fidelity

    weights, real, fake = folders
    monkeypatch.setenv(metrics.DOWNLOAD_ENV, "0")
    # as the paper's `fidelity --fid --kid --input1 GENERATED --input2 REAL`, at the subset size n allows
    reference = torch_fidelity.calculate_metrics(
        input1=str(fake), input2=str(real), fid=True, kid=True, cuda=False, cache=False, verbose=False,
        datasets_num_workers=0, kid_subset_size=N_FAKE, feature_extractor_weights_path=str(weights))
    metric = build_image_distance(EvalConfig(inception_weights=str(weights), fallback_features="none"))
    metric.update_real(_read_pngs(real))
    metric.update_fake(_read_pngs(fake)[:3])  # in two batches, as evaluation feeds them
    metric.update_fake(_read_pngs(fake)[3:])
    ours = metric.compute_all(bootstrap=0)
    print(f"torch-fidelity {reference}; facediff {ours}")
    assert set(ours) == {"fid", "kid"}
    assert reference["frechet_inception_distance"] > 1  # not a degenerate pair of sets
    assert ours["fid"] == pytest.approx(reference["frechet_inception_distance"], rel=1e-4)
    assert ours["kid"] == pytest.approx(reference["kernel_inception_distance_mean"], rel=1e-4)


def _features(n, d, shift, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


@pytest.mark.parametrize("n_fake", [12, 40])  # fewer vectors than dimensions (the n x n path) and more
def test_bootstrap_resample_equals_direct_computation(n_fake):
    real, fake = _features(30, 16, 0.0, 0), _features(n_fake, 16, 0.5, 1)
    cov = torch.cov(real.T)
    values, vectors = torch.linalg.eigh(cov)
    sqrt_real = vectors @ torch.diag(values.sqrt()) @ vectors.T
    k_fake = fake @ cov @ fake.T if n_fake <= 16 else None
    idx = torch.randint(n_fake, (n_fake,), generator=torch.Generator().manual_seed(2))
    fast = _fid_resample(fake, idx, real.mean(0), torch.trace(cov), k_fake, None if k_fake is not None else sqrt_real)
    assert fast == pytest.approx(frechet_distance(fake[idx].float(), real.float()), rel=1e-4)

    # KID without duplicates and equal set sizes is torch-fidelity's KID (every subset is the whole set)
    real_n = real[:n_fake] if n_fake <= 30 else _features(n_fake, 16, 0.0, 3)
    k_rr = _poly_kernel(real_n, real_n)
    rr = (k_rr.sum() - torch.trace(k_rr)) / (n_fake * (n_fake - 1))
    perm = torch.randperm(n_fake, generator=torch.Generator().manual_seed(4))
    kid = _kid_resample(perm, rr, _poly_kernel(fake, fake), _poly_kernel(real_n, fake))
    assert kid == pytest.approx(kernel_distance(fake.float(), real_n.float()), rel=1e-4, abs=1e-6)


def test_bootstrap_intervals_separate_distant_sets_and_overlap_close_ones():
    real = _features(60, 8, 0.0, 0)
    same, near, far = _features(60, 8, 0.0, 1), _features(60, 8, 0.05, 2), _features(60, 8, 1.0, 3)
    iv = {name: bootstrap_intervals(f, real, 100, seed=0) for name, f in (("same", same), ("near", near),
                                                                          ("far", far))}
    assert iv["same"] == bootstrap_intervals(same, real, 100, seed=0)  # seeded
    for name in iv:
        assert iv[name]["fd"][0] < iv[name]["fd"][1] and iv[name]["kd"][0] < iv[name]["kd"][1]
    for key in ("fd", "kd"):
        assert iv["far"][key][0] > iv["same"][key][1]  # separable rows
        assert iv["near"][key][0] < iv["same"][key][1]  # rows a reader must not rank


def test_a_tiny_set_has_finite_intervals_though_some_resamples_repeat_one_vector():
    # 3 generated vectors: 1 resample in 9 draws one vector three times, which has no pair for the unbiased KID
    iv = bootstrap_intervals(_features(3, 8, 0.5, 5), _features(6, 8, 0.0, 6), 200, seed=0)
    for key in ("fd", "kd"):
        assert all(torch.isfinite(torch.tensor(iv[key]))) and iv[key][0] < iv[key][1]


def test_compute_all_reports_intervals_around_labelled_fallback_values(tmp_path):
    real, fake = _features(40, 3 * 16 * 16, 0, 0).float().clamp(-1, 1), _features(20, 768, 0, 1)
    metric = ImageDistance(None, fallback="mtcnn_onet")
    metric.update_real(real.reshape(40, 3, 16, 16))
    metric.update_fake(fake.float().clamp(-1, 1).reshape(20, 3, 16, 16))
    out = metric.compute_all(bootstrap=50, seed=0)
    assert set(out) == {"fd_mtcnn_onet", "fd_mtcnn_onet_lo", "fd_mtcnn_onet_hi",
                        "kd_mtcnn_onet", "kd_mtcnn_onet_lo", "kd_mtcnn_onet_hi"}
    assert out["fd_mtcnn_onet_lo"] < out["fd_mtcnn_onet_hi"] and out["kd_mtcnn_onet_lo"] < out["kd_mtcnn_onet_hi"]


def test_real_features_cached_equal_fresh_and_rebuilt_when_the_manifest_changes(tmp_path):
    dataset = tmp_path / "data"
    dataset.mkdir()
    (dataset / "manifest.json").write_text(json.dumps({"splits": ["test"], "version": 1}))
    real = _features(30, 3 * 24 * 24, 0, 0).float().clamp(-1, 1).reshape(30, 3, 24, 24)
    fake = _features(10, 3 * 24 * 24, 0.3, 1).float().clamp(-1, 1).reshape(10, 3, 24, 24)

    def evaluation():
        metric = ImageDistance(None, fallback="mtcnn_onet")
        cached = use_real_cache(metric, dataset, "test", 24)
        if not metric.real_from_cache:
            metric.update_real(real)
        metric.update_fake(fake)
        return cached, metric, metric.compute_all()

    fresh_hit, fresh, fresh_out = evaluation()
    key = RealFeaturesKey(str(dataset), "test", "mtcnn_onet", 24)
    assert not fresh_hit and key.path.is_file()
    cached_hit, cached, cached_out = evaluation()
    assert cached_hit
    assert torch.equal(cached.sets.real[0], torch.cat(fresh.sets.real))  # the cached features are the fresh ones
    assert cached_out == fresh_out

    (dataset / "manifest.json").write_text(json.dumps({"splits": ["test"], "version": 2}))  # prepared again
    assert load_real_features(key) is None
    rebuilt_hit, _, _ = evaluation()
    assert not rebuilt_hit and load_real_features(key) is not None  # rebuilt under the new hash
