"""facediff.tasks, every family alike: seeded builds that leave the GPU generators alone, noising in fp32 under
bf16, pixels in [0, 1] without normalisation, and a training step that reads nothing back from the device."""

import pytest
import torch

from facediff.config import load_config
from facediff.tasks import build_task

from conftest import REPO
from test_controlnet import tiny_batch

TINY = REPO / "configs" / "experiments" / "tiny"


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


def test_bf16_task_noises_in_fp32_at_every_timestep(tiny_config, monkeypatch):
    """x0 = 0 makes x_t = sigma_t * noise: its per-sample std must be sigma_t for every t, small t included
    (in bf16 alpha_bar rounds to 1 for t < 10, which made x_t = 0, and t = 10-17 shared one level)."""
    task = build_task(tiny_config()).to(torch.bfloat16)
    seen = {}

    def capture(x, t):
        seen["x"], seen["t"] = x, t
        return torch.zeros_like(x)

    monkeypatch.setattr(task, "_denoise", capture)
    n = 4000
    task({"image": torch.zeros(n, 3, 32, 32, dtype=torch.bfloat16)}, torch.Generator().manual_seed(0))
    x, t = seen["x"], seen["t"]
    assert x.dtype == torch.bfloat16  # only the network input is cast
    sigma = (1 - task.scheduler.alphas_cumprod.double()[t]).sqrt()
    ratio = x.double().flatten(1).std(dim=1) / sigma
    assert (t < 10).sum() > 10, "the draw must cover the smallest timesteps"
    assert ratio.min() > 0.9 and ratio.max() < 1.1, (ratio.min(), ratio.max(), t[ratio.argmin()])


def test_no_norm_denoises_pixels_in_zero_one(tiny_config, monkeypatch):
    task = build_task(tiny_config(["data.normalize=false"]))
    seen = {}

    def capture(denoise, x0, generator, **kwargs):
        seen["x0"] = x0
        return torch.zeros(len(x0)), None

    monkeypatch.setattr(task, "loss_fn", capture)
    task({"image": torch.full((2, 3, 32, 32), -1.0)})  # black faces, as the stream delivers them
    assert torch.equal(seen["x0"], torch.zeros(2, 3, 32, 32))  # black in [0, 1]
    monkeypatch.setattr("facediff.diffusion.sample", lambda *a, **k: torch.full((2, 3, 32, 32), 0.75))
    images = task.sample(2, torch.Generator().manual_seed(0), "ddim", 2)
    assert torch.allclose(images, torch.full_like(images, 0.5))  # 0.75 in [0, 1] is 0.5 in [-1, 1]


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
    from facediff.data.stream.batch import HOST_COLUMNS

    generator = torch.Generator().manual_seed(0)
    counter = SyncCounter(monkeypatch, [v for k, v in batch.items() if k in HOST_COLUMNS])
    loss = task(batch, generator)
    monkeypatch.undo()
    assert torch.isfinite(loss)
    # the ControlNet reads which samples are below T once, right after drawing the timesteps (its decode's batch)
    assert counter.calls == (["cpu"] if name == "controlnet" else []), counter.calls
