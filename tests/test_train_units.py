"""Training pieces without Ray: LR schedule, EMA maths, DeepSpeed config, the denoising loss and samplers (in fp32
under bf16), checkpointed RNG and data positions."""

import math

import pytest
import torch
from torch import nn

from facediff import diffusion
from facediff.config.schema import DiffusionConfig, EMAConfig
from facediff.train import checkpoint
from facediff.models.weights import copy_weights
from facediff.train.ema import EMA
from facediff.train.engine import GpuStep, build_optimizer, deepspeed_config, lr_factor, total_steps


def test_lr_warms_up_then_decays_by_cosine():
    factors = [lr_factor(s, warmup=10, total=110, schedule="cosine", min_ratio=0.1) for s in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[:10], factors[1:10]))  # strictly rising warm-up
    assert factors[10] == pytest.approx(1.0) and factors[60] == pytest.approx(0.55)
    assert lr_factor(110, 10, 110, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(50, 10, 110, "constant", 0.1) == 1.0


def test_ema_tracks_and_lags_the_weights():
    net = nn.Linear(4, 4)
    ema = EMA(net, EMAConfig(decay=0.9, warmup=False, start_step=2))
    start = net.weight.detach().clone()
    for _ in range(2):  # before start_step the average copies the weights
        with torch.no_grad():
            net.weight.add_(1.0)
        assert ema.update(net) == 0.0
    assert torch.equal(ema.shadow[0], net.weight.detach())
    with torch.no_grad():
        net.weight.add_(1.0)
    assert ema.update(net) == 0.9
    expected = 0.9 * (start + 2) + 0.1 * (start + 3)
    assert torch.allclose(ema.shadow[0], expected)
    copy = nn.Linear(4, 4)
    ema.copy_to(copy)
    assert torch.allclose(copy.weight, expected) and not torch.allclose(copy.weight, net.weight)


def test_copy_weights_takes_the_trained_weights():
    source, target = nn.Linear(3, 3), nn.Linear(3, 3)
    copy_weights(source, target)
    assert torch.equal(source.weight, target.weight) and torch.equal(source.bias, target.bias)


def test_ema_warmup_and_state_round_trip():
    net = nn.Linear(2, 2)
    ema = EMA(net, EMAConfig(decay=0.999, warmup=True, inv_gamma=1.0, power=0.75))
    decays = [ema.decay(s) for s in (1, 10, 1000, 10**7)]
    assert decays[0] == pytest.approx(1 - 2**-0.75) and decays == sorted(decays) and decays[-1] == 0.999
    ema.update(net)
    other = EMA(nn.Linear(2, 2), EMAConfig())
    other.load_state_dict(ema.state_dict())
    assert other.step == 1 and all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))
    assert EMA(net, EMAConfig(enabled=False)).decay(100) == 0.0  # disabled: the "average" is the weights


def test_ema_restores_onto_the_live_parameters_device():
    """A checkpoint's EMA is read to the CPU; it must land where the live averages are (the GPU; "meta" here),
    or the first update after a resume fails with a device mismatch."""
    net = nn.Linear(4, 2).to("meta")
    ema = EMA(net, EMAConfig(warmup=False, decay=0.5))
    state = {"ema.weight": torch.ones(2, 4), "ema.bias": torch.ones(2), "ema_step": torch.tensor(7)}
    ema.load_state_dict(state)
    assert {t.device.type for t in ema.shadow} == {"meta"} and ema.step == 7
    ema.update(net)  # would raise on a CPU shadow beside meta parameters
    with pytest.raises(ValueError, match="other shapes"):
        ema.load_state_dict({"ema.weight": torch.ones(3, 4), "ema.bias": torch.ones(2), "ema_step": torch.tensor(1)})


def test_deepspeed_config_follows_trainer(tiny_config):
    cfg = tiny_config(["trainer.zero_stage=3", "trainer.precision=bf16", "trainer.grad_accum=4",
                       "optimizer.grad_clip=0.5", "trainer.deepspeed={zero_optimization: {overlap_comm: true}}"])
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert total_steps(cfg, world_size=2) == math.ceil(cfg.trainer.total_kimg * 1000 / (8 * 4 * 2))


def test_gpu_step_options_apply_only_on_a_gpu_and_one_mixed_precision_at_a_time(tiny_config):
    from facediff.config import ConfigError

    cfg = tiny_config(["trainer.gpu.channels_last=true", "trainer.gpu.autocast=bf16", "trainer.gpu.compile=true"])
    cpu = GpuStep(cfg, "cpu")
    assert not (cpu.channels_last or cpu.autocast or cpu.compile or cpu.fused_adamw)  # a CPU worker runs plain
    batch = {"image": torch.zeros(2, 3, 8, 8), "id": torch.arange(2)}
    assert cpu.batch(batch) is batch
    on = GpuStep(cfg, "cpu")
    on.channels_last = True  # what a CUDA worker resolves; the layout change itself is device-independent
    out = on.batch({**batch, "parts": torch.zeros(2, 8, 8, dtype=torch.uint8)})
    assert out["image"].is_contiguous(memory_format=torch.channels_last) and not out["image"].is_contiguous()
    assert out["id"] is batch["id"] and out["parts"].is_contiguous()  # only 4-D float tensors change layout
    optimizer, _ = build_optimizer(nn.Linear(2, 2), cfg, 1, fused=False)
    assert not optimizer.defaults["fused"]
    with pytest.raises(ConfigError, match=r"trainer.gpu.autocast \(command line\) is bf16, .* trainer.precision \(command line\) is bf16"):
        tiny_config(["trainer.gpu.autocast=bf16", "trainer.precision=bf16"])


def test_noise_and_timesteps_are_drawn_on_the_generators_device():
    """A training generator lives on the worker's device and draws happen there (the CPU here: no GPU in CI);
    the same seed draws the same timesteps and noise."""
    loss = diffusion.DenoisingLoss(diffusion.build_noise_scheduler(DiffusionConfig()))
    x0 = torch.zeros(4, 3, 8, 8)
    draws = [loss.noise(x0, torch.Generator().manual_seed(7)) for _ in range(2)]
    for a, b in zip(*draws):
        assert torch.equal(a, b)
    _, t, noise = draws[0]
    assert t.device.type == noise.device.type == "cpu" and 0 <= t.min() and t.max() < 1000
    assert 0.5 < noise.std() < 1.5


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoising_loss_targets_and_x0_inversion(prediction_type):
    """From bf16 images too, the noised input, the target and the x0 estimate are fp32 and exact at every t (in
    bf16 the small-t estimates were off by whole units)."""
    scheduler = diffusion.build_noise_scheduler(DiffusionConfig(prediction_type=prediction_type))
    loss = diffusion.DenoisingLoss(scheduler)
    x0 = torch.rand(64, 3, 8, 8, dtype=torch.bfloat16) * 2 - 1
    g = torch.Generator().manual_seed(0)
    x_t, t, noise = loss.noise(x0, g)
    target = loss.target(x0, noise, t)
    assert x_t.dtype == target.dtype == torch.float32
    # the exact target makes a perfect model: zero loss and an exact one-step x0
    per_sample, extra = loss(lambda x, tt: target, x0, torch.Generator().manual_seed(0))
    assert per_sample.shape == (64,) and torch.allclose(per_sample, torch.zeros(64), atol=1e-10)
    assert torch.allclose(loss.predict_x0(x_t, t, target), x0.float(), atol=1e-4)
    wrong, _ = loss(lambda x, tt: torch.zeros_like(x), x0, torch.Generator().manual_seed(0))
    assert (wrong > 0.01).all()


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++"])
def test_samplers_run_from_noise_with_the_training_schedule(name):
    train_scheduler = diffusion.build_noise_scheduler(DiffusionConfig(beta_end=0.03))
    sampler = diffusion.build_sampler(name, train_scheduler)
    assert sampler.config.beta_end == 0.03
    calls = []

    def model_fn(x, t):
        calls.append(int(t[0]))
        return torch.zeros_like(x)

    out = diffusion.sample(model_fn, sampler, (2, 3, 8, 8), steps=5, generator=torch.Generator().manual_seed(1))
    assert out.shape == (2, 3, 8, 8) and out.abs().max() <= 1 and len(calls) == 5
    assert calls == sorted(calls, reverse=True)  # from noisy to clean
    again = diffusion.sample(model_fn, diffusion.build_sampler(name, train_scheduler), (2, 3, 8, 8), 5,
                             torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match="unknown sampler"):
        diffusion.build_sampler("euler", train_scheduler)


def test_sampling_keeps_its_state_in_fp32():
    """The reverse process accumulates in fp32 even when the network runs in bf16."""
    scheduler = diffusion.build_sampler("ddim", diffusion.build_noise_scheduler(DiffusionConfig()))
    inputs = []

    def model_fn(x, t):
        inputs.append(x.dtype)
        return torch.zeros_like(x)

    out = diffusion.sample(model_fn, scheduler, (2, 3, 8, 8), 4, torch.Generator().manual_seed(0),
                           dtype=torch.bfloat16, clip=None)
    assert out.dtype == torch.float32 and set(inputs) == {torch.bfloat16}
    with pytest.raises(ValueError, match="steps must be >= 1"):
        diffusion.sample(model_fn, scheduler, (2, 3, 8, 8), 0, torch.Generator())


class _RunsCodeWhenUnpickled:
    """What a tampered checkpoint could hold: unpickling it would call `touch` on the marker path."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_deepspeed_checkpoints_load_without_running_pickled_code(tmp_path):
    import pickle

    import torch
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from facediff.train.engine import safe_checkpoint_engine

    engine = safe_checkpoint_engine(None)
    plain = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "zero_stage": ZeroStageEnum.gradients, "ds_version": "0.18"}, plain)
    state = engine.load(str(plain))  # what DeepSpeed itself writes loads
    assert torch.equal(state["module"]["w"], torch.ones(2)) and state["zero_stage"] == ZeroStageEnum.gradients

    marker = tmp_path / "code-ran"
    tampered = tmp_path / "tampered.pt"
    torch.save({"module": {"w": torch.ones(2)}, "extra": _RunsCodeWhenUnpickled(marker)}, tampered)
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        engine.load(str(tampered))
    assert not marker.exists()  # refused before anything ran
    torch.load(tampered, weights_only=False)  # the control: an unsafe load does run it
    assert marker.exists()


def test_deterministic_order_keeps_block_order_without_locality_and_blocks_independent_of_cpus(
        tiny_config, synthetic_shards, monkeypatch):
    from facediff.data.stream.dataset import _default_read_parallelism
    from facediff.train.run import data_config

    fixed, default = data_config(tiny_config(["data.deterministic_order=true"])), data_config(tiny_config())
    # what Ray Train applies to the split it deals to the workers (`DataConfig.configure`)
    assert fixed._resolve_execution_options("train").preserve_order and not fixed._enable_shard_locality
    assert not default._resolve_execution_options("train").preserve_order and default._enable_shard_locality
    # a big node outside Ray (a test session's Ray would be asked for its CPUs instead): two blocks per CPU
    monkeypatch.setattr("facediff.data.stream.dataset.ray.is_initialized", lambda: False)
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert _default_read_parallelism(synthetic_shards, "train", 6) == 128
    assert _default_read_parallelism(synthetic_shards, "train", 6, per_cpu=False) == 6  # one per file


def test_read_blocks_hold_more_rows_of_smaller_images(synthetic_shards, monkeypatch):
    """Each read+decode task gets about the same work: at 64 px, 512-row blocks streamed 2,271 img/s against
    1,710 with 128-row ones (benchmarks/data_throughput.py; docs/benchmarks.md)."""
    from facediff.data.stream.dataset import _default_read_parallelism

    monkeypatch.setattr("facediff.data.stream.dataset.split_rows", lambda dataset, split: 8192)
    blocks = {size: _default_read_parallelism(synthetic_shards, "train", 8, per_cpu=False, image_size=size)
              for size in (32, 64, 128, 256, 512)}
    assert blocks == {32: 16, 64: 16, 128: 32, 256: 64, 512: 64}  # 512 rows a block at most, 128 at least


def test_checkpoint_saves_and_restores_the_cuda_rng(monkeypatch):
    state = {"now": torch.arange(16, dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a: state["now"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, *a: state.update(now=s.clone()))
    saved = checkpoint.rng_state(torch.Generator().manual_seed(3))
    assert torch.equal(saved["cuda"], torch.arange(16, dtype=torch.uint8))
    state["now"] = torch.zeros(16, dtype=torch.uint8)  # training moved the CUDA generator on
    checkpoint.restore_rng(saved, torch.Generator())
    assert torch.equal(state["now"], torch.arange(16, dtype=torch.uint8))


def test_data_position_keeps_epoch_and_id_per_rank_and_reads_files_from_before_passes(tmp_path):
    from safetensors.torch import save_file

    from facediff.train import checkpoint
    from facediff.train.checkpoint import TrainState

    state = TrainState(step=12, epoch=8, batches_in_epoch=5)
    checkpoint.save_position(tmp_path, state, 0, {(8, 3), (9, 3), (8, 40)})  # one id in two epochs of a pass
    checkpoint.save_position(tmp_path, state, 1, {(9, 7)})
    assert checkpoint.read_state(tmp_path) == state
    records = checkpoint.consumed_records(tmp_path)
    assert records == {(8, 3), (9, 3), (8, 40), (9, 7)}
    assert checkpoint.by_epoch(records) == {8: {3, 40}, 9: {3, 7}}
    save_file({"consumed_ids": torch.tensor([5, 6])}, str(tmp_path / "data_rank1.safetensors"))  # ids only
    assert checkpoint.consumed_records(tmp_path) == {(8, 3), (9, 3), (8, 40), (8, 5), (8, 6)}  # the state's epoch


def test_a_checkpoint_rewritten_by_fewer_workers_reads_only_their_data_position(tmp_path):
    """An elastic run: a 2-worker group saved checkpoint_8 but lost a node before Ray registered it; the 1-worker
    group resumed from step 7 and saved checkpoint_8 again, into the same folder (Ray copies into it and deletes
    nothing). The old rank 1's records of that step are not the position: reading them dropped records unseen."""
    from facediff.train import checkpoint
    from facediff.train.checkpoint import TrainState

    state = TrainState(step=8, epoch=0)
    checkpoint.save_position(tmp_path, state, 0, {(0, 1), (0, 2)}, world=2)
    checkpoint.save_position(tmp_path, state, 1, {(0, 3), (0, 4)}, world=2)  # left behind
    checkpoint.save_position(tmp_path, state, 0, {(0, 1), (0, 2), (0, 5), (0, 6)}, world=1)  # the rewrite
    assert checkpoint.read_state(tmp_path).world == 1
    assert checkpoint.consumed_records(tmp_path) == {(0, 1), (0, 2), (0, 5), (0, 6)}
    checkpoint.save_position(tmp_path, state, 0, {(0, 1)}, world=2)  # two ranks again: both count
    assert checkpoint.consumed_records(tmp_path) == {(0, 1), (0, 3), (0, 4)}


def test_a_resumed_pass_must_hold_only_its_epochs_and_no_consumed_record():
    from facediff.train.checkpoint import TrainState, check_resumed_data

    state = TrainState(step=3, epoch=4)
    batch = {"epoch": torch.tensor([4, 5, 5]), "id": torch.tensor([1, 2, 3])}
    check_resumed_data(batch, state, {(4, 2), (5, 1)}, epochs_per_pass=2)  # (5, 2) is not (4, 2): fine
    with pytest.raises(RuntimeError, match="epochs"):
        check_resumed_data(batch, state, set(), epochs_per_pass=1)  # epoch 5 belongs to the next pass
    with pytest.raises(RuntimeError, match="came again"):
        check_resumed_data(batch, state, {(5, 3)}, epochs_per_pass=2)


def test_default_epochs_per_pass_follows_the_split_size():
    from facediff.data.stream.passes import epochs_per_pass

    assert [epochs_per_pass(None, rows) for rows in (44, 922, 2_700, 27_000, 100_000)] == [8, 8, 8, 3, 1]
    assert epochs_per_pass(2, 27_000) == 2  # data.epochs_per_pass wins
