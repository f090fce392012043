"""facediff.models.autoencoder: presets, the frozen codec, scaling, and loading real weights offline."""


import torch
from diffusers import AutoencoderKL, VQModel

import pytest

from facediff.config.schema import AutoencoderConfig
from facediff.models.autoencoder import LatentCodec, latent_shape, scaling_factor
from facediff.models.pretrained import WeightsNotFound, from_config, preset_config

from conftest import REPO

TINY = {"vq": "tiny_vq", "kl": "tiny_kl"}


def codec(kind, **kw):
    torch.manual_seed(0)
    return LatentCodec(AutoencoderConfig(kind=kind, preset=TINY[kind], **kw), load_weights=False)


def images(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("kind, shape", [("vq", (3, 8, 8)), ("kl", (4, 4, 4))])
def test_tiny_codec_shapes_and_roundtrip(kind, shape):
    c = codec(kind)
    assert c.latent_shape(32) == shape == latent_shape(AutoencoderConfig(kind=kind, preset=TINY[kind]), 32)
    assert sum(p.numel() for p in c.parameters()) < 400_000  # tiny: fast on CPU
    z = c.encode(images())
    assert z.shape == (2, *shape) and torch.isfinite(z).all()
    x = c.decode(z)
    assert x.shape == (2, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError, match="not divisible"):
        c.encode(images(size=30))


def test_codec_is_frozen_and_stays_in_eval():
    parent = torch.nn.ModuleDict({"codec": codec("kl"), "head": torch.nn.Linear(2, 2)})
    parent.train()
    c = parent["codec"]
    assert not c.training and not any(m.training for m in c.modules())
    assert parent["head"].training
    assert not any(p.requires_grad for p in c.parameters())
    x = images().requires_grad_(True)
    assert not c.encode(x).requires_grad  # no graph through the frozen encoder


def test_scaling_factor_from_config_kind_default_and_override():
    assert codec("kl").scaling_factor == 0.5  # tiny_kl states 0.5 in its config
    assert codec("vq").scaling_factor == 1.0  # tiny_vq states none: LDM's VQ convention, not diffusers' 0.18215
    assert codec("vq", scaling_factor=0.25).scaling_factor == 0.25
    # The same values from the architecture config alone (what `prepare latents` records), big presets included.
    assert [scaling_factor(AutoencoderConfig(kind=k, preset=p)) for k, p in
            (("kl", "tiny_kl"), ("vq", "tiny_vq"), ("vq", "ldm_celebahq256_vqvae"), ("kl", "sd2_vae"))] == \
        [0.5, 1.0, 1.0, 0.18215]
    c, scaled = codec("kl"), codec("kl", scaling_factor=2.0)
    x = images()
    torch.testing.assert_close(scaled.encode(x), c.encode(x) * 4.0)  # 2.0 / 0.5
    torch.testing.assert_close(scaled.decode(scaled.encode(x)), c.decode(c.encode(x)), atol=1e-5, rtol=1e-5)


def test_vq_latents_are_pre_quantisation_and_kl_the_posterior_mean():
    vq, kl = codec("vq"), codec("kl")
    x = images()
    torch.testing.assert_close(vq.encode(x), vq.model.encode(x).latents)
    torch.testing.assert_close(kl.encode(x), kl.model.encode(x).latent_dist.mean * 0.5)


def test_big_presets_param_counts_and_factors_on_meta_device():
    expected = {  # diffusers 0.42, counted on the meta device (no memory, no init)
        "ldm_celebahq256_vqvae": (VQModel, 55_322_782, (3, 64, 64)),
        "sd2_vae": (AutoencoderKL, 83_653_863, (4, 32, 32)),
    }
    for name, (cls, count, shape) in expected.items():
        with torch.device("meta"):
            model = from_config(cls, preset_config(name))
            kind = "vq" if cls is VQModel else "kl"
            z = model.encode(torch.empty(1, 3, 256, 256)).latents if kind == "vq" else \
                model.encode(torch.empty(1, 3, 256, 256)).latent_dist.mean
        assert sum(p.numel() for p in model.parameters()) == count, name
        assert tuple(z.shape[1:]) == shape == latent_shape(AutoencoderConfig(kind=kind, preset=name), 256), name


def test_kind_must_match_the_preset_class():
    with pytest.raises(ValueError, match="is a AutoencoderKL, but .* kind 'vq'"):
        LatentCodec(AutoencoderConfig(kind="vq", preset="sd2_vae"), load_weights=False)


def test_pretrained_local_folder_loads_exactly_those_weights(tmp_path):
    saved = codec("vq").model
    with torch.no_grad():  # weights a fresh random init cannot reproduce
        for p in saved.parameters():
            p.add_(0.01)
    saved.save_pretrained(tmp_path / "ae" / "vqvae")
    cfg = AutoencoderConfig(kind="vq", preset="tiny_vq", pretrained=str(tmp_path / "ae"), subfolder="vqvae")
    loaded = LatentCodec(cfg, load_weights=True)
    want = saved.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        torch.testing.assert_close(tensor, want[name], rtol=0, atol=0, msg=name)
    assert loaded.scaling_factor == 0.18215  # save_pretrained wrote diffusers' default, so the copy states it
    random_init = LatentCodec(cfg, load_weights=False)  # load_weights=False never reads them
    assert not torch.equal(random_init.model.encoder.conv_in.weight, want["encoder.conv_in.weight"])


def test_weights_of_another_architecture_are_refused(tmp_path):
    from_config(AutoencoderKL, {**preset_config("tiny_kl"), "layers_per_block": 2}).save_pretrained(tmp_path / "k")
    with pytest.raises(ValueError, match="do not fit preset 'tiny_kl'"):
        LatentCodec(AutoencoderConfig(kind="kl", preset="tiny_kl", pretrained=str(tmp_path / "k")), load_weights=True)


def test_missing_weights_name_the_places_looked(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # The hub client reads HF_HUB_OFFLINE once at import; set both so the lookup fails fast, without a network try.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    missing = tmp_path / "no-such-autoencoder"
    with pytest.raises(WeightsNotFound, match=f"local folder {missing} \\(missing\\).*HF_HUB_OFFLINE"):
        LatentCodec(AutoencoderConfig(kind="vq", preset="tiny_vq", pretrained=str(missing)), load_weights=True)
    with pytest.raises(WeightsNotFound, match="hub id 'facediff-test/none'.*Hugging Face cache"):
        LatentCodec(AutoencoderConfig(kind="kl", pretrained="facediff-test/none", subfolder="vae"), load_weights=True)


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_fitted_autoencoder_reconstructs_and_states_unit_variance_scaling(kind, synthetic_shards, tmp_path):
    from facediff.config import load_config
    from facediff.data.stream.local_batches import local_test_batches
    from facediff.train.autoencoder import fit_autoencoder

    cfg = load_config(REPO / "configs" / "experiments" / "tiny" / "tiny_lc_unet.yaml",
                      [f"data.path={synthetic_shards}", f"model.autoencoder.kind={kind}",
                       f"model.autoencoder.preset={TINY[kind]}"])
    fitted = fit_autoencoder(cfg, tmp_path / "ae", steps=150)
    assert fitted["mse_after"] < 0.5 * fitted["mse_before"]
    # A codec loading the saved folder uses the stated factor, so its latents of the training faces have unit
    # spread (diffusers' default 0.18215 left the tiny VQ's at ~0.03: no signal above the diffusion noise).
    loaded = LatentCodec(cfg.model.autoencoder.model_copy(update={"pretrained": str(tmp_path / "ae")}), True)
    assert loaded.scaling_factor == pytest.approx(fitted["scaling_factor"])
    train = torch.cat([b["image"] for b in local_test_batches(cfg, "train")()]).float()
    with torch.no_grad():
        assert float(loaded.encode(train).std()) == pytest.approx(1.0, rel=1e-3)
