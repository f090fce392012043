"""The sd_lora family: LoRA-only training, phased timesteps, EMA of the adapter, resume, diffusers LoRA export."""

import subprocess
import sys

import pytest
import torch

from facediff import diffusion
from facediff.config import ConfigError, load_config
from facediff.models.info import describe
from facediff.tasks import build_task

from conftest import REPO, assert_grids

TINY = REPO / "configs" / "experiments" / "tiny" / "tiny_sd_lora.yaml"
SETUP1 = REPO / "configs" / "experiments" / "celebamask" / "sd2_lora.yaml"


def test_info_reports_the_frozen_sd2_base_and_the_lora():
    rows = {r["name"]: r for r in describe(load_config(SETUP1))}
    assert rows["unet"]["frozen"] == 865_910_724 and rows["vae"]["frozen"] == 83_653_863
    assert rows["text_encoder"]["frozen"] == 340_387_840
    # r = 24 on the attention projections, proj_in/out and the down/upsampler convs, nothing else trains
    assert rows["unet"]["trainable"] == 7_483_392
    assert rows["vae"]["trainable"] == rows["text_encoder"]["trainable"] == 0


def test_setup_configs_and_refusals():
    setup2 = load_config(REPO / "configs" / "experiments" / "celebamask" / "sd2_lora_setup2.yaml")
    assert setup2.diffusion.timestep_phases == [] and not setup2.trainer.ema.enabled
    assert setup2.model.guidance_scale == 7.5 and setup2.model.lora.dropout == 0.1
    with pytest.raises(ConfigError, match="trainer.zero_stage: 3 would partition the frozen VAE"):
        load_config(TINY, ["trainer.zero_stage=3"])
    with pytest.raises(ConfigError, match="diffusion.prediction_type: a 'sd_lora' model uses its pipeline's own"):
        load_config(TINY, ["diffusion.prediction_type=v_prediction"])


@pytest.mark.parametrize("progress,bands", [
    (0.1, {(500, 1000): 2.5 * 500 / (2.5 * 500 + 500)}),
    (0.5, {(250, 750): 3.0 * 500 / (3.0 * 500 + 500)}),
    (0.9, {(0, 250): 1.5 * 250 / 1500, (250, 500): 2.5 * 250 / 1500, (500, 1000): 500 / 1500}),
])
def test_phased_timesteps_follow_the_band_weights(progress, bands):
    cfg = load_config(TINY)
    loss = diffusion.DenoisingLoss(build_task(cfg, load_pretrained=False).scheduler, cfg.diffusion.timestep_phases)
    t = loss.draw_timesteps(200_000, torch.Generator().manual_seed(0), progress)
    for (lo, hi), want in bands.items():
        assert ((t >= lo) & (t < hi)).float().mean().item() == pytest.approx(want, abs=0.006)
    uniform = diffusion.DenoisingLoss(loss.scheduler).draw_timesteps(200_000, torch.Generator().manual_seed(0), 0.1)
    assert (uniform >= 500).float().mean().item() == pytest.approx(0.5, abs=0.006)


def test_only_lora_trains_and_prompts_come_from_attributes():
    cfg = load_config(TINY)
    task = build_task(cfg)
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    base = {n: p.detach().clone() for n, p in task.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-2)
    attributes = torch.zeros(4, 40)
    attributes[:, 31] = 1  # Smiling
    batch = {"image": torch.rand(4, 3, 32, 32) * 2 - 1, "attributes": attributes}
    for _ in range(3):
        task(batch, torch.Generator().manual_seed(0)).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(base[n], p) for n, p in task.named_parameters() if not p.requires_grad)
    assert any(p.abs().sum() > 0 for n, p in task.named_parameters() if ".lora_B." in n)  # B starts at 0
    assert task.prompts(attributes[:1]) == ["A photo of a person with smiling"]
    uncond = build_task(load_config(TINY, ["model.conditional=false"]), load_pretrained=False)
    assert uncond.prompts(attributes[:2]) == ["A photo of a person"] * 2


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_ray_training_resume_ema_and_plain_diffusers_export(ray_session, synthetic_shards, tmp_path):
    from safetensors.torch import load_file

    from facediff.train.run_log import read_metrics
    from facediff.train.run import train

    def cfg(steps):
        return load_config(TINY, [f"data.path={synthetic_shards}", f"trainer.storage_path={tmp_path}",
                                  "trainer.run_name=run", "trainer.batch_size=4", "trainer.zero_stage=2",
                                  "trainer.precision=bf16",  # sd2_lora's precision
                                  f"trainer.total_kimg={steps * 8 / 1000}", "trainer.checkpoint_every_kimg=0.016",
                                  "trainer.log_every_steps=1", "trainer.ema.decay=0.5",
                                  "eval.sample_grid=4", "eval.sample_grid_steps=2"])  # a grid at each run's end

    run = train(cfg(4))
    train(cfg(8))  # the same run, longer: resumes at step 4 (in a later timestep phase), LoRA + EMA + optimizer
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    # the training-time grids of the attribute prompts, kept across the resume (TensorBoard purges only later steps)
    assert_grids(run, ["kimg_00000.032.png", "kimg_00000.064.png"], [4, 8], (2 + 2 * 34, 2 + 2 * 34, 3))
    assert all(0 < r["loss"] < 10 for r in rows)  # finite in bf16
    ema = load_file(str(run / "checkpoint_000000008" / "ema.safetensors"))
    assert int(ema["ema_step"]) == 8 and all(".lora_" in k for k in ema if k != "ema_step")  # the adapter only
    raw = {k: v for k, v in build_task(cfg(8)).named_parameters() if v.requires_grad}
    initial_b = [k for k in raw if ".lora_B." in k]
    assert any(ema[f"ema.{k}"].abs().sum() > 0 for k in initial_b)  # the averaged adapter moved off B = 0

    # plain diffusers, no facediff: the exported base alone, then with the LoRA
    script = f"""
import sys, torch
from diffusers import StableDiffusionPipeline
assert "facediff" not in sys.modules
pipe = StableDiffusionPipeline.from_pretrained({str(run / 'export' / 'base')!r}, safety_checker=None)
def draw():
    g = torch.Generator().manual_seed(0)
    return pipe("A photo of a person with smiling", num_inference_steps=3, generator=g, output_type="np").images
before = draw()
pipe.load_lora_weights({str(run / 'export')!r})
after = draw()
print(before.shape, float(abs(after - before).max()))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    shape, change = done.stdout.strip().rsplit(" ", 1)
    assert shape == "(1, 32, 32, 3)" and float(change) > 1e-3  # the LoRA changes the output
    exported = load_file(str(run / "export" / "pytorch_lora_weights.safetensors"))
    assert len(exported) == len(raw)
    for key in initial_b[:3]:  # the export is the EMA adapter
        name = key.removeprefix("backbone.").replace(".default.", ".")
        assert torch.equal(exported[name], ema[f"ema.{key}"])
