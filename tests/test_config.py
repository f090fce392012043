"""Config loading: typed values, unknown keys and bad types named with their file, inheritance, overrides."""

from pathlib import Path

import pytest

from facediff.config import ConfigError, dump_config, load_config, load_grid
from facediff.config.schema import DataConfig

from conftest import REPO

TINY_UNET = """
data:
  image_size: 32
model:
  family: unet
  sample_size: 32
  block_out_channels: [32, 64]
  down_block_types: [DownBlock2D, AttnDownBlock2D]
  up_block_types: [AttnUpBlock2D, UpBlock2D]
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_and_name_from_file(tmp_path):
    cfg = load_config(write(tmp_path / "tiny.yaml", TINY_UNET))
    assert cfg.name == "tiny"
    assert cfg.model.family == "unet" and cfg.model.block_out_channels == [32, 64]
    assert cfg.diffusion.num_train_timesteps == 1000 and cfg.diffusion.beta_end == 0.02
    assert cfg.trainer.ema.enabled and cfg.eval.fallback_features == "mtcnn_onet"


def test_unknown_key_is_named_with_its_file(tmp_path):
    base = write(tmp_path / "base.yaml", TINY_UNET)
    child = write(tmp_path / "child.yaml", "base: base.yaml\ntrainer:\n  num_workrs: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    assert f"{child}: trainer.num_workrs: unknown key" in str(err.value)
    # an error inside the base file names the base file, not the child
    write(base, TINY_UNET + "  dropoutt: 0.1\n")
    with pytest.raises(ConfigError, match=rf"{base}: model.dropoutt: unknown key"):
        load_config(child)


def test_wrong_type_names_key(tmp_path):
    path = write(tmp_path / "x.yaml", TINY_UNET + "optimizer:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"x.yaml: optimizer.lr: Input should be a valid number"):
        load_config(path)


def test_overrides_are_typed_and_checked(tmp_path):
    path = write(tmp_path / "x.yaml", TINY_UNET)
    cfg = load_config(path, ["trainer.num_workers=4", "model.block_out_channels=[64,64]", "trainer.precision=bf16"])
    assert cfg.trainer.num_workers == 4 and cfg.model.block_out_channels == [64, 64]
    assert cfg.trainer.precision == "bf16"
    with pytest.raises(ConfigError, match="command line: trainer.zero_stage"):
        load_config(path, ["trainer.zero_stage=5"])
    with pytest.raises(ConfigError, match="command line: trainer.nope: unknown key"):
        load_config(path, ["trainer.nope=1"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(path, ["trainer.num_workers"])


def test_model_family_union(tmp_path):
    path = write(tmp_path / "x.yaml", TINY_UNET)
    dit = load_config(write(tmp_path / "dit.yaml", "model: {family: dit, num_layers: 2}\n"))
    assert dit.model.family == "dit" and dit.model.patch_size == 4
    # overrides merge into the mapping: the UNet's own keys do not belong to a DiT and are named
    with pytest.raises(ConfigError, match=r"x.yaml: model.block_out_channels: unknown key"):
        load_config(path, ["model.family=dit"])
    with pytest.raises(ConfigError, match="model.family"):
        load_config(path, ["model.family=gan"])
    # a field of another family is unknown here, reported without the union's internal tag
    with pytest.raises(ConfigError, match=r"model.num_layers: unknown key"):
        load_config(path, ["model.num_layers=3"])


def test_cross_field_validation(tmp_path):
    path = write(tmp_path / "x.yaml", TINY_UNET)
    with pytest.raises(ConfigError, match=r"block_out_channels \(command line\) has 3 entries"):
        load_config(path, ["model.block_out_channels=[32,64,64]"])
    with pytest.raises(ConfigError, match="unknown or no parts"):
        load_config(path, ["data.part_groups={face: [skin, whiskers]}"])


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "model:\n  family: unet\n  x: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_part_group_presets():
    assert DataConfig(part_groups="none").resolved_part_groups() is None
    assert len(DataConfig(part_groups="default").resolved_part_groups()) == 10
    assert len(DataConfig(part_groups="full").resolved_part_groups()) == 18
    assert DataConfig(part_groups={"lips": ["u_lip", "l_lip"]}).resolved_part_groups() == {"lips": ("u_lip", "l_lip")}


def test_dump_round_trips(tmp_path):
    cfg = load_config(write(tmp_path / "x.yaml", TINY_UNET), ["optimizer.lr=3e-4"])
    again = load_config(write(tmp_path / "dumped.yaml", dump_config(cfg)))
    assert again == cfg


def test_grid_keys_checked_against_schema(tmp_path):
    write(tmp_path / "train.yaml", TINY_UNET)
    good = write(
        tmp_path / "grid.yaml",
        "train_config: train.yaml\nsearch_space:\n  optimizer.lr: {grid: [1.0e-5, 2.0e-4]}\n"
        "  trainer.ema.enabled: {choice: [true, false]}\n",
    )
    grid, base = load_grid(good)
    assert grid.metric == "fid" and grid.scheduler.kind == "asha" and base.name == "train"
    bad = write(tmp_path / "bad.yaml", "train_config: train.yaml\nsearch_space:\n  optimizer.lrr: {grid: [1.0e-5]}\n")
    with pytest.raises(ConfigError, match=r"grid point 1 of 1 {optimizer.lrr: 1.0e-05}: invalid config: search_space: "
                                         "optimizer.lrr: unknown key"):
        load_grid(bad)
    two = write(tmp_path / "two.yaml", "train_config: train.yaml\nsearch_space:\n  optimizer.lr: {grid: [1], choice: [2]}\n")
    with pytest.raises(ConfigError, match="exactly one of"):
        load_grid(two)


def test_every_shipped_config_loads():
    configs = sorted((REPO / "configs" / "experiments").glob("*/*.yaml"))
    assert configs, "no experiment configs shipped"
    for path in configs:
        load_config(path)
