"""The controlnet family end to end on the embedded people scenes: Ray Train + DeepSpeed, resume, evaluation on
the validation captions, and an export that plain diffusers loads into StableDiffusionControlNetPipeline."""

import subprocess
import sys

import pytest
import torch

from facediff.config import load_config

from conftest import REPO, assert_grids

TINY = REPO / "configs" / "experiments" / "tiny" / "tiny_controlnet.yaml"


@pytest.mark.ray
def test_ray_training_resume_evaluation_and_plain_diffusers_export(ray_session, coco_shards, tmp_path):
    from safetensors.torch import load_file

    from facediff.train.run_log import read_metrics
    from facediff.train.run import train

    def cfg(steps):
        kimg = steps * 8 / 1000
        return load_config(TINY, [f"data.path={coco_shards}", f"trainer.storage_path={tmp_path}",
                                  "trainer.run_name=run", "trainer.zero_stage=2", f"trainer.total_kimg={kimg}",
                                  "trainer.precision=bf16",  # every mask_ldm config's precision
                                  "trainer.checkpoint_every_kimg=0.016", "trainer.log_every_steps=1",
                                  "trainer.ema.decay=0.5", "loss.perceptual_timestep_threshold=1000",
                                  f"eval.every_kimg={kimg}", "eval.num_samples=4", "eval.steps=2",
                                  "eval.sample_grid=4", "eval.sample_grid_steps=2"])

    run = train(cfg(2))
    train(cfg(4))  # the same run, longer: resumes at step 2 with the ControlNet, its EMA and the optimizer
    rows = read_metrics(run)
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3, 4]
    trained = [r for r in rows if "loss" in r]
    assert all(r["loss_lpips"] > 0 and r["below_threshold"] == 1.0 for r in trained)  # T = 1000: every sample
    assert all(0 < r["loss"] < 100 and r["loss_face"] >= 0 for r in trained)  # finite in bf16
    # the training-time grids of the test records' captions and people maps, at each run's end
    assert_grids(run, ["kimg_00000.016.png", "kimg_00000.032.png"], [2, 4], (2 + 2 * 66, 2 + 2 * 66, 3))
    evaluated = [r for r in rows if any(k == "fid" or k.startswith("fd_") for k in r)]
    assert evaluated and evaluated[-1]["step"] == 4
    ema = load_file(str(run / "checkpoint_000000004" / "ema.safetensors"))
    assert int(ema["ema_step"]) == 4 and all(k.startswith("ema.controlnet.") for k in ema if k != "ema_step")
    states = torch.load(next((run / "checkpoint_000000004").rglob("mp_rank_00_model_states.pt")),
                        map_location="cpu", weights_only=False)["module"]
    # the frozen pipeline is not copied (small frozen buffers of the perceptual networks are)
    assert any(k.startswith("controlnet.") for k in states) and not any(k.startswith("backbone.") for k in states)

    script = f"""
import sys, torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
assert "facediff" not in sys.modules
base = {str(run / 'export' / 'base')!r}
controlnet = ControlNetModel.from_pretrained({str(run / 'export' / 'controlnet')!r})
pipe = StableDiffusionControlNetPipeline.from_pretrained(base, controlnet=controlnet, safety_checker=None)
plain = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
def draw(p, **kw):
    return p("two people standing", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
             output_type="np", height=64, width=64, **kw).images
with_branch = draw(pipe, image=torch.zeros(1, 3, 64, 64))
print(with_branch.shape, float(abs(with_branch - draw(plain)).max()))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    shape, change = done.stdout.strip().rsplit(" ", 1)
    assert shape == "(1, 64, 64, 3)" and float(change) > 1e-4  # the trained branch changes the output
