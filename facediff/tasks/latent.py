"""Latent conditional diffusion: a UNet2DConditionModel over a frozen VQ-VAE/KL-VAE, conditioned on the 40
attributes (and part masks), trained with the denoising MSE + lambda * InfoNCE on the attribute embedding.

Everything trainable (UNet, attribute embedder, null conditions, mask projection, fusion, and the SegFormer
when not frozen) lives in this one module, so DeepSpeed puts it in one optimizer, the EMA averages all of it and
one checkpoint holds it. The autoencoder, and a frozen SegFormer backbone (`model.mask_encoder.frozen`), are held
frozen outside the engine (`DiffusionTask.hold_frozen`: not cast, not partitioned and re-gathered under ZeRO-3),
in the UNet's precision. Checkpoints therefore do not hold the frozen backbone (the build recreates it: pretrained
weights, or the seeded random init), but the export does, under the same keys as a trained one, so an exported
model is whole.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from facediff import diffusion
from facediff.config.schema import ExperimentConfig
from facediff.losses import info_nce
from facediff.models.autoencoder import LatentCodec
from facediff.models.conditional import ConditionEncoder, build_conditional_unet
from facediff.tasks.base import DiffusionTask

CONDITION_FILE = "condition_encoder/model.safetensors"
MASK_BACKBONE = "conditions.masks.backbone"  # held frozen when model.mask_encoder.frozen
BACKBONE_KEYS = "masks.backbone."  # its keys in CONDITION_FILE, as when it trains


def guidance_terms(attribute_scale: float, mask_scale: float, has_masks: bool) -> list[tuple[bool, bool, float]]:
    """Classifier-free guidance as a weighted sum of conditional predictions: [(keep_attributes, keep_masks, w)].

    eps = eps(0,0) + s_a (eps(a,0) - eps(0,0)) + s_m (eps(a,m) - eps(a,0)); without masks the last term is absent.
    Terms of weight 0 are dropped, so scales of 1 cost one forward pass.
    """
    if has_masks:
        terms = [(False, False, 1 - attribute_scale), (True, False, attribute_scale - mask_scale),
                 (True, True, mask_scale)]
    else:
        terms = [(False, False, 1 - attribute_scale), (True, False, attribute_scale)]
    return [t for t in terms if t[2] != 0]


class LatentConditionalDiffusion(DiffusionTask):
    def __init__(self, cfg: ExperimentConfig, load_pretrained: bool = True):
        super().__init__(cfg, load_pretrained)
        m = cfg.model
        self.codec = LatentCodec(m.autoencoder, load_weights=load_pretrained)
        self.hold_frozen("codec")
        expected = tuple(self.codec.latent_shape(cfg.data.image_size))
        if expected != (m.in_channels, m.sample_size, m.sample_size) or m.out_channels != m.in_channels:
            raise ValueError(
                f"the autoencoder turns data.image_size={cfg.data.image_size} images into latents of shape {expected}; "
                f"set model.in_channels/out_channels={expected[0]} and model.sample_size={expected[1]}")
        self.unet = build_conditional_unet(m)
        groups = cfg.data.resolved_part_groups()
        self.conditions = ConditionEncoder(m, len(groups) if groups else 0, load_weights=load_pretrained)
        if self.frozen_mask_backbone:
            self.hold_frozen(MASK_BACKBONE)
        self.scheduler = diffusion.build_noise_scheduler(cfg.diffusion)
        self.loss_fn = diffusion.build_loss(self.scheduler, cfg.diffusion)
        self.latent_shape = expected
        self.loss_terms: dict[str, torch.Tensor] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def has_masks(self) -> bool:
        return self.conditions.masks is not None

    @property
    def frozen_mask_backbone(self) -> bool:
        return self.has_masks and self.cfg.model.mask_encoder.frozen

    def _latents(self, batch) -> torch.Tensor:
        """Clean latents in fp32 (noised in fp32, see DenoisingLoss); the codec runs in the task's precision."""
        if self.cfg.data.use_latents:
            return batch["latents"].to(device=self.device, dtype=torch.float32)
        return self.codec.encode(batch["image"].to(device=self.device, dtype=self.dtype)).float()

    def _masks(self, batch) -> torch.Tensor | None:
        return batch["part_masks"].to(device=self.device, dtype=self.dtype) if self.has_masks else None

    def _keep(self, n: int, p: float, generator: torch.Generator | None) -> torch.Tensor:
        device = generator.device if generator is not None else "cpu"
        return (torch.rand(n, generator=generator, device=device) >= p).to(self.device)

    def forward(self, batch, generator=None):
        self.place_frozen()
        z0 = self._latents(batch)
        attributes = batch["attributes"].to(self.device, non_blocking=True)  # a host column (data.batch)
        m = self.cfg.model
        context, embedding = self.conditions(
            attributes, self._masks(batch),
            keep_attributes=self._keep(len(z0), m.attribute_dropout, generator),
            keep_masks=self._keep(len(z0), m.mask_dropout, generator),
        )
        per_sample, _ = self.loss_fn(
            lambda z, t: self.unet(z, t, encoder_hidden_states=context).sample, z0, generator, input_dtype=self.dtype,
            progress=self.training_progress)
        mse = per_sample.mean()
        loss = mse
        if self.cfg.loss.infonce_weight > 0:
            nce = info_nce(embedding.flatten(1), attributes, self.cfg.loss.infonce_threshold,
                           self.cfg.loss.infonce_temperature, self.cfg.loss.infonce_include_self)
            loss = mse + self.cfg.loss.infonce_weight * nce
            self.loss_terms = {"loss_mse": mse.detach(), "loss_infonce": nce.detach()}
        return loss

    def guided_model_fn(self, attributes: torch.Tensor, part_masks: torch.Tensor | None):
        """model_fn(z_t, t) with classifier-free guidance at the `eval.*_guidance` scales (one batched forward)."""
        e = self.cfg.eval
        terms = guidance_terms(e.attribute_guidance, e.mask_guidance, self.has_masks and part_masks is not None)
        n = len(attributes)
        keep_a = torch.cat([torch.full((n,), a) for a, _, _ in terms])
        keep_m = torch.cat([torch.full((n,), m) for _, m, _ in terms])
        masks = None if part_masks is None else part_masks.repeat(len(terms), 1, 1, 1)
        context, _ = self.conditions(attributes.repeat(len(terms), 1), masks, keep_a, keep_m)

        def model_fn(z, t):
            k = len(terms)
            out = self.unet(z.repeat(k, 1, 1, 1), t.repeat(k), encoder_hidden_states=context).sample
            return sum(w * chunk for (_, _, w), chunk in zip(terms, out.chunk(k)))

        return model_fn

    def sample(self, n, generator, sampler, steps, batch=None):
        """`batch` holds the conditions: "attributes" (n, 40) and, for a mask model, optionally "part_masks"."""
        self.place_frozen()
        if batch is None or "attributes" not in batch:
            raise ValueError("a conditional model samples from attributes: pass batch={'attributes': (n, 40)}")
        attributes = batch["attributes"][:n].to(device=self.device, dtype=self.dtype)
        masks = self._masks(batch)[:n] if self.has_masks and "part_masks" in batch else None
        scheduler = diffusion.build_sampler(sampler, self.scheduler)
        z = diffusion.sample(self.guided_model_fn(attributes, masks), scheduler, (n, *self.latent_shape), steps,
                             generator, self.device, self.dtype, clip=None)
        return self.codec.decode(z.to(self.dtype)).float().clamp(-1, 1)

    def save_networks(self, out: Path) -> None:
        out = Path(out)
        self.unet.save_pretrained(out / "unet")
        self.codec.save_pretrained(out / self.codec.subfolder)
        self.scheduler.save_pretrained(out / "scheduler")
        (out / CONDITION_FILE).parent.mkdir(parents=True, exist_ok=True)
        state = self.conditions.state_dict()
        if self.frozen_mask_backbone:  # held outside the module, saved with it: the export stands alone
            state.update(self.conditions.masks.backbone.state_dict(prefix=BACKBONE_KEYS))
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / CONDITION_FILE))

    def load_exported(self, out: Path) -> None:
        out = Path(out)
        self.unet = type(self.unet).from_pretrained(out / "unet")
        self.codec.load_pretrained(out / self.codec.subfolder)
        state = load_file(str(out / CONDITION_FILE))
        if self.frozen_mask_backbone:
            backbone = {k.removeprefix(BACKBONE_KEYS): state.pop(k) for k in list(state) if k.startswith(BACKBONE_KEYS)}
            self.conditions.masks.backbone.load_state_dict(backbone)
        self.conditions.load_state_dict(state)

    def checkpointed_networks(self):
        trained_backbone = self.has_masks and not self.frozen_mask_backbone  # a frozen one runs without gradients
        return [self.unet] + ([self.conditions.masks.backbone] if trained_backbone else [])

    def networks(self):
        nets = {"unet": self.unet, "attribute_embedder": self.conditions.attributes, "autoencoder": self.codec}
        if self.has_masks:
            nets["mask_encoder"] = self.conditions.masks
        if isinstance(self.conditions.fuse, torch.nn.Linear):
            nets["fusion"] = self.conditions.fuse
        return nets
