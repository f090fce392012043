"""Configs that would silently train or report something else are refused at load, naming the key; every path
of a config is made absolute before it is shipped to Ray."""

import os

import pytest

from facediff.config import ConfigError, load_config, resolve_paths

from conftest import REPO

TINY_UNET = REPO / "configs" / "experiments" / "tiny" / "tiny_unet.yaml"
TINY_LC = REPO / "configs" / "experiments" / "tiny" / "tiny_lc_unet.yaml"


def test_clip_sample_defaults_per_family_and_is_refused_for_latents():
    assert load_config(TINY_UNET).diffusion.clip_sample is True
    assert load_config(TINY_LC, ["diffusion.clip_sample=null"]).diffusion.clip_sample is False
    with pytest.raises(ConfigError, match=r"diffusion\.clip_sample: .*latents, which are not bounded"):
        load_config(TINY_LC, ["diffusion.clip_sample=true"])


def test_no_norm_is_refused_for_latent_families():
    with pytest.raises(ConfigError, match="data.normalize"):
        load_config(TINY_LC, ["data.normalize=false"])


def test_pixel_model_size_must_match_the_data():
    with pytest.raises(ConfigError, match=rf"model\.sample_size \({TINY_UNET}\) is 32 but data\.image_size "
                                          r"\(command line\) is 64: they must be equal"):
        load_config(TINY_UNET, ["data.image_size=64"])


@pytest.mark.parametrize("key,value", [("masked_lpips_weight", 1.0), ("face_feature_weight", 0.5),
                                       ("perceptual_timestep_threshold", 300), ("infonce_weight", 0.1)])
def test_loss_keys_no_part_of_the_family_reads_are_errors(key, value):
    with pytest.raises(ConfigError, match=rf"loss\.{key}: not read by model family 'unet'"):
        load_config(TINY_UNET, [f"loss.{key}={value}"])


def test_loss_keys_the_family_reads_are_accepted_and_saved_configs_load_back(tmp_path):
    from facediff.config import dump_config

    cfg = load_config(TINY_LC, ["loss.infonce_weight=0.3"])
    assert cfg.loss.infonce_weight == 0.3
    with pytest.raises(ConfigError, match=r"loss\.masked_lpips_weight: not read by model family 'lc_unet'"):
        load_config(TINY_LC, ["loss.masked_lpips_weight=1"])
    for source in (cfg, load_config(TINY_UNET)):  # a run's config.yaml holds every key, at its default
        saved = tmp_path / "config.yaml"
        saved.write_text(dump_config(source))
        assert load_config(saved) == source


def test_paths_are_resolved_against_the_invocation_directory(tmp_path, monkeypatch):
    (tmp_path / "ae").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_config(TINY_LC, ["data.path=outputs/shards", "trainer.storage_path=runs",
                                "model.autoencoder.pretrained=ae", "eval.inception_weights=w/inception.pt",
                                "eval.mask_segmenter=runs/segformer/tiny"])
    resolved = resolve_paths(cfg)
    assert resolved.data.path == str(tmp_path / "outputs" / "shards")
    assert resolved.trainer.storage_path == str(tmp_path / "runs")
    assert resolved.model.autoencoder.pretrained == str(tmp_path / "ae")
    assert resolved.eval.inception_weights == str(tmp_path / "w" / "inception.pt")
    assert resolved.eval.mask_segmenter == str(tmp_path / "runs" / "segformer" / "tiny")
    assert cfg.data.path == "outputs/shards"  # a copy: the loaded config is unchanged
    hub = load_config(TINY_LC, ["model.autoencoder.pretrained=CompVis/ldm-celebahq-256"])
    assert resolve_paths(hub).model.autoencoder.pretrained == "CompVis/ldm-celebahq-256"  # a hub id stays
    assert resolve_paths(resolved, base="/elsewhere") == resolved  # idempotent


def test_tune_trials_get_absolute_paths_and_read_no_file(tmp_path, monkeypatch, synthetic_shards):
    """A trial runs in Ray's packaged copy of the working directory: its config must be complete, absolute data."""
    from facediff.tune import load_experiment

    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    os.symlink(synthetic_shards, work / "data" / "shards")
    monkeypatch.chdir(work)
    exp = load_experiment(REPO / "configs" / "tune" / "demo.yaml", ["data.path=data/shards", "storage_path=tune"])
    assert exp.dir == work / "tune" / "demo"
    monkeypatch.chdir(tmp_path)  # the trial's working directory is another one
    cfg = exp.trial_config({"optimizer.lr": 3e-4}, "t1")
    assert cfg.data.path == str(work / "data" / "shards") and cfg.optimizer.lr == 3e-4
    assert cfg.trainer.storage_path == str(exp.dir / "t1")


def test_tune_refuses_a_grid_whose_data_is_missing(tmp_path, monkeypatch):
    from facediff.tune import load_experiment

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"data\.path .*outputs/demo/shards/manifest\.json: no manifest"):
        load_experiment(REPO / "configs" / "tune" / "demo.yaml").check_data()
