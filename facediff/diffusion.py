"""DDPM noising, the denoising loss and samplers, all over diffusers schedulers.

Following k-diffusion: the loss is a small callable that owns the noising (so networks stay plain), and
sampling is a pure function of a model function, a scheduler and a generator.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from facediff.config.schema import DiffusionConfig

# model_fn(x_t, t) -> network output in the scheduler's prediction space (epsilon, v or x0)
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}


def build_noise_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        clip_sample=cfg.clip_sample,
    )


def build_sampler(name: str, train_scheduler: DDPMScheduler):
    """A sampling scheduler sharing the training noise schedule (betas, prediction type)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {sorted(SAMPLERS)}")
    extra = {"algorithm_type": "dpmsolver++"} if name == "dpm++" else {}
    return SAMPLERS[name].from_config(train_scheduler.config, **extra)


class DenoisingLoss:
    """Per-sample MSE between the network output and the target of the scheduler's prediction type."""

    def __init__(self, scheduler: DDPMScheduler):
        self.scheduler = scheduler
        self.prediction_type = scheduler.config.prediction_type

    def noise(self, x0: torch.Tensor, generator: torch.Generator | None = None):
        """Draw timesteps and noise; returns (x_t, t, noise)."""
        n = x0.shape[0]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=generator, device="cpu")
        noise = torch.randn(x0.shape, generator=generator, device="cpu", dtype=torch.float32)
        t, noise = t.to(x0.device), noise.to(device=x0.device, dtype=x0.dtype)
        return self.scheduler.add_noise(x0, noise, t), t, noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t)
        return x0

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """One-step estimate of the clean image from the network output (for perceptual losses)."""
        alpha_bar = self.scheduler.alphas_cumprod.to(device=x_t.device, dtype=x_t.dtype)[t].view(-1, 1, 1, 1)
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        if self.prediction_type == "epsilon":
            return (x_t - s * output) / a
        if self.prediction_type == "v_prediction":
            return a * x_t - s * output
        return output

    def __call__(self, model_fn: ModelFn, x0: torch.Tensor, generator: torch.Generator | None = None):
        x_t, t, noise = self.noise(x0, generator)
        output = model_fn(x_t, t)
        per_sample = (output.float() - self.target(x0, noise, t).float()).pow(2).mean(dim=(1, 2, 3))
        return per_sample, {"x_t": x_t, "t": t, "output": output}


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    scheduler,
    shape: tuple[int, ...],
    steps: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    clip: float | None = 1.0,
) -> torch.Tensor:
    """Run the reverse process from pure noise and return x0, clamped to [-clip, clip] (images: 1; latents,
    which are not bounded: None). Noise comes from `generator` (CPU)."""
    scheduler.set_timesteps(steps, device=device)
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        output = model_fn(model_input, t.expand(shape[0]).to(device))
        x = scheduler.step(output, t, x, generator=generator).prev_sample
    return x if clip is None else x.clamp(-clip, clip)
