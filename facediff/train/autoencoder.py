"""`facediff fit-autoencoder`: fit a small autoencoder preset for reconstruction on prepared shards.

Production latent models use pretrained autoencoders (the CelebA-HQ VQ-VAE, Stable Diffusion's VAE). The tiny
presets have no pretrained weights, and with random weights their decoder does not invert their encoder, so a
latent model trained over them can only produce noise. This fits one in a single process (a few hundred steps of
a ~100k-parameter model on 32 px faces: a minute on 2 CPU cores) and saves it in diffusers format; a config then
names the folder as `model.autoencoder.pretrained`, the same loading path as a hub checkpoint. Not meant for
large autoencoders: those want adversarial and perceptual losses and a cluster.

VQ: reconstruction MSE + the VQ commitment/codebook loss diffusers returns. KL: MSE + a small KL term.

The saved config states `scaling_factor` = 1 / the standard deviation of the fitted model's latents on the
training images (how Stable Diffusion's 0.18215 was chosen), so a diffusion model sees unit-variance latents.
Without it diffusers writes its own default 0.18215 into config.json: the tiny VQ's latents (std ~0.18) reached
the diffusion model at std ~0.03, drowned by the noise at nearly every timestep, and the conditional demo
learnt one blurry mean face whatever the attributes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from facediff.config.schema import ExperimentConfig
from facediff.data.stream.local_batches import local_test_batches
from facediff.models.autoencoder import CLASSES, unscaled_latents
from facediff.models.pretrained import build_from_ref
from facediff.rng import seeded_build

log = logging.getLogger("facediff.train")
KL_WEIGHT = 1e-4  # small: the latents must stay informative; the diffusion model is trained on their scale anyway


def _train_images(cfg: ExperimentConfig) -> torch.Tensor:
    images = torch.cat([batch["image"] for batch in local_test_batches(cfg, cfg.data.train_split)()])
    if len(images) == 0:
        raise ValueError(f"{cfg.data.path}: split {cfg.data.train_split!r} has no images to fit an autoencoder on")
    return images


def reconstruction_error(model, images: torch.Tensor, kind: str) -> float:
    """Mean squared error of encode -> decode (posterior mean for KL) over `images`."""
    model.eval()
    with torch.no_grad():
        if kind == "vq":
            rec = model(images).sample
        else:
            rec = model.decode(model.encode(images).latent_dist.mean).sample
    return float(F.mse_loss(rec, images))


def unit_variance_scaling(model, images: torch.Tensor, kind: str, batch_size: int = 64) -> float:
    """1 / std of the latents `LatentCodec` encodes before scaling, over `images`."""
    model.eval()
    with torch.no_grad():
        latents = [unscaled_latents(model, kind, x) for x in images.split(batch_size)]
    return 1.0 / float(torch.cat(latents).float().std())


def fit_autoencoder(cfg: ExperimentConfig, out: str | Path, steps: int = 400, batch_size: int = 32,
                    lr: float = 2e-3, seed: int = 0) -> dict[str, float]:
    """Fit `cfg.model.autoencoder` on `cfg.data`'s train split and save it to `out` (diffusers format, written
    to a temporary folder and renamed). Returns the reconstruction MSE before and after
    and the latent scaling factor written to its config."""
    ref = cfg.model.autoencoder
    images = _train_images(cfg)
    generator = torch.Generator().manual_seed(seed)
    with seeded_build(seed):
        model = build_from_ref(CLASSES[ref.kind], ref, load_weights=True)
    before = reconstruction_error(model, images, ref.kind)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        x = images[torch.randint(len(images), (min(batch_size, len(images)),), generator=generator)]
        if ref.kind == "vq":
            decoded = model(x)
            loss = F.mse_loss(decoded.sample, x) + decoded.commit_loss.mean()
        else:
            posterior = model.encode(x).latent_dist
            z = posterior.sample(generator=generator)
            loss = F.mse_loss(model.decode(z).sample, x) + KL_WEIGHT * posterior.kl().mean() / x[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log.info("fit-autoencoder step %d/%d  loss %.4f", step + 1, steps, loss.detach().item())
    after = reconstruction_error(model, images, ref.kind)
    scaling = unit_variance_scaling(model, images, ref.kind)
    model.register_to_config(scaling_factor=scaling)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("autoencoder saved to %s: reconstruction MSE %.4f -> %.4f, latent scaling factor %.3f",
             out, before, after, scaling)
    return {"mse_before": before, "mse_after": after, "scaling_factor": scaling}
