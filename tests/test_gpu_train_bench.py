"""`benchmarks/gpu_train.py`'s bare step runs in `trainer.precision` the way the trainer's DeepSpeed engine does,
so `make gpu-check`'s trainer / benchmark ratio compares the same step (no Ray: one in-process gloo group)."""

import importlib.util
import socket

import pytest
import torch

from facediff.config import load_config

from conftest import REPO

EXPERIMENTS = REPO / "configs" / "experiments"


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_train", REPO / "benchmarks" / "gpu_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seg_config(precision):
    # tiny_lc_unet_seg: trained UNet, embedder and SegFormer, a float buffer (the mask palette); no clipping, so
    # DeepSpeed's step is AdamW alone
    return load_config(EXPERIMENTS / "tiny" / "tiny_lc_unet_seg.yaml", [f"trainer.precision={precision}",
                                                                "optimizer.grad_clip=null", "model.attribute_dropout=0",
                                                                "model.mask_dropout=0", "optimizer.warmup_steps=0"])


def batch(n=2, size=32, groups=10):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(n, 3, size, size, generator=g) * 2 - 1,
            "attributes": (torch.rand(n, 40, generator=g) < 0.4).float(),
            "part_masks": (torch.rand(n, groups, size, size, generator=g) < 0.2).float()}


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group for deepspeed.initialize, one per module (DeepSpeed keeps the first group it saw)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as env:
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                           "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
            env.setenv(key, value)
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
        yield
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bare_step_dtypes_and_first_update_match_deepspeeds(process_group, precision):
    from facediff.tasks import build_task
    from facediff.train.engine import build_engine

    bench = load_bench()
    cfg = seg_config(precision)
    task, optimizer, _ = bench.build_bare_step(cfg, torch.device("cpu"))
    engine = build_engine(build_task(cfg, load_pretrained=False), cfg, world_size=1)
    ours, theirs = dict(task.state_dict()), dict(engine.module.state_dict())
    assert ours.keys() == theirs.keys()
    assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in theirs.items()}
    low = bench.LOW_PRECISION.get(precision, torch.float32)
    assert task.unet.dtype == low and task.conditions.masks.palette.dtype == torch.float32  # buffers stay fp32
    assert optimizer.master_dtype == torch.float32  # AdamW keeps fp32 state in every precision

    if precision != "fp32":
        # DeepSpeed's bf16 optimizer at ZeRO-0 (FP16_UnfusedOptimizer.initialize_optimizer_states) steps AdamW once
        # on zero gradients when it is built, so its first real step is Adam's second; do the same here, to
        # compare the updates themselves (the benchmark skips it: it changes numbers, not the cost of a step)
        for master in optimizer.masters:
            master.grad = torch.zeros_like(master)
        optimizer.optimizer.step()
    data = batch()
    for module, step in ((task, optimizer), (engine, engine)):
        torch.manual_seed(0)
        loss = module(data, torch.Generator().manual_seed(0))
        step.backward(loss)
        step.step()
    trained = [n for n, p in task.named_parameters() if p.requires_grad]
    updated = dict(task.named_parameters())
    reference = dict(engine.module.named_parameters())
    for name in trained:
        assert torch.equal(updated[name], reference[name]), name  # the same AdamW update, the same rounding
    # the step changed the weights (two untouched copies would compare equal by themselves)
    fresh = dict(bench.build_bare_step(cfg, torch.device("cpu"))[0].named_parameters())
    assert any(not torch.equal(updated[n], fresh[n]) for n in trained)


def test_fp16_scales_the_loss_and_unscales_the_gradients():
    bench = load_bench()
    linear = torch.nn.Linear(3, 2)
    cast = torch.nn.Sequential(linear)
    bench.cast_like_deepspeed(cast, "fp16")
    cfg = load_config(EXPERIMENTS / "tiny" / "tiny_unet.yaml", ["trainer.precision=fp16", "trainer.use_gpu=true",  # fp16: GPUs
                                                       "optimizer.lr=0.1", "optimizer.warmup_steps=0",
                                                       "optimizer.weight_decay=0"])
    step = bench.MasterWeightAdamW(cast, cfg, fused=False)
    masters_before = [m.detach().clone() for m in step.masters]
    # d(mean of the 2 outputs)/dW = 0.5 * the input 0.5; scaled by 2**16 it still fits in fp16
    step.backward(linear(torch.full((1, 3), 0.5, dtype=torch.float16)).float().mean())
    assert torch.all(linear.weight.grad == bench.FP16_LOSS_SCALE * 0.25)
    step.step()
    # Adam's first step moves every weight by lr against the sign of its gradient, whatever its size; its first
    # moment, (1 - beta1) * gradient, shows the gradient it was given: unscaled
    beta1 = cfg.optimizer.betas[0]
    assert torch.allclose(step.optimizer.state[step.masters[0]]["exp_avg"], torch.full((2, 3), (1 - beta1) * 0.25))
    assert torch.allclose(step.masters[0], masters_before[0] - 0.1, atol=1e-6)
    assert linear.weight.dtype == torch.float16 and torch.equal(linear.weight, step.masters[0].half())
    assert linear.weight.grad is None


def test_channels_last_engine_keeps_nhwc_weights_that_train(process_group):
    """DeepSpeed's initialize views every weight as bytes to broadcast it, which an NHWC conv weight refuses: the
    engine re-lays the weights after it, at ZeRO-0 fp32 (the only combination the config allows), where the
    optimizer steps these very Parameters. CPU workers never resolve channels_last, so the step is forced here."""
    from facediff.config import ConfigError
    from facediff.tasks import build_task
    from facediff.train.engine import GpuStep, build_engine

    cfg = load_config(EXPERIMENTS / "tiny" / "tiny_unet.yaml", ["trainer.gpu.channels_last=true", "optimizer.warmup_steps=0"])
    step = GpuStep(cfg, "cpu")
    step.channels_last = True  # what a CUDA worker resolves
    engine = build_engine(build_task(cfg, load_pretrained=False), cfg, world_size=1, step=step)
    conv = next(m for m in engine.module.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    before = conv.weight.detach().clone()
    data = step.batch({"image": torch.rand(2, 3, cfg.data.image_size, cfg.data.image_size) * 2 - 1})
    engine.backward(engine(data, torch.Generator().manual_seed(0)))
    engine.step()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    assert not torch.equal(conv.weight, before)  # the optimizer's update reached the NHWC weight
    for refused in (["trainer.precision=bf16"], ["trainer.zero_stage=2"]):
        with pytest.raises(ConfigError, match="channels_last .*needs DeepSpeed to keep the module's own weights"):
            load_config(EXPERIMENTS / "tiny" / "tiny_unet.yaml", ["trainer.gpu.channels_last=true", *refused])
