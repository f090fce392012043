"""Stable Diffusion + LoRA (`sd_lora`): PEFT LoRA adapters on the UNet of a frozen SD pipeline, trained on the
faces with prompts made from their attributes (or a neutral placeholder prompt, unconditionally).

Only the LoRA parameters train: they are the task's only `requires_grad` parameters, so DeepSpeed's optimizer,
the EMA and the checkpoint hold exactly them; the VAE, text encoder and base UNet stay frozen in the training
precision. The export is diffusers' LoRA file (`pytorch_lora_weights.safetensors`), loadable with
`StableDiffusionPipeline.from_pretrained(base).load_lora_weights(export)`; a base that exists only as random
weights (the tiny preset) is exported beside it as a pipeline folder, `export/base/`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from facediff import diffusion
from facediff.config.schema import ExperimentConfig
from facediff.data.prompt_embeddings import PromptEmbeddings, check_prompt_embeddings
from facediff.data.prompts import attribute_prompts, drop_prompts
from facediff.models.stable_diffusion import StableDiffusionBackbone, export_random_base, exported_base_ref
from facediff.tasks.base import DiffusionTask

LORA_FILE = "pytorch_lora_weights.safetensors"
ADAPTER = "default"


def lora_config(m) -> LoraConfig:
    # gaussian init of A (B = 0): the adapter starts as the identity, as in diffusers' LoRA training scripts
    return LoraConfig(r=m.lora.rank, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
                      target_modules=list(m.lora.target_modules), init_lora_weights="gaussian")


class StableDiffusionLoRA(DiffusionTask):
    def __init__(self, cfg: ExperimentConfig, load_pretrained: bool = True):
        super().__init__(cfg, load_pretrained)
        m = cfg.model
        self.backbone = StableDiffusionBackbone(m.pipeline, load_weights=load_pretrained).freeze()
        self.latent_shape = self.backbone.latent_shape(cfg.data.image_size)
        self.backbone.unet.add_adapter(lora_config(m), adapter_name=ADAPTER)  # adds trainable lora_A/B only
        # the pipeline's own schedule and prediction type (zero-terminal-SNR rescaled when asked)
        self.scheduler = diffusion.pipeline_noise_scheduler(self.backbone.noise_scheduler, cfg.diffusion)
        self.loss_fn = diffusion.build_loss(self.scheduler, cfg.diffusion)
        self.hold_vae_and_text_encoder()
        self._prompt_store: PromptEmbeddings | None | bool = False  # False: not looked for yet

    def hold_vae_and_text_encoder(self) -> None:
        """The VAE and text encoder stay out of the engine (`DiffusionTask.hold_frozen`), in the UNet's precision;
        the base UNet stays in it, since its LoRA layers are what trains."""
        self.hold_frozen("backbone.vae")
        self.hold_frozen("backbone.text_encoder")

    @property
    def unet(self):
        return self.backbone.unet

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def prompts(self, attributes: torch.Tensor) -> list[str]:
        m = self.cfg.model
        if not m.conditional:
            return [m.placeholder_prompt] * len(attributes)
        return attribute_prompts(attributes, m.prompt_template, m.placeholder_prompt)  # a host column (data.batch)

    def forward(self, batch, generator=None):
        self.place_frozen()
        prompts = drop_prompts(self.prompts(batch["attributes"]), self.cfg.model.prompt_dropout,
                               self.cfg.trainer.seed, batch.get("id"), batch.get("epoch"))
        context = self.prompt_context(prompts)
        if self.cfg.data.use_latents:  # cached by `prepare latents --config` with this pipeline's VAE
            z0 = batch["latents"].to(device=self.device, dtype=torch.float32)
        else:
            z0 = self.backbone.encode_images(batch["image"].to(self.device)).float()  # noised in fp32
        per_sample, _ = self.loss_fn(lambda z, t: self.unet(z, t, encoder_hidden_states=context).sample, z0,
                                     generator, input_dtype=self.dtype, progress=self.training_progress)
        return per_sample.mean()

    def prompt_context(self, prompts: list[str]) -> torch.Tensor:
        """The prompts' text embeddings in the task's precision: with `data.use_latents`, read from the dataset's
        cached prompt embeddings when it has them (`data/prompt_embeddings.py`; the text encoder does not run),
        else encoded (cached in memory per prompt)."""
        if self._prompt_store is False:  # looked up on the first training step: sampling copies never need it
            cached = self.cfg.data.use_latents and check_prompt_embeddings(self.cfg.data.path, self.cfg.model)
            self._prompt_store = PromptEmbeddings(self.cfg.data.path) if cached else None
        if self._prompt_store is not None:
            return self._prompt_store.lookup(prompts).to(device=self.device, dtype=self.dtype)
        return self.backbone.encode_prompts(prompts).to(self.dtype)

    def guided_model_fn(self, prompts: list[str]):
        scale = self.cfg.model.guidance_scale
        context = self.backbone.encode_prompts(prompts).to(self.dtype)
        if scale != 1:
            context = torch.cat([self.backbone.encode_prompts([""] * len(prompts)).to(self.dtype), context])

        def model_fn(z, t):
            if scale == 1:
                return self.unet(z, t, encoder_hidden_states=context).sample
            uncond, cond = self.unet(z.repeat(2, 1, 1, 1), t.repeat(2), encoder_hidden_states=context).sample.chunk(2)
            return uncond + scale * (cond - uncond)

        return model_fn

    def sample(self, n, generator, sampler, steps, batch=None):
        """Conditional models sample from `batch["attributes"]` (or free `batch["prompts"]`); unconditional ones
        from the placeholder prompt. `model.sample_with_lora: false` samples the base model."""
        self.place_frozen()
        if batch is not None and "prompts" in batch:
            prompts = list(batch["prompts"])[:n]
        elif self.cfg.model.conditional:
            if batch is None or "attributes" not in batch:
                raise ValueError("a conditional sd_lora model samples from attributes or prompts: pass "
                                 "batch={'attributes': (n, 40)} or {'prompts': [...]}")
            prompts = self.prompts(batch["attributes"][:n])
        else:
            prompts = [self.cfg.model.placeholder_prompt] * n
        scheduler = diffusion.build_sampler(sampler, self.scheduler)
        if self.cfg.model.sample_with_lora:
            self.unet.enable_adapters()
        else:
            self.unet.disable_adapters()
        try:
            z = diffusion.sample(self.guided_model_fn(prompts), scheduler, (n, *self.latent_shape), steps,
                                 generator, self.device, self.dtype, clip=None)
        finally:
            self.unet.enable_adapters()
        return self.backbone.decode_latents(z).float()

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's weights in PEFT naming (`….lora_A/B.weight`), the form diffusers' `load_lora_weights`
        reads. Not `convert_state_dict_to_diffusers`: it renames only the attention projections (to
        `lora.down/up`), and a file mixing both namings loads without those (measured: 20 of 84 tensors)."""
        state = get_peft_model_state_dict(self.unet, adapter_name=ADAPTER)
        return {k: v.detach().float().contiguous() for k, v in state.items()}

    def save_networks(self, out: Path) -> None:
        from diffusers import StableDiffusionPipeline

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        # the adapter's config travels as metadata: without it diffusers infers alpha = rank, a different scale
        metadata = self.unet.peft_config[ADAPTER].to_dict()
        StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=self.lora_state_dict(), weight_name=LORA_FILE,
                                                  unet_lora_adapter_metadata=metadata)
        export_random_base(self.cfg.model.pipeline, out)  # a fresh build is the base without the adapter

    def load_exported(self, out: Path) -> None:
        from diffusers import StableDiffusionPipeline

        out = Path(out)
        self.backbone = StableDiffusionBackbone(exported_base_ref(self.cfg.model.pipeline, out),
                                                load_weights=True).freeze()
        self.scheduler = diffusion.pipeline_noise_scheduler(self.backbone.noise_scheduler, self.cfg.diffusion)
        self.loss_fn = diffusion.build_loss(self.scheduler, self.cfg.diffusion)
        pipe = self.backbone.pipeline()
        pipe.load_lora_weights(out, weight_name=LORA_FILE, adapter_name=ADAPTER)
        self.hold_vae_and_text_encoder()

    def checkpointed_networks(self):
        return [self.unet]  # the base UNet with its LoRA layers: the gradient runs through all of it

    def networks(self):
        return {"unet": self.unet, "vae": self.backbone.vae, "text_encoder": self.backbone.text_encoder}
