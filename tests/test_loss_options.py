"""The loss options of `diffusion.DenoisingLoss` (min-SNR-γ, offset noise, input perturbation, zero-terminal-SNR
schedules), checked against formulas written out here, independently of facediff's code; and the defaults,
which must leave the loss bit-identical to the plain one. No Ray."""

import math

import pytest
import torch
from typer.testing import CliRunner

from facediff import diffusion
from facediff.cli.main import app
from facediff.config import ConfigError, load_config
from facediff.config.schema import DiffusionConfig

from conftest import REPO

TINY_UNET = REPO / "configs" / "experiments" / "tiny" / "tiny_unet.yaml"
TINY_SD_LORA = REPO / "configs" / "experiments" / "tiny" / "tiny_sd_lora.yaml"
X0 = torch.linspace(-1, 1, 4 * 3 * 8 * 8).reshape(4, 3, 8, 8)


def loss_for(**options) -> diffusion.DenoisingLoss:
    schedule = {k: options.pop(k) for k in ("prediction_type", "zero_terminal_snr") if k in options}
    cfg = DiffusionConfig(**schedule, **options)
    return diffusion.build_loss(diffusion.build_noise_scheduler(cfg), cfg)


def linear_alpha_bar(t: int) -> float:
    """DDPM's linear schedule (beta 1e-4 .. 0.02 over 1000 steps), the product written out."""
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    return math.prod(1 - b for b in betas[: t + 1])


@pytest.mark.parametrize("prediction_type,formula", [
    ("epsilon", lambda snr, g: min(snr, g) / snr),
    ("sample", lambda snr, g: min(snr, g)),
    ("v_prediction", lambda snr, g: min(snr, g) / (snr + 1)),
])
def test_min_snr_weights_per_timestep_follow_the_formulas(prediction_type, formula):
    gamma = 5.0
    loss = loss_for(prediction_type=prediction_type, min_snr_gamma=gamma)
    t = torch.tensor([0, 10, 100, 300, 600, 999])
    expected = []
    for step in t.tolist():
        a = linear_alpha_bar(step)
        expected.append(formula(a / (1 - a), gamma))
    # rtol: the scheduler holds alpha_bar in fp32, so 1 - alpha_bar near t = 0 is rounded to ~1e-4 relative
    assert torch.allclose(loss.loss_weights(t).double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-3)
    # the weights reach the loss: a model predicting zeros has loss weight * mean(target²)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    per_sample, aux = loss(lambda x, tt: torch.zeros_like(x), X0, g(), timesteps=t[:4])
    plain = loss_for(prediction_type=prediction_type)
    _, _, noise = plain.noise(X0, g(), timesteps=t[:4])
    unweighted = plain.target(X0, noise, t[:4]).pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(per_sample, unweighted * torch.tensor(expected[:4], dtype=torch.float32), rtol=1e-3)
    assert not torch.allclose(per_sample, unweighted, rtol=1e-2)  # t = 0, 10, 100 are weighted


def test_offset_noise_shifts_each_channel_by_the_next_draws():
    s = 0.1
    x0 = torch.zeros(64, 3, 16, 16)
    t = torch.full((64,), 500)
    _, _, plain = loss_for().noise(x0, torch.Generator().manual_seed(0), timesteps=t)
    _, _, offset = loss_for(offset_noise=s).noise(x0, torch.Generator().manual_seed(0), timesteps=t)
    shift = offset - plain
    # constant over each image's pixels, per sample and channel ...
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)
    # ... and equal to s times the generator's next (B, C, 1, 1) normal draw after the noise
    g = torch.Generator().manual_seed(0)
    torch.randn(x0.shape, generator=g)
    assert torch.allclose(shift[:, :, :1, :1], s * torch.randn(64, 3, 1, 1, generator=g), atol=1e-6)
    # so the per-channel means of the noise spread by about s more than those of plain noise
    assert 0.05 < (offset.mean(dim=(2, 3)) - plain.mean(dim=(2, 3))).std() < 0.15


def test_input_perturbation_changes_the_input_but_not_the_target():
    p, t = 0.1, torch.tensor([100, 400, 700, 999])
    x_plain, _, noise_plain = loss_for().noise(X0, torch.Generator().manual_seed(5), timesteps=t)
    x_pert, _, noise_pert = loss_for(input_perturbation=p).noise(X0, torch.Generator().manual_seed(5), timesteps=t)
    assert torch.equal(noise_pert, noise_plain)  # the target's noise
    g = torch.Generator().manual_seed(5)
    torch.randn(X0.shape, generator=g)
    extra = p * torch.randn(X0.shape, generator=g)
    sigma = torch.tensor([math.sqrt(1 - linear_alpha_bar(s)) for s in t.tolist()]).view(-1, 1, 1, 1)
    assert torch.allclose(x_pert - x_plain, sigma * extra, atol=1e-5)


def test_zero_terminal_snr_rescales_the_schedule_as_lin_et_al_algorithm_1():
    scheduler = diffusion.build_noise_scheduler(DiffusionConfig(prediction_type="v_prediction",
                                                                zero_terminal_snr=True))
    assert scheduler.alphas_cumprod[-1] == 0
    # Algorithm 1: shift and scale sqrt(alpha_bar) so the last is 0 and the first unchanged
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    root = torch.cumprod(1 - betas, 0).sqrt()
    first, last = root[0].item(), root[-1].item()
    root = (root - last) * first / (first - last)
    assert torch.allclose(scheduler.alphas_cumprod.double(), root**2, atol=1e-6)
    # samplers keep it and start at the last training timestep (pure noise)
    for name in diffusion.SAMPLERS:
        sampler = diffusion.build_sampler(name, scheduler)
        sampler.set_timesteps(4)
        assert sampler.config.rescale_betas_zero_snr and int(sampler.timesteps[0]) == 999
    plain = diffusion.build_noise_scheduler(DiffusionConfig(prediction_type="v_prediction"))
    assert plain.alphas_cumprod[-1] > 0 and not diffusion.build_sampler("ddim", plain).config.rescale_betas_zero_snr
    # at t = T-1 the input is the noise and the v target is -x0
    x_t, _, noise = loss_for(prediction_type="v_prediction", zero_terminal_snr=True).noise(
        X0, torch.Generator().manual_seed(0), timesteps=torch.full((4,), 999))
    assert torch.allclose(x_t, noise, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_defaults_leave_the_loss_bit_identical_to_the_plain_computation(prediction_type):
    loss = loss_for(prediction_type=prediction_type)
    model = torch.nn.Conv2d(3, 3, 3, padding=1)
    torch.manual_seed(0)
    per_sample, _ = loss(lambda x, t: model(x), X0, torch.Generator().manual_seed(11))
    # the loss before the options, written out: one randint for t, one randn for the noise, nothing else drawn
    g = torch.Generator().manual_seed(11)
    t = torch.randint(0, 1000, (4,), generator=g)
    noise = torch.randn(X0.shape, generator=g)
    a = loss.scheduler.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * X0 + (1 - a).sqrt() * noise
    target = {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * X0, "sample": X0}
    expected = (model(x_t) - target[prediction_type]).pow(2).mean(dim=(1, 2, 3))
    assert torch.equal(per_sample, expected)
    assert torch.equal(g.get_state(), _state_after(loss))  # no extra random numbers drawn


def _state_after(loss) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    loss.noise(X0, g)
    return g.get_state()


@pytest.mark.parametrize("override,match", [
    ("diffusion.zero_terminal_snr=true", r"command line: diffusion\.zero_terminal_snr: needs v-prediction, "
                                         r"but diffusion\.prediction_type \(its default\) predicts 'epsilon'"),
    ("diffusion.min_snr_gamma=0", r"diffusion\.min_snr_gamma"),
    ("diffusion.offset_noise=-0.1", r"diffusion\.offset_noise"),
    ("diffusion.input_perturbation=-1", r"diffusion\.input_perturbation"),
])
def test_bad_loss_options_are_refused_at_load(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY_UNET, [override])
    assert load_config(TINY_UNET, ["diffusion.prediction_type=v_prediction",
                                   "diffusion.zero_terminal_snr=true"]).diffusion.zero_terminal_snr


def test_zero_terminal_snr_on_an_epsilon_pipeline_is_one_error_line():
    with pytest.raises(ConfigError, match=r"model\.pipeline's preset 'tiny_sd' predicts 'epsilon'.*sd2_768"):
        load_config(TINY_SD_LORA, ["diffusion.zero_terminal_snr=true"])
    result = CliRunner().invoke(app, ["info", str(TINY_UNET), "diffusion.zero_terminal_snr=true"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    line = result.stderr.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("error: ") and "diffusion.zero_terminal_snr" in line[0]


def test_pipeline_schedules_are_rescaled_only_for_v_prediction():
    from diffusers import DDPMScheduler

    cfg = DiffusionConfig(zero_terminal_snr=True)
    v = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    assert diffusion.pipeline_noise_scheduler(v, cfg).alphas_cumprod[-1] == 0
    assert diffusion.pipeline_noise_scheduler(v, DiffusionConfig()) is v
    with pytest.raises(ValueError, match="diffusion.zero_terminal_snr: needs a v-prediction schedule"):
        diffusion.pipeline_noise_scheduler(DDPMScheduler(), cfg)
