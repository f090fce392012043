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
    extra = {"rescale_betas_zero_snr": True} if cfg.zero_terminal_snr else {}
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        clip_sample=True if cfg.clip_sample is None else cfg.clip_sample,  # None outside an experiment: pixels
        **extra,
    )


def pipeline_noise_scheduler(scheduler: DDPMScheduler, cfg: DiffusionConfig) -> DDPMScheduler:
    """A Stable Diffusion pipeline's own schedule with `diffusion.zero_terminal_snr` applied (the schedule keys
    are the pipeline's; only this option is ours). Unchanged (the same object) when it is off."""
    if not cfg.zero_terminal_snr:
        return scheduler
    if scheduler.config.prediction_type != "v_prediction":
        raise ValueError(f"diffusion.zero_terminal_snr: needs a v-prediction schedule, but the pipeline's scheduler "
                         f"predicts {scheduler.config.prediction_type!r} (at zero SNR an epsilon model cannot "
                         "recover the image); remove diffusion.zero_terminal_snr or use a v-prediction pipeline")
    return DDPMScheduler.from_config(scheduler.config, rescale_betas_zero_snr=True)


def build_sampler(name: str, train_scheduler: DDPMScheduler):
    """A sampling scheduler sharing the training noise schedule (betas, prediction type, zero-terminal-SNR
    rescaling). A zero-terminal-SNR schedule samples with "trailing" timesteps, so the first step is the last
    training timestep, pure noise (Lin et al. 2023, section 3.3)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {sorted(SAMPLERS)}")
    extra = {"algorithm_type": "dpmsolver++"} if name == "dpm++" else {}
    if train_scheduler.config.get("rescale_betas_zero_snr", False):
        extra["timestep_spacing"] = "trailing"
    return SAMPLERS[name].from_config(train_scheduler.config, **extra)


def build_loss(scheduler: DDPMScheduler, cfg: DiffusionConfig) -> "DenoisingLoss":
    """The denoising loss over `scheduler` with the `diffusion` section's options."""
    return DenoisingLoss(scheduler, cfg.timestep_phases, min_snr_gamma=cfg.min_snr_gamma,
                         offset_noise=cfg.offset_noise, input_perturbation=cfg.input_perturbation)


def min_snr_weights(alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weight of every timestep (Hang et al. 2023): the ε-loss weight min(SNR, γ)/SNR expressed
    for the target predicted: min(SNR, γ)/SNR for ε, min(SNR, γ) for x0, min(SNR, γ)/(SNR + 1) for v."""
    a = alphas_cumprod.double()
    snr = a / (1 - a)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return (gamma / snr).clamp(max=1.0)  # = min(SNR, γ)/SNR, and 1 (not 0/0) at a zero-SNR timestep
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


class DenoisingLoss:
    """Per-sample MSE between the network output and the target of the scheduler's prediction type.

    Noising, targets and one-step x0 estimates are computed in fp32 whatever the network's precision: in bf16,
    alpha_bar_t rounds to exactly 1 for t < 10 (x_t = x0, an unpredictable epsilon target) and neighbouring
    timesteps share one noise level. Only the network input is cast, to `input_dtype`.
    """

    def __init__(self, scheduler: DDPMScheduler, timestep_phases=(), min_snr_gamma: float | None = None,
                 offset_noise: float = 0.0, input_perturbation: float = 0.0):
        self.scheduler = scheduler
        self.prediction_type = scheduler.config.prediction_type
        self.timestep_phases = list(timestep_phases)
        # `diffusion.*` options; at their defaults nothing extra is drawn or computed (the loss is bit-identical)
        self.min_snr_gamma = min_snr_gamma
        self.offset_noise = offset_noise
        self.input_perturbation = input_perturbation
        # per-device copies of the tables read every step: copying them from the CPU each step is a host sync
        self._on_device: dict[tuple, torch.Tensor] = {}

    def _table(self, key: tuple, device: torch.device, make) -> torch.Tensor:
        """`make()` (a CPU tensor) copied to `device` once and kept."""
        device = torch.device(device)
        if (key, device) not in self._on_device:
            self._on_device[key, device] = make().to(device)
        return self._on_device[key, device]

    def _phase(self, progress: float) -> int | None:
        for index, phase in enumerate(self.timestep_phases):
            if progress < phase.until or index == len(self.timestep_phases) - 1:
                return index
        return None

    def _phase_weights(self, index: int) -> torch.Tensor:
        weights = torch.ones(self.scheduler.config.num_train_timesteps, dtype=torch.float64)
        for band in self.timestep_phases[index].bands:
            weights[band.start:band.stop] = band.weight
        return weights

    def timestep_weights(self, progress: float, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Relative probabilities of each training timestep at `progress` (0..1) through the run; None = uniform.

        Phases (`diffusion.timestep_phases`) split the run by fraction of its steps; in a phase, timesteps in a
        band are drawn with the band's weight, all others with weight 1 (a later band overrides an earlier one)."""
        index = self._phase(progress)
        if index is None:
            return None
        return self._table(("phase", index), device, lambda: self._phase_weights(index))

    def draw_timesteps(self, n: int, generator: torch.Generator | None = None, progress: float = 0.0) -> torch.Tensor:
        """`n` training timesteps, on the generator's device (the CPU without one)."""
        device = generator.device if generator is not None else torch.device("cpu")
        weights = self.timestep_weights(progress, device)
        if weights is None:
            return torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=generator, device=device)
        return torch.multinomial(weights, n, replacement=True, generator=generator)

    def _alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        table = self._table(("alphas_cumprod",), t.device, lambda: self.scheduler.alphas_cumprod.float())
        return table[t].view(-1, 1, 1, 1)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        """Per-sample min-SNR-γ weights (fp32, on t's device) of timesteps `t`; None without `min_snr_gamma`."""
        if self.min_snr_gamma is None:
            return None
        table = self._table(("min_snr", self.min_snr_gamma), t.device, lambda: min_snr_weights(
            self.scheduler.alphas_cumprod, self.min_snr_gamma, self.prediction_type).float())
        return table[t]

    def noise(self, x0: torch.Tensor, generator: torch.Generator | None = None, progress: float = 0.0,
              timesteps: torch.Tensor | None = None):
        """Draw timesteps (at `progress` through the run; or take `timesteps`, drawn by the caller with
        `draw_timesteps` from the same generator) and noise; returns (x_t, t, noise), all fp32.

        `noise` is the target's noise: with `offset_noise` s it holds s·N(0, 1) per sample and channel (constant
        over the image) on top; with `input_perturbation` p, x_t is made from noise + p·N(0, 1) while the target
        keeps `noise` (Ning et al. 2023). Both are drawn after the noise, from the same generator, only when set."""
        x0 = x0.float()
        # Drawn where the generator lives: training passes one on the worker's device, so nothing is drawn on
        # the CPU and copied each step (a seeded generator per rank keeps runs reproducible on that device).
        t = self.draw_timesteps(x0.shape[0], generator, progress) if timesteps is None else timesteps
        device = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=torch.float32)
        if self.offset_noise:
            noise = noise + self.offset_noise * torch.randn(
                (*x0.shape[:2], *([1] * (x0.ndim - 2))), generator=generator, device=device, dtype=torch.float32)
        noise_in = noise
        if self.input_perturbation:
            noise_in = noise + self.input_perturbation * torch.randn(
                x0.shape, generator=generator, device=device, dtype=torch.float32)
        t, noise, noise_in = t.to(x0.device), noise.to(x0.device), noise_in.to(x0.device)  # no-ops on one device
        alpha_bar = self._alpha_bar(t)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise_in, t, noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise.float()
        if self.prediction_type == "v_prediction":
            alpha_bar = self._alpha_bar(t)
            return alpha_bar.sqrt() * noise.float() - (1 - alpha_bar).sqrt() * x0.float()
        return x0.float()

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """One-step estimate of the clean image from the network output (for perceptual losses), in fp32."""
        alpha_bar = self._alpha_bar(t)
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        x_t, output = x_t.float(), output.float()
        if self.prediction_type == "epsilon":
            return (x_t - s * output) / a
        if self.prediction_type == "v_prediction":
            return a * x_t - s * output
        return output

    def __call__(self, model_fn: ModelFn, x0: torch.Tensor, generator: torch.Generator | None = None,
                 input_dtype: torch.dtype | None = None, progress: float = 0.0,
                 timesteps: torch.Tensor | None = None):
        """`model_fn` receives x_t cast to `input_dtype` (default: x0's dtype); the loss is computed in fp32.
        `progress`: the fraction of the run done (phased timestep sampling); `timesteps`: see `noise`."""
        x_t, t, noise = self.noise(x0, generator, progress, timesteps)
        output = model_fn(x_t.to(input_dtype or x0.dtype), t)
        per_sample = (output.float() - self.target(x0, noise, t)).pow(2).mean(dim=(1, 2, 3))
        weights = self.loss_weights(t)
        if weights is not None:
            per_sample = per_sample * weights
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
    """Run the reverse process from pure noise and return x0 (fp32), clamped to [-clip, clip] (images: 1;
    latents, which are not bounded: None). Noise comes from `generator` (CPU). The state and the scheduler's
    arithmetic stay in fp32; only the network input is cast to `dtype` (the network's precision)."""
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    scheduler.set_timesteps(steps, device=device)
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t).to(dtype)
        output = model_fn(model_input, t.expand(shape[0]).to(device))
        x = scheduler.step(output.float(), t, x, generator=generator).prev_sample
    return x if clip is None else x.clamp(-clip, clip)
