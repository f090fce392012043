"""ControlNet with the mask-aware perceptual loss (`controlnet`; paper 2): a `ControlNetModel` made from the
frozen Stable Diffusion UNet (`from_unet`: its encoder copied, zero convolutions), trained on captioned people
images. The ControlNet is the task's only trainable network (one optimizer, the EMA, the checkpoint); the SD
UNet, VAE and text encoder, LPIPS and the face network are frozen.

Loss per sample (Eq. 1-4): the denoising MSE L_LDM; for samples with t < T (`loss.perceptual_timestep_threshold`)
also the one-step estimate x̂0 (in fp32, through the scheduler's prediction type) decoded by the frozen VAE with
gradients, then masked LPIPS against the real image over each person's mask (λ1) and the face-feature distance
on the face boxes (λ2): λ1·L_lpips + λ2·L_face + (1 − λ1 − λ2)·L_LDM. Decoding and the perceptual networks run
only on the samples below T, so the extra cost scales with T/1000.

Precision: the ControlNet is the engine's module (bf16 under a bf16 run, fp32 masters in the optimizer). The frozen
SD pipeline is held outside the engine (`DiffusionTask.hold_frozen`) in the ControlNet's precision, as diffusers'
ControlNet training keeps it (`weight_dtype`). LPIPS and the face network are held in fp32 and run with autocast
off: they measure small differences between two images, which bf16's 8-bit mantissa would round away, and they
are small beside the UNet (the VAE decode in front of them stays in the training precision).

Host syncs: one per step, `rows` (which samples are below T) right after the timesteps are drawn, before any
network runs, so the GPU queue is nearly empty while the host waits; the decode's batch is those rows. Captions,
face boxes and their validity stay on the host from the loader (`data.batch.HOST_COLUMNS`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import ControlNetModel

from facediff import diffusion
from facediff.config.schema import ExperimentConfig
from facediff.data.stream.coco import MAX_PERSON_BOXES, decode_captions
from facediff.data.prompts import drop_prompts
from facediff.losses import face_feature_loss, mask_aware_loss, masked_lpips, person_masks
from facediff.models.pretrained import build_from_ref
from facediff.models.stable_diffusion import StableDiffusionBackbone, export_random_base, exported_base_ref
from facediff.tasks.base import DiffusionTask

CONTROLNET_DIR = "controlnet"
CONDITIONING_CHANNELS = (16, 32, 96, 256)  # diffusers' default embedding; one stride-2 conv between entries


def controlnet_from_unet(unet, vae_factor: int) -> ControlNetModel:
    """ControlNet initialised from `unet`; its conditioning embedding downsamples the pixel-space condition
    image by the VAE's factor (8 for SD: diffusers' default; fewer convs for tiny VAEs)."""
    stages = int(math.log2(vae_factor)) + 1
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS[:stages])


class ControlNetPeople(DiffusionTask):
    def __init__(self, cfg: ExperimentConfig, load_pretrained: bool = True):
        super().__init__(cfg, load_pretrained)
        m, loss = cfg.model, cfg.loss
        self.backbone = StableDiffusionBackbone(m.pipeline, load_weights=load_pretrained).freeze()
        self.latent_shape = self.backbone.latent_shape(cfg.data.image_size)
        self.vae_factor = cfg.data.image_size // self.latent_shape[-1]
        if m.controlnet is not None and (load_pretrained or m.controlnet.preset):
            self.controlnet = build_from_ref(ControlNetModel, m.controlnet, load_pretrained)
        else:  # shape-only builds of a pretrained ControlNet without a preset: the UNet-derived one has its shapes
            self.controlnet = controlnet_from_unet(self.backbone.unet, self.vae_factor)
        self.controlnet.requires_grad_(True).float()
        self.hold_frozen("backbone")  # in the ControlNet's precision, outside the engine
        self.scheduler = diffusion.pipeline_noise_scheduler(self.backbone.noise_scheduler, cfg.diffusion)
        self.loss_fn = diffusion.build_loss(self.scheduler, cfg.diffusion)
        p = m.perceptual
        self.lpips = self.face_features = None
        if loss.masked_lpips_weight > 0:
            # lazily (also below): the perceptual networks only when their loss weight is set
            from facediff.models.perceptual import PerceptualLPIPS

            self.lpips = PerceptualLPIPS(p.lpips_net, p.lpips_trunk if load_pretrained else "random")
            self.hold_frozen("lpips", torch.float32)
        if loss.face_feature_weight > 0:
            from facediff.models.perceptual import FaceFeatures

            self.face_features = FaceFeatures(p.face_net if load_pretrained else "random", list(p.face_layers))
            self.hold_frozen("face_features", torch.float32)
        if (self.lpips or self.face_features) is not None and p.checkpoint_decoder:
            self.backbone.vae.enable_gradient_checkpointing()
        self.loss_terms: dict[str, torch.Tensor] = {}

    @property
    def unet(self):
        return self.backbone.unet

    @property
    def dtype(self) -> torch.dtype:
        return self.controlnet.dtype

    # ------------------------------------------------------------------------------------------ inputs
    def prompts(self, batch, generator=None) -> list[str]:
        prompts = list(batch["prompts"]) if "prompts" in batch else decode_captions(batch["caption"])
        if generator is None:  # sampling: the prompts as given
            return prompts
        return drop_prompts(prompts, self.cfg.model.prompt_dropout, self.cfg.trainer.seed, batch.get("id"),
                            batch.get("epoch"))

    def conditioning(self, batch, n: int) -> torch.Tensor:
        """The ControlNet's pixel-space input in [0, 1] (diffusers' convention), (n, 3, S, S)."""
        size = self.cfg.data.image_size
        if self.cfg.model.conditioning == "constant":
            return torch.zeros(n, 3, size, size, device=self.device, dtype=self.dtype)
        if batch is None or "persons" not in batch:
            raise ValueError("model.conditioning is 'persons': sampling needs person maps (batch={'persons': ...})")
        persons = batch["persons"][:n].to(self.device)
        people = ((persons > 0) & (persons != 255)).to(self.dtype)  # crowd regions count as background
        return people.unsqueeze(1).expand(-1, 3, -1, -1)

    def denoise(self, z, t, context, cond):
        down, mid = self.controlnet(z, t, encoder_hidden_states=context, controlnet_cond=cond.to(z.dtype),
                                    return_dict=False)
        return self.unet(z, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample

    def _latents(self, batch, images: torch.Tensor) -> torch.Tensor:
        """The clean latents in fp32 (noised in fp32): cached ones with `data.use_latents` (`prepare latents
        --config` with this pipeline's VAE), else the VAE's encoding of the images. The images are read either
        way: the perceptual losses compare the decoded estimate with them, and the person map comes with them."""
        if self.cfg.data.use_latents:
            return batch["latents"].to(device=self.device, dtype=torch.float32)
        return self.backbone.encode_images(images).float()

    # -------------------------------------------------------------------------------------------- loss
    def forward(self, batch, generator=None):
        self.place_frozen()
        loss = self.cfg.loss
        images = batch["image"].to(device=self.device, dtype=torch.float32)
        t = self.loss_fn.draw_timesteps(len(images), generator, self.training_progress)
        below = t < loss.perceptual_timestep_threshold
        perceptual = (self.lpips or self.face_features) is not None
        # the step's one host sync, while only the timestep draw is queued (see the module docstring)
        below_host = below.cpu() if perceptual else None
        context = self.backbone.encode_prompts(self.prompts(batch, generator)).to(self.dtype)
        cond = self.conditioning(batch, len(images))
        z0 = self._latents(batch, images)
        ldm, aux = self.loss_fn(lambda z, t: self.denoise(z, t, context, cond), z0, generator,
                                input_dtype=self.dtype, progress=self.training_progress, timesteps=t)
        lpips_term, face_term = torch.zeros_like(ldm), torch.zeros_like(ldm)
        rows_host = below_host.nonzero().squeeze(1) if perceptual else torch.zeros(0, dtype=torch.long)
        if len(rows_host):
            rows = rows_host.to(self.device, non_blocking=True)
            x0 = self.loss_fn.predict_x0(aux["x_t"][rows], aux["t"][rows], aux["output"][rows])
            fake = self.backbone.decode_latents(x0, clamp=False).float()
            real = images[rows]
            with torch.autocast(self.device.type, enabled=False):  # the perceptual networks run in fp32
                if self.lpips is not None:
                    masks = person_masks(batch["persons"][rows.to(batch["persons"].device)].to(self.device),
                                         MAX_PERSON_BOXES)
                    lpips_term = lpips_term.index_copy(0, rows, masked_lpips(self.lpips, fake, real, masks).float())
                if self.face_features is not None:
                    pick = rows_host.to(batch["face_boxes"].device)
                    boxes = batch["face_boxes"][pick].float()
                    valid = batch["face_valid"][pick].bool()
                    p = self.cfg.model.perceptual
                    term = face_feature_loss(self.face_features, fake, real, boxes, valid, p.face_layers,
                                             p.face_size)
                    face_term = face_term.index_copy(0, rows, term)
        total = mask_aware_loss(ldm, lpips_term, face_term, below, loss.masked_lpips_weight, loss.face_feature_weight)
        n_below = max(1, len(rows_host))
        self.loss_terms = {"loss_ldm": ldm.mean().detach(), "loss_lpips": lpips_term.sum().detach() / n_below,
                           "loss_face": face_term.sum().detach() / n_below,
                           "below_threshold": below.float().mean().detach()}
        return total.mean()

    # ---------------------------------------------------------------------------------------- sampling
    def guided_model_fn(self, prompts: list[str], cond: torch.Tensor):
        scale = self.cfg.model.guidance_scale
        context = self.backbone.encode_prompts(prompts).to(self.dtype)
        if scale == 1:
            return lambda z, t: self.denoise(z, t, context, cond)
        both = torch.cat([self.backbone.encode_prompts([""] * len(prompts)).to(self.dtype), context])

        def model_fn(z, t):
            uncond, conditional = self.denoise(z.repeat(2, 1, 1, 1), t.repeat(2), both, cond.repeat(2, 1, 1, 1)).chunk(2)
            return uncond + scale * (conditional - uncond)

        return model_fn

    def sample(self, n, generator, sampler, steps, batch=None):
        """Images of `batch["prompts"]` (free text) or of its "caption" column (a test record's caption)."""
        self.place_frozen()
        if batch is None or not ("prompts" in batch or "caption" in batch):
            raise ValueError("controlnet samples from prompts: pass batch={'prompts': [...]} (or test records)")
        prompts = self.prompts(batch)[:n]
        cond = self.conditioning(batch, n)
        scheduler = diffusion.build_sampler(sampler, self.scheduler)
        z = diffusion.sample(self.guided_model_fn(prompts, cond), scheduler, (n, *self.latent_shape), steps,
                             generator, self.device, self.dtype, clip=None)
        return self.backbone.decode_latents(z).float()

    # ------------------------------------------------------------------------------------------ export
    def save_networks(self, out: Path) -> None:
        out = Path(out)
        self.controlnet.save_pretrained(out / CONTROLNET_DIR)
        export_random_base(self.cfg.model.pipeline, out)

    def load_exported(self, out: Path) -> None:
        out = Path(out)
        self.backbone = StableDiffusionBackbone(exported_base_ref(self.cfg.model.pipeline, out),
                                                load_weights=True).freeze()
        self.scheduler = diffusion.pipeline_noise_scheduler(self.backbone.noise_scheduler, self.cfg.diffusion)
        self.loss_fn = diffusion.build_loss(self.scheduler, self.cfg.diffusion)
        self.controlnet = ControlNetModel.from_pretrained(out / CONTROLNET_DIR)
        self.hold_frozen("backbone")  # the loaded pipeline, held outside the module like the built one

    def checkpointed_networks(self):
        # the frozen UNet too: the gradient reaches the ControlNet through its residuals, so the UNet's
        # activations are kept for the backward like the ControlNet's (the larger part)
        return [self.controlnet, self.unet]

    def networks(self):
        nets = {"controlnet": self.controlnet, "unet": self.unet, "vae": self.backbone.vae,
                "text_encoder": self.backbone.text_encoder}
        if self.lpips is not None:
            nets["lpips"] = self.lpips
        if self.face_features is not None:
            nets["face_net"] = self.face_features
        return nets
