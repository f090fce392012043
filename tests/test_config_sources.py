"""Config errors name the source that set each key they are about (the innermost config file, or the command
line), checks across keys included; list-shape errors give the counts; the trainer keys that would hang a run,
slow it 30x or be silently overridden are refused at load. No Ray."""

import shutil

import pytest
from typer.testing import CliRunner

from facediff.cli.main import app
from facediff.config import ConfigError, load_config

from conftest import REPO

TINY = REPO / "configs" / "experiments" / "tiny" / "tiny_unet.yaml"


@pytest.fixture
def my_exp(tmp_path, monkeypatch):
    """A user's copy `my/exp.yaml` over the tiny config (`base:` is relative to the file), run from the folder
    above it with relative paths, as the issue's user did."""
    (tmp_path / "my").mkdir()
    shutil.copy(TINY, tmp_path / "my" / "tiny_unet.yaml")
    monkeypatch.chdir(tmp_path)

    def write(body: str = ""):
        (tmp_path / "my" / "exp.yaml").write_text("base: tiny_unet.yaml\n" + body)
        return "my/exp.yaml"
    return write


def error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


def test_cross_field_model_error_names_each_keys_own_file(my_exp, tmp_path):
    exp, base = tmp_path / "my" / "exp.yaml", tmp_path / "my" / "tiny_unet.yaml"
    message = error(my_exp("model:\n  block_out_channels: [32, 64, 128]\n"))
    assert f"model.block_out_channels ({exp}) has 3 entries" in message
    assert f"model.down_block_types ({base}) has 2" in message and f"model.up_block_types ({base}) 2" in message
    # the same value on the command line is blamed on the command line, not on either file
    message = error(my_exp(), ["model.block_out_channels=[32,64,128]"])
    assert "model.block_out_channels (command line) has 3 entries" in message and str(exp) not in message


def test_cross_section_error_names_the_command_line_and_the_base(my_exp, tmp_path):
    message = error(my_exp("description: mine\n"), ["model.sample_size=64"])
    assert (f"model.sample_size (command line) is 64 but data.image_size ({tmp_path / 'my' / 'tiny_unet.yaml'}) "
            "is 32") in message
    assert "exp.yaml" not in message and "top level" not in message


def test_a_key_at_its_default_says_so(my_exp):
    message = error(my_exp(), ["trainer.gpu.autocast=bf16", "trainer.precision=bf16"])
    assert "trainer.gpu.autocast (command line) is bf16" in message and "trainer.precision (command line)" in message
    message = error(my_exp(), ["trainer.precision=fp16"])
    assert "trainer.use_gpu (its default) is false" in message


def test_list_shape_errors_give_the_counts(my_exp, tmp_path):
    assert error(my_exp(), ["optimizer.betas=[0.9]"]).endswith(
        "command line: optimizer.betas: expected 2 values, got 1")
    assert error(my_exp("optimizer:\n  betas: [0.9, 0.99, 0.999]\n")).endswith(
        f"{tmp_path / 'my' / 'exp.yaml'}: optimizer.betas: expected 2 values, got 3")


@pytest.mark.parametrize("name,known", [("CPUS", "CPU"), ("cpu", "CPU"), ("gpus", "GPU"), ("Memory", "memory")])
def test_a_misspelt_ray_resource_is_refused_with_its_spelling(name, known):
    # mappings merge: {CPUS: 1} lands beside the tiny config's CPU: 0.5 and would ask Ray for both
    message = error(TINY, [f"trainer.resources_per_worker={{{name}: 1}}"])
    assert f"command line: trainer.resources_per_worker.{name}: not a Ray resource; did you mean {known}?" in message


def test_custom_resources_pass_the_load_and_are_left_to_the_cluster_check():
    cfg = load_config(TINY, ["trainer.resources_per_worker={ssd: 1, accelerator_type:A100: 0.01}"])
    assert cfg.trainer.resources_per_worker == {"CPU": 0.5, "ssd": 1.0, "accelerator_type:A100": 0.01}


def test_fp16_is_refused_on_cpu_workers_only():
    assert load_config(TINY, ["trainer.precision=bf16"]).trainer.precision == "bf16"
    assert load_config(TINY, ["trainer.precision=fp16", "trainer.use_gpu=true"]).trainer.precision == "fp16"
    assert "use trainer.precision=bf16" in error(TINY, ["trainer.precision=fp16"])


@pytest.mark.parametrize("deepspeed,instead", [
    ("{gradient_accumulation_steps: 4}", "trainer.grad_accum"),
    ("{train_micro_batch_size_per_gpu: 4}", "trainer.batch_size"),
    ("{gradient_clipping: 0.5}", "optimizer.grad_clip"),
    ("{zero_optimization: {stage: 2}}", "trainer.zero_stage"),
    ("{bf16: {enabled: true}}", "trainer.precision"),
    ("{optimizer: {type: Adam}}", "the optimizer section"),
])
def test_deepspeed_keys_facediff_sets_are_refused_naming_its_key(deepspeed, instead):
    message = error(TINY, [f"trainer.deepspeed={deepspeed}", "trainer.grad_accum=2"])
    assert message.startswith("invalid config: command line: trainer.deepspeed.") and f"from {instead}" in message


def test_other_deepspeed_keys_pass_through():
    cfg = load_config(TINY, ["trainer.deepspeed={zero_optimization: {overlap_comm: true}, fp16: {loss_scale: 0}}"])
    assert cfg.trainer.deepspeed["zero_optimization"] == {"overlap_comm": True}


def test_the_cli_refuses_a_misspelt_resource_in_one_line():
    # `facediff train` loads the config the same way (cli._load), before Ray starts
    result = CliRunner().invoke(app, ["config", str(TINY), "trainer.resources_per_worker={CPUS: 1}"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [
        "error: invalid config: command line: trainer.resources_per_worker.CPUS: not a Ray resource; did you mean "
        "CPU? (names are case-sensitive; command line: `~trainer.resources_per_worker.CPUS` drops it, "
        "`trainer.resources_per_worker:={CPU: ...}` replaces the mapping)"]
