"""Layering configs beyond merge: replacing a mapping (`!replace`, `key:=`) and dropping a key (`!delete`,
`~key`), in base files, on the command line and in a Tune grid's `overrides:`; a CPU run of a GPU config refused
at load when it still asks for GPUs, naming both keys and where each was set."""

import pickle
from pathlib import Path

import pytest
from typer.testing import CliRunner

from facediff.cli.main import app
from facediff.config import ConfigError, load_config, load_grid
from facediff.config.load import DELETE, parse_override

from conftest import REPO

UNET_R3 = REPO / "configs" / "experiments" / "celebamask" / "unet_r3.yaml"
PIXEL_BASE = REPO / "configs" / "base" / "pixel_128.yaml"  # sets resources_per_worker {GPU: 1, CPU: 4}
TINY_UNET = """
data: {image_size: 32}
model:
  family: unet
  sample_size: 32
  block_out_channels: [32, 64]
  down_block_types: [DownBlock2D, AttnDownBlock2D]
  up_block_types: [AttnUpBlock2D, UpBlock2D]
trainer:
  use_gpu: true
  resources_per_worker: {GPU: 1, CPU: 4}
  ema: {decay: 0.999}
"""
CPU_ONLY = ["trainer.use_gpu=false", "trainer.resources_per_worker:={CPU: 2}"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def gpu_base(tmp_path) -> Path:
    return write(tmp_path / "gpu.yaml", TINY_UNET)


def test_command_line_replace_gives_exactly_the_new_mapping(gpu_base):
    assert load_config(UNET_R3, CPU_ONLY).trainer.resources_per_worker == {"CPU": 2}
    # merge (plain `=`) keeps the base's GPU entry: that is what `:=` is for
    assert load_config(gpu_base, ["trainer.resources_per_worker={CPU: 2}"]).trainer.resources_per_worker == \
        {"GPU": 1, "CPU": 2}
    # a bad value inside the replaced mapping is blamed on the command line, not on the base file
    with pytest.raises(ConfigError, match=r"command line: trainer\.resources_per_worker\.CPU: Input should be greater"):
        load_config(gpu_base, ["trainer.use_gpu=false", "trainer.resources_per_worker:={CPU: -1}"])


def test_a_child_file_replaces_with_the_tag(tmp_path, gpu_base):
    child = write(tmp_path / "cpu.yaml",
                  "base: gpu.yaml\ntrainer:\n  use_gpu: false\n  resources_per_worker: !replace {CPU: 2}\n")
    cfg = load_config(child)
    assert cfg.trainer.resources_per_worker == {"CPU": 2}
    assert cfg.trainer.ema.decay == 0.999  # other keys of the section still merge
    write(child, "base: gpu.yaml\ntrainer:\n  use_gpu: false\n  resources_per_worker: !replace {CPU: 0}\n")
    with pytest.raises(ConfigError, match=rf"{child}: trainer\.resources_per_worker\.CPU"):
        load_config(child)
    # a whole section replaced: the UNet's keys are gone, so the model can become another family
    dit = write(tmp_path / "dit.yaml",
                "base: gpu.yaml\nmodel: !replace {family: dit, num_layers: 2, sample_size: 32}\n")
    assert load_config(dit).model.family == "dit"


def test_a_later_base_in_a_list_replaces_and_drops_keys_of_an_earlier_one(tmp_path, gpu_base):
    write(tmp_path / "cpu_part.yaml", "trainer:\n  use_gpu: false\n  resources_per_worker: !replace {CPU: 3}\n"
                                      "  ema:\n    decay: !delete\n")
    top = write(tmp_path / "top.yaml", "base: [gpu.yaml, cpu_part.yaml]\n")
    cfg = load_config(top)
    assert cfg.trainer.resources_per_worker == {"CPU": 3} and cfg.trainer.ema.decay == 0.9999  # the default


def test_deleting_a_key_restores_its_default_or_removes_it(tmp_path, gpu_base):
    cfg = load_config(gpu_base, ["trainer.use_gpu=false", "~trainer.resources_per_worker.GPU", "~trainer.ema.decay"])
    assert cfg.trainer.resources_per_worker == {"CPU": 4} and cfg.trainer.ema.decay == 0.9999
    assert load_config(gpu_base, ["~trainer.resources_per_worker"]).trainer.resources_per_worker == {"CPU": 1}
    # in a flow mapping a space ends the tag: PyYAML would read `!delete}` as one
    child = write(tmp_path / "cpu.yaml", "base: gpu.yaml\ntrainer:\n  use_gpu: false\n"
                                         "  resources_per_worker: {GPU: !delete }\n")
    assert load_config(child).trainer.resources_per_worker == {"CPU": 4}
    # `null` stays a value, not a deletion
    assert load_config(gpu_base, ["eval.every_kimg=null"]).eval.every_kimg is None


def test_deleting_what_nothing_set_is_an_error_naming_the_key_and_where(tmp_path, gpu_base):
    with pytest.raises(ConfigError, match=r"command line: trainer\.resources_per_worker\.GPUU: dropped .* no base"):
        load_config(gpu_base, ["~trainer.resources_per_worker.GPUU"])
    child = write(tmp_path / "child.yaml", "base: gpu.yaml\noptimizer:\n  lr: !delete\n")
    with pytest.raises(ConfigError, match=rf"{child}: optimizer\.lr: dropped"):
        load_config(child)


def test_misused_marks_are_errors():
    with pytest.raises(ConfigError, match="takes no value"):
        parse_override("~trainer.num_workers=2")
    with pytest.raises(ConfigError, match="!replace marks a mapping"):
        parse_override("trainer.num_workers=!replace 3")
    assert parse_override("trainer.resources_per_worker.GPU=!delete") == (
        ("trainer", "resources_per_worker", "GPU"), DELETE)
    assert pickle.loads(pickle.dumps(DELETE)) is DELETE


def test_bad_tag_in_a_file_names_its_line(tmp_path):
    path = write(tmp_path / "x.yaml", TINY_UNET + "eval:\n  steps: !replace 4\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: not valid YAML: !replace marks a mapping"):
        load_config(path)


def test_use_gpu_false_with_a_gpu_entry_names_both_keys_and_their_files():
    with pytest.raises(ConfigError) as err:
        load_config(UNET_R3, ["trainer.use_gpu=false"])
    message = str(err.value)
    assert "\n" not in message
    assert "trainer.use_gpu (command line) is false" in message
    assert f"trainer.resources_per_worker.GPU ({PIXEL_BASE}) is 1" in message
    assert "trainer.resources_per_worker:={CPU: 2}" in message and "set trainer.use_gpu=true" in message
    with pytest.raises(ConfigError, match=r"trainer\.use_gpu \(its default\) is false"):
        load_config(UNET_R3, ["~trainer.use_gpu"])


@pytest.mark.parametrize("use_gpu,resources", [(False, {"CPU": 2}), (False, {"CPU": 2, "GPU": 1}),
                                               (True, {"CPU": 2}), (True, {"GPU": 1, "CPU": 4})])
def test_the_schema_refuses_exactly_what_rays_scaling_config_refuses(gpu_base, use_gpu, resources):
    from ray.train import ScalingConfig  # builds no cluster

    try:
        ScalingConfig(num_workers=2, use_gpu=use_gpu, resources_per_worker=resources)
        ray_refuses = False
    except ValueError:
        ray_refuses = True
    overrides = [f"trainer.use_gpu={str(use_gpu).lower()}",
                 "trainer.resources_per_worker:={" + ", ".join(f"{k}: {v}" for k, v in resources.items()) + "}"]
    try:
        load_config(gpu_base, overrides)
        we_refuse = False
    except ConfigError:
        we_refuse = True
    assert we_refuse == ray_refuses


def test_cli_points_the_production_config_at_a_cpu_box():
    runner = CliRunner()
    ok = runner.invoke(app, ["config", str(UNET_R3), *CPU_ONLY])
    assert ok.exit_code == 0, ok.output
    section = ok.stdout.split("resources_per_worker:\n", 1)[1].split("\n  placement:")[0]
    assert section.split() == ["CPU:", "2.0"]
    bad = runner.invoke(app, ["config", str(UNET_R3), "trainer.use_gpu=false"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "trainer.resources_per_worker.GPU" in lines[0]


def test_tune_grid_overrides_replace_and_delete_in_each_trial(tmp_path, gpu_base):
    from facediff.tune.space import split_overrides

    grid_file = write(tmp_path / "grid.yaml", "train_config: gpu.yaml\nmetric: loss\n"
                      "overrides:\n  trainer.use_gpu: false\n  trainer.resources_per_worker: !replace {CPU: 2}\n"
                      "  trainer.ema.decay: !delete\nsearch_space:\n  optimizer.lr: {grid: [1.0e-4, 2.0e-4]}\n")
    grid, base = load_grid(grid_file)
    assert base.trainer.resources_per_worker == {"CPU": 2} and base.trainer.ema.decay == 0.9999
    # the command line of `facediff tune`: training keys go under the grid's overrides, in every form
    grid_keys, train = split_overrides(["num_samples=2", "trainer.resources_per_worker:={CPU: 3}", "~trainer.ema"])
    assert grid_keys == ["num_samples=2"]
    assert train == ["overrides.trainer.resources_per_worker:={CPU: 3}", "~overrides.trainer.ema"]
    grid, base = load_grid(write(tmp_path / "plain.yaml", "train_config: gpu.yaml\nmetric: loss\nsearch_space:\n"
                                 "  optimizer.lr: {grid: [1.0e-4]}\n"), ["overrides.trainer.use_gpu=false", *train])
    assert base.trainer.resources_per_worker == {"CPU": 3} and base.trainer.ema.decay == 0.9999
