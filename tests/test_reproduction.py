"""Reproduction fidelity: every row of the CelebAMask-HQ paper's Tables I, II and VI is a config (or a grid point)
that changes exactly its row's factor from the row's base, and every grid carries the paper's FID of its rows.

The paper's numbers are transcribed here from its text (`../shared/papers/000_*.txt`), independently of the
configs, so a config or grid that drifts from the paper fails."""

import pytest
import yaml

from facediff.config import load_config, load_grid
from facediff.models.info import describe

from conftest import REPO

EXPERIMENTS = REPO / "configs" / "experiments"
GRIDS = REPO / "configs" / "tune"


def load(name, overrides=()):
    return load_config(next(EXPERIMENTS.glob(f"*/{name}.yaml")), list(overrides))


def flat(cfg) -> dict:
    """The config as {dotted key: value}, minus what only names it."""
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value

    walk("", cfg.model_dump(mode="json", exclude={"name", "description"}))
    return out


def changed(name: str, base: str) -> dict:
    """{key: (base value, row value)} for every key the row's config changes from its base row's."""
    a, b = flat(load(base)), flat(load(name))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def unet_count(name: str) -> int:
    return next(r["trainable"] for r in describe(load(name)) if r["name"] in ("unet", "dit"))


# ---------------------------------------------------------------------------------------------- Table II
LC3 = 104_950_915  # Table VII, asserted exactly in test_conditional.py
LC_ARCH = {"model.block_out_channels", "model.down_block_types", "model.up_block_types"}
TABLE_II = {
    # row config: (its base row, the keys it changes, values they must take)
    "lc_unet_3": ("lc_unet_base", LC_ARCH, {}),
    "lc_unet_5": ("lc_unet_base", LC_ARCH - {"model.block_out_channels"}, {}),
    "lc_unet_6": ("lc_unet_base", LC_ARCH - {"model.block_out_channels"}, {}),
    "lc_unet_base_ddpm2000": ("lc_unet_base", {"diffusion.num_train_timesteps"},
                              {"diffusion.num_train_timesteps": 2000}),
    "lc_unet_3_vae": ("lc_unet_3", {"model.autoencoder.kind", "model.autoencoder.preset",
                                    "model.autoencoder.pretrained", "model.autoencoder.subfolder",
                                    "model.sample_size", "model.in_channels", "model.out_channels"},
                      {"model.autoencoder.kind": "kl", "model.autoencoder.pretrained": "runwayml/stable-diffusion-v1-5",
                       "model.autoencoder.subfolder": "vae", "model.sample_size": 32, "model.in_channels": 4}),
    "lc_unet_3_27k": ("lc_unet_3", {"data.path", "data.train_records"}, {"data.train_records": 27000}),
    "lc_unet_3_no_infonce": ("lc_unet_3", {"loss.infonce_weight"}, {"loss.infonce_weight": 0.0}),
    "lc_unet_3_seg": ("lc_unet_3", {"data.part_groups", "model.mask_encoder", "model.attribute_embedder.dim"},
                      {"data.part_groups": "default", "model.attribute_embedder.dim": 128,
                       "model.cross_attention_dim": 256}),
}


@pytest.mark.parametrize("name", sorted(TABLE_II))
def test_table_ii_row_changes_exactly_its_factor(name):
    base, keys, values = TABLE_II[name]
    diff = changed(name, base)
    touched = {k if not k.startswith("model.mask_encoder") else "model.mask_encoder" for k in diff}
    assert touched == keys, f"{name} vs {base}: {diff}"
    row = flat(load(name))
    for key, value in values.items():
        assert row[key] == value, key


@pytest.mark.parametrize("name", sorted(TABLE_II) + ["lc_unet_base"])
def test_table_ii_regime_is_the_papers(name):
    cfg, reference = load(name), load("lc_unet_3")
    big = name == "lc_unet_3_27k"
    assert cfg.data.train_records == (27_000 if big else 2_700)
    # "training iterations kept constant between small/large datasets": same length and global batch
    assert cfg.trainer.total_kimg == reference.trainer.total_kimg
    assert cfg.trainer.batch_size * cfg.trainer.num_workers == reference.trainer.batch_size * reference.trainer.num_workers
    assert cfg.diffusion.num_train_timesteps == (2000 if name == "lc_unet_base_ddpm2000" else 1000)
    assert cfg.model.autoencoder.kind == ("kl" if name == "lc_unet_3_vae" else "vq")
    assert (cfg.loss.infonce_weight > 0) == (name != "lc_unet_3_no_infonce")
    assert (cfg.model.mask_encoder is not None) == (name == "lc_unet_3_seg")
    # attributes-only models embed in 256 d; the combined model in 128 d (Appendix A-E)
    assert cfg.model.attribute_embedder.dim == (128 if name == "lc_unet_3_seg" else 256)


def test_table_ii_parameter_counts_of_the_variant_rows():
    assert unet_count("lc_unet_3_no_infonce") == unet_count("lc_unet_3_27k") == LC3
    assert unet_count("lc_unet_3_vae") == LC3 + 2_305  # conv_in / conv_out over 4 latent channels
    rows = {r["name"]: r for r in describe(load("lc_unet_3_seg"))}
    assert rows["unet"]["trainable"] == LC3  # the fused embedding is projected to LC_UNet_3's 256-d context
    assert rows["mask_encoder"]["frozen"] == 3_330_368  # SegFormer-b0's encoder, 10 input channels
    assert rows["mask_encoder"]["trainable"] == 256 * 128 + 128
    assert rows["fusion"]["trainable"] == (128 + 128) * 256 + 256


# ------------------------------------------------------------------------------------- Tables I and VI
TABLE_I_CONFIGS = {  # config: (lr, warm-up, EMA, training records, normalised)
    "unet_r3": (2e-4, 3000, True, 2700, True),
    "unet_r5": (2e-4, 3000, True, 2700, True),
    "unet_r6": (2e-4, 1500, True, 2700, True),
    "dit_large_2k7": (2e-4, 3000, True, 2700, True),
    "dit_small_2k7": (2e-4, 3000, True, 2700, True),
    "dit_large_27k": (2e-4, 3000, True, 27000, True),
    "dit_large_27k_no_norm": (2e-4, 3000, True, 27000, False),
    "dit_small_27k": (2e-4, 3000, True, 27000, True),
    "dit_small_27k_no_norm": (2e-4, 3000, True, 27000, False),
}


@pytest.mark.parametrize("name", sorted(TABLE_I_CONFIGS))
def test_table_i_and_vi_rows_train_as_published(name):
    cfg = load(name)
    lr, warmup, ema, records, normalized = TABLE_I_CONFIGS[name]
    assert (cfg.optimizer.lr, cfg.optimizer.warmup_steps, cfg.trainer.ema.enabled) == (lr, warmup, ema)
    assert (cfg.data.train_records, cfg.data.normalize) == (records, normalized)
    assert (cfg.data.image_size, cfg.diffusion.num_train_timesteps) == (128, 1000)


def test_table_vi_rows_change_one_factor_each():
    assert set(changed("dit_large_2k7", "dit_small_2k7")) == {
        "model.num_layers", "model.num_attention_heads", "model.dropout"}
    for size in ("small", "large"):
        assert set(changed(f"dit_{size}_27k", f"dit_{size}_2k7")) == {"data.path", "data.train_records"}
        assert changed(f"dit_{size}_27k_no_norm", f"dit_{size}_27k") == {"data.normalize": (True, False)}
    assert load("dit_small_2k7").model.num_layers == 6 and load("dit_large_2k7").model.num_layers == 12


# -------------------------------------------------------------------------------- grids and paper numbers
PAPER_FID = {  # grid: {row label: FID}, as printed in Tables I, II and VI (and paper 2's Table 1)
    "unet_architecture": {"unet_r3, 2e-4 / 3000, EMA": 72.6211, "unet_r5, 2e-4 / 3000, EMA": 76.0807,
                          "unet_r6, 2e-4 / 1500, EMA": 73.3532},
    "lr": {"unet_r5, 1e-5 / default": 99.4773, "unet_r5, 5e-4 / default": 75.3131},
    "warmup": {"unet_r5, 2e-4 / 3000": 76.4401, "unet_r5, 2e-4 / 10000": 73.9984},
    "ema": {"unet_r5, 2e-4 / 500, no EMA": 92.8969},
    "dit_architecture": {"dit_large_2.7k": 89.90, "dit_small_2.7k": 94.00, "dit_large_27k": 99.47,
                         "dit_large_27k_no_norm": 93.92, "dit_small_27k": 91.20, "dit_small_27k_no_norm": 92.04},
    "lc_architecture": {"LC_UNet_Base": 75.4572, "LC_UNet_3": 70.9824, "LC_UNet_5": 77.6988, "LC_UNet_6": 74.4457},
    "ddpm_steps": {"LC_UNet_Base, 1000 steps": 75.4572, "LC_UNet_Base, 2000 steps": 77.4334},
    "autoencoder": {"LC_UNet_3, VQ-VAE": 70.9824, "LC_UNet_3, VAE": 70.9829},
    "train_size": {"LC_UNet_3, 2700 samples": 70.9824, "LC_UNet_3, 27000 samples": 74.7878},
    "infonce": {"LC_UNet_3, no InfoNCE": 74.0719, "LC_UNet_3, InfoNCE": 70.9824},
    "segmentation": {"LC_UNet_3 (Attributes Only)": 70.9824, "LC_UNet_3 (Attributes + Segmentation)": 63.85},
    "mask_ldm": {"Baseline (ControlNet)": 63.95, "Mask LDM (T = 400)": 63.34, "Mask LDM (T = 100)": 61.72},
}
# the point each config-grid row must name (the row's own config)
ROW_CONFIG = {"unet_r3, 2e-4 / 3000, EMA": "unet_r3", "unet_r5, 2e-4 / 3000, EMA": "unet_r5",
              "unet_r6, 2e-4 / 1500, EMA": "unet_r6", "LC_UNet_Base": "lc_unet_base", "LC_UNet_3": "lc_unet_3",
              "LC_UNet_5": "lc_unet_5", "LC_UNet_6": "lc_unet_6", "LC_UNet_Base, 1000 steps": "lc_unet_base",
              "LC_UNet_Base, 2000 steps": "lc_unet_base_ddpm2000", "LC_UNet_3, VQ-VAE": "lc_unet_3",
              "LC_UNet_3, VAE": "lc_unet_3_vae", "LC_UNet_3, 2700 samples": "lc_unet_3",
              "LC_UNet_3, 27000 samples": "lc_unet_3_27k", "LC_UNet_3, no InfoNCE": "lc_unet_3_no_infonce",
              "LC_UNet_3, InfoNCE": "lc_unet_3", "LC_UNet_3 (Attributes Only)": "lc_unet_3",
              "LC_UNet_3 (Attributes + Segmentation)": "lc_unet_3_seg",
              **{row: row.replace("2.7k", "2k7") for row in PAPER_FID["dit_architecture"]}}


@pytest.mark.parametrize("grid", sorted(PAPER_FID))
def test_grid_carries_the_papers_fid_of_each_row(grid):
    raw = yaml.safe_load((GRIDS / f"{grid}.yaml").read_text())
    rows = {r["row"]: r for r in raw["paper_rows"]}
    assert {k: r["fid"] for k, r in rows.items()} == PAPER_FID[grid]
    for label, row in rows.items():
        if label in ROW_CONFIG:
            assert row["point"] == {"train_config": f"../experiments/celebamask/{ROW_CONFIG[label]}.yaml"}


def test_table_i_ablation_grids_run_on_r5_with_the_papers_values():
    lr, _ = load_grid(GRIDS / "lr.yaml")
    warmup, _ = load_grid(GRIDS / "warmup.yaml")
    ema, _ = load_grid(GRIDS / "ema.yaml")
    for grid in (lr, warmup, ema):
        assert grid.train_config == "../experiments/celebamask/unet_r5.yaml"
    assert lr.search_space["optimizer.lr"].grid == [1e-5, 5e-4] and lr.overrides["optimizer.warmup_steps"] == 500
    assert warmup.search_space["optimizer.warmup_steps"].grid == [3000, 10000]
    assert ema.overrides["optimizer.warmup_steps"] == 500
    assert ema.paper_row({"trainer.ema.enabled": False}).fid == 92.8969
    assert ema.paper_row({"trainer.ema.enabled": True}) is None  # not a row of the paper


# ------------------------------------------------------------------------------------------------ docs
def test_reproducing_page_lists_every_reproduced_row_with_its_command():
    table = (REPO / "docs" / "reproducing.md").read_text()
    for name in sorted(set(ROW_CONFIG.values())):
        assert f"configs/experiments/celebamask/{name}.yaml" in table, name
    for grid in PAPER_FID:
        assert f"configs/tune/{grid}.yaml" in table, grid
