"""Ray Train + DeepSpeed end to end on CPU: resume after a crash, FailureConfig restarts, ZeRO-3 EMA, export."""

import json

import pytest
import ray.exceptions
import torch
from diffusers import DDPMPipeline, DiTTransformer2DModel
from safetensors.torch import load_file

from facediff.config import load_config
from facediff.tasks import build_task
from facediff.train.engine import lr_factor, safe_checkpoint_engine
from facediff.train.progress import read_metrics
from facediff.train.run import train

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]
STEPS = 8  # 44 train rows, 2 workers x batch 4: 5 steps per epoch, so the run crosses an epoch boundary


def config(synthetic_shards, tmp_path, path="configs/experiments/tiny_unet.yaml", extra=()):
    return load_config(path, [
        f"data.path={synthetic_shards}", f"trainer.storage_path={tmp_path / 'runs'}", "trainer.run_name=run",
        "trainer.batch_size=4", f"trainer.total_kimg={STEPS * 8 / 1000}", "trainer.checkpoint_every_kimg=0.016",
        "trainer.log_every_steps=1", "trainer.keep_last=2", "trainer.zero_stage=2", "optimizer.warmup_steps=4", "optimizer.schedule=cosine",
        "trainer.ema.warmup=false", "trainer.ema.decay=0.9", *extra,
    ])


def test_rerun_resumes_after_crash_and_exports(synthetic_shards, tmp_path):
    cfg = config(synthetic_shards, tmp_path)
    fault = {"crash_at_step": 5, "marker": str(tmp_path / "crashed")}
    with pytest.raises(Exception, match="injected worker crash at step 5"):
        train(cfg, fault=fault)
    run = tmp_path / "runs" / "run"
    before = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in before] == [1, 2, 3, 4]  # last checkpoint: step 4

    train(cfg, fault=fault)  # the same command again: resumes from step 4
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert (run / "metrics.jsonl").read_text().splitlines()[:4] == before  # steps 1-4 were not re-run
    total = STEPS
    for r in rows:  # the schedule continues: no second warm-up after the resume
        assert r["lr"] == pytest.approx(cfg.optimizer.lr * lr_factor(r["step"] - 1, 4, total, "cosine", 0.0))
    assert rows[-1]["epoch"] == 1 and rows[-1]["kimg"] == pytest.approx(STEPS * 8 / 1000)
    kept = sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir())  # keep_last=2
    assert kept == ["checkpoint_000000006", "checkpoint_000000008"]
    final = run / "checkpoint_000000008"
    assert json.loads((final / "trainer_state.json").read_text())["step"] == STEPS
    ema = load_file(str(final / "ema.safetensors"))
    assert int(ema["ema_step"]) == STEPS  # the EMA was restored, not restarted

    # the EMA weights moved away from the initial weights and differ from the raw trained weights
    torch.manual_seed(cfg.trainer.seed)
    initial = build_task(cfg).state_dict()
    raw = safe_checkpoint_engine(None).load(str(final / "state" / "mp_rank_00_model_states.pt"))["module"]
    moved = [k for k in initial if f"ema.{k}" in ema and not torch.allclose(ema[f"ema.{k}"], initial[k])]
    differs = [k for k in raw if f"ema.{k}" in ema and not torch.allclose(ema[f"ema.{k}"], raw[k].float())]
    assert len(moved) > 0.9 * len(initial) and len(differs) > 0.9 * len(initial)

    pipeline = DDPMPipeline.from_pretrained(run / "export")  # plain diffusers, no facediff
    images = pipeline(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 32, 32, 3)
    assert torch.allclose(pipeline.unet.conv_in.weight, ema["ema.net.conv_in.weight"])


def test_worker_crash_restarts_from_checkpoint(synthetic_shards, tmp_path):
    cfg = config(synthetic_shards, tmp_path, extra=["trainer.max_failures=1", f"trainer.total_kimg={6 * 8 / 1000}"])
    train(cfg, fault={"crash_at_step": 3, "marker": str(tmp_path / "crashed")})
    assert (tmp_path / "crashed").exists()  # the crash did happen
    rows = read_metrics(tmp_path / "runs" / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_zero3_dit_with_ema_and_fallback_metric(synthetic_shards, tmp_path):
    cfg = config(synthetic_shards, tmp_path, "configs/experiments/tiny_dit.yaml", [
        "trainer.zero_stage=3", f"trainer.total_kimg={4 * 8 / 1000}", "eval.every_kimg=0.032", "eval.steps=2",
        "eval.batch_size=4",
    ])
    train(cfg)
    run = tmp_path / "runs" / "run"
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert "fid" not in rows[-1] and rows[-1]["fd_mtcnn_onet"] > 0  # no Inception weights here: labelled fallback
    ema = load_file(str(run / "checkpoint_000000004" / "ema.safetensors"))
    shapes = {f"ema.{k}": tuple(v.shape) for k, v in build_task(cfg).named_parameters()}
    assert {k: tuple(v.shape) for k, v in ema.items() if k != "ema_step"} == shapes  # gathered, not shards
    model = DiTTransformer2DModel.from_pretrained(run / "export" / "transformer")
    assert torch.allclose(model.pos_embed.proj.weight, ema["ema.net.pos_embed.proj.weight"])
