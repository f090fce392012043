"""Defects of the GPU path a CPU can show: seeded builds that reseed every GPU, frozen networks cast by the
engine, host syncs inside the training step."""

from pathlib import Path

import pytest
import torch

from facediff.config import load_config
from facediff.tasks import build_task
from test_controlnet import tiny_batch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "experiments"


def tiny(name, overrides=()):
    return load_config(TINY / f"tiny_{name}.yaml", list(overrides))


@pytest.mark.parametrize("name", ["unet", "controlnet", "lc_unet"])
def test_seeded_builds_leave_the_cuda_generators_and_the_callers_stream_alone(name, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(seed))
    torch.random.default_generator.manual_seed(123)
    before = torch.get_rng_state()
    first = build_task(tiny(name))
    assert calls == []  # torch.manual_seed would reseed every GPU alike: all ranks' dropout masks identical
    assert torch.equal(torch.get_rng_state(), before)
    again = build_task(tiny(name))  # and builds are still identical
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))


def deepspeed_cast(task, dtype=torch.bfloat16):
    """What DeepSpeed 0.19's bf16 engine does to its module: parameters cast in place, buffers kept, then .to()."""
    for p in task.parameters():
        p.data = p.data.to(dtype)
    return task.to("cpu")


def test_controlnet_trains_in_bf16_with_its_frozen_networks_in_their_chosen_precision():
    cfg = tiny("controlnet", ["loss.perceptual_timestep_threshold=1000", "trainer.precision=bf16"])
    task = deepspeed_cast(build_task(cfg))
    assert {name.split(".")[0] for name, _ in task.named_parameters()} == {"controlnet"}  # only what trains
    loss = task(tiny_batch(4), torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and task.loss_terms["loss_lpips"] > 0 and task.loss_terms["loss_face"] > 0
    assert task.backbone.unet.dtype == task.backbone.vae.dtype == torch.bfloat16  # the ControlNet's precision
    assert next(task.lpips.parameters()).dtype == next(task.face_features.parameters()).dtype == torch.float32
    assert all(p.grad is not None for p in task.controlnet.parameters() if p.requires_grad)


class SyncCounter:
    """Counts reads of tensor values on the host (each one waits for the GPU) outside the batch's host columns."""

    METHODS = ("item", "tolist", "cpu", "nonzero", "__bool__", "numpy", "__int__", "__float__")

    def __init__(self, monkeypatch, host: list[torch.Tensor]):
        self.host, self.calls = {id(t) for t in host}, []
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(tensor, *args, **kwargs):
            if id(tensor) not in self.host and id(getattr(tensor, "_base", None)) not in self.host:
                self.calls.append(name)
            result = original(tensor, *args, **kwargs)
            if name == "cpu":  # what was read back is on the host now: using it costs no further sync
                self.host.add(id(result))
            return result
        return counted


def pixel_batch(n=4, size=32):
    generator = torch.Generator().manual_seed(0)
    return {"image": torch.rand(n, 3, size, size, generator=generator) * 2 - 1,
            "attributes": (torch.rand(n, 40, generator=generator) > 0.5).float(),
            "id": torch.arange(n), "epoch": torch.zeros(n, dtype=torch.long)}


@pytest.mark.parametrize("name,overrides", [
    ("unet", []), ("dit", []), ("lc_unet", []), ("sd_lora", ["model.prompt_dropout=0.5"]),
    ("controlnet", ["loss.face_feature_weight=0", "loss.perceptual_timestep_threshold=1000"]),
])
def test_the_training_step_reads_nothing_back_from_the_device(name, overrides, monkeypatch):
    cfg = tiny(name, overrides)
    task = build_task(cfg)
    if name == "controlnet":
        batch = {**tiny_batch(4), "id": torch.arange(4), "epoch": torch.zeros(4, dtype=torch.long)}
    else:
        batch = pixel_batch(size=cfg.data.image_size)
    from facediff.data.batch import HOST_COLUMNS

    generator = torch.Generator().manual_seed(0)
    counter = SyncCounter(monkeypatch, [v for k, v in batch.items() if k in HOST_COLUMNS])
    loss = task(batch, generator)
    monkeypatch.undo()
    assert torch.isfinite(loss)
    # the ControlNet reads which samples are below T once, right after drawing the timesteps (its decode's batch)
    assert counter.calls == (["cpu"] if name == "controlnet" else []), counter.calls
