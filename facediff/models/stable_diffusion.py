"""A Stable Diffusion pipeline's networks, shared by the SD LoRA and ControlNet tasks.

`StableDiffusionBackbone(ref, load_weights)` holds `unet`, `vae`, `text_encoder`, `tokenizer` and
`noise_scheduler`, named like a diffusers `StableDiffusionPipeline` folder. `ref` is a `PretrainedRef`: `preset`
names a whole-pipeline preset (`sd2_base`, `sd2_768`, `sd15`, `tiny_sd` under `presets/`: one JSON with `unet`,
`vae`, `text_encoder`, `scheduler` configs and `tokenizer: tiny|hub`), `pretrained` a hub id or a local pipeline
folder. With `load_weights` and `pretrained`, every component is read from the pipeline's subfolders, and the
prediction type is the loaded scheduler's (SD2 768 predicts v, SD2 base epsilon: never assumed). Otherwise the
networks are a seeded random init of the preset (identical in every process, like `LatentCodec`), and the
tokenizer is the offline tiny one for `tiny` presets and, for `hub` presets, CLIP's own vocabulary built from the
BPE file open_clip_torch ships (`clip_tokenizer.py`); without that package the tokenizer is an error only once
used, so shape-only builds (`torch.device("meta")`, `facediff info`) still work offline.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from facediff.models.clip_tokenizer import offline_clip_tokenizer
from facediff.models.pretrained import WeightsNotFound, _describe_lookup, from_config, preset_config
from facediff.models.tiny_tokenizer import tiny_clip_tokenizer
from facediff.rng import seeded_build

RANDOM_INIT_SEED = 0  # as autoencoder.py: frozen random networks must agree across processes
NETWORKS: dict[str, type[nn.Module]] = {"vae": AutoencoderKL, "text_encoder": CLIPTextModel,
                                        "unet": UNet2DConditionModel}
PROMPT_CACHE_SIZE = 512  # SD2: 77 x 1024 fp32 = 315 kB a prompt, so ~160 MB when full


class UnavailableTokenizer:
    """Stands in for a hub tokenizer that was not loaded; any use raises a ValueError that says what to do."""

    def __init__(self, preset: str):
        self._message = (f"preset {preset!r} has no offline tokenizer (its tokenizer comes with the pretrained "
                         "pipeline): set `pretrained` and build with load_weights=True, or use the `tiny_sd` preset")

    def __call__(self, *args, **kwargs):
        raise ValueError(self._message)

    def __getattr__(self, name: str):
        if name.startswith("__"):  # copy/pickle probe dunders with getattr(); let them see a plain object
            raise AttributeError(name)
        raise ValueError(self._message)


def _subfolder(ref, component: str) -> str:
    return f"{ref.subfolder}/{component}" if getattr(ref, "subfolder", None) else component


def _load(cls, ref, component: str):
    """`cls.from_pretrained` of one pipeline component; WeightsNotFound naming every place looked."""
    subfolder = _subfolder(ref, component)
    kwargs = {"subfolder": subfolder, **({"revision": ref.revision} if getattr(ref, "revision", None) else {})}
    try:
        return cls.from_pretrained(ref.pretrained, **kwargs)
    except (OSError, ValueError) as err:  # hub/HTTP errors subclass OSError; bad ids and configs ValueError
        where = _describe_lookup(SimpleNamespace(pretrained=ref.pretrained, subfolder=subfolder))
        raise WeightsNotFound(f"Stable Diffusion pipeline {ref.pretrained}: cannot load its {component}: {where}. "
                              f"{type(err).__name__}: {err}") from None


def _check_fits_preset(name: str, model: nn.Module, config: dict[str, Any], ref) -> None:
    with torch.device("meta"):
        expected = from_config(type(model), config)
    want = {k: tuple(v.shape) for k, v in expected.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:3]
        raise ValueError(f"{ref.pretrained}: {name} does not fit preset {ref.preset!r} (first differences: {diff})")


def _check_tiny_tokenizer(tokenizer: CLIPTokenizer, text_config: dict[str, Any], preset: str) -> None:
    # The tiny vocabulary is learned from the prompt words: rewording a phrase changes its size and ids.
    want = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    stale = {k: (text_config.get(k), v) for k, v in want.items() if text_config.get(k) != v}
    if stale:
        raise ValueError(f"preset {preset!r}: text_encoder config disagrees with the tiny tokenizer "
                         f"(key: (preset, tokenizer)) {stale}; write the tokenizer's values into the preset")


class StableDiffusionBackbone(nn.Module):
    """The networks of a Stable Diffusion pipeline, with the encode/decode helpers its tasks need."""

    def __init__(self, ref, load_weights: bool, prompt_cache_size: int = PROMPT_CACHE_SIZE,
                 components: tuple[str, ...] = tuple(NETWORKS)):
        """`components`: the networks to build (default all); a job that needs one (`prepare prompt-embeddings`:
        the text encoder) skips loading the rest. Each keeps its own seed, so it is the same network either way."""
        super().__init__()
        preset = preset_config(ref.preset) if ref.preset else None
        if load_weights and ref.pretrained:
            for name, cls in NETWORKS.items():
                if name not in components:
                    continue
                model = _load(cls, ref, name)
                if preset is not None:
                    _check_fits_preset(name, model, preset[name], ref)
                setattr(self, name, model)
            self.tokenizer = _load(CLIPTokenizer, ref, "tokenizer")
            self.noise_scheduler = _load(DDPMScheduler, ref, "scheduler")
        else:
            if preset is None:
                raise ValueError(f"{ref.pretrained}: no pipeline `preset` given, so the networks cannot be built "
                                 "without loading weights; add one (e.g. sd2_base, sd15, tiny_sd)")
            for i, (name, cls) in enumerate(NETWORKS.items()):
                if name not in components:
                    continue
                with seeded_build(RANDOM_INIT_SEED + i):  # leaves the caller's RNG streams untouched
                    setattr(self, name, from_config(cls, preset[name]))
            if preset["tokenizer"] == "tiny":
                self.tokenizer = tiny_clip_tokenizer()
                _check_tiny_tokenizer(self.tokenizer, preset["text_encoder"], ref.preset)
            else:  # CLIP's exact tokenizer from open_clip's BPE file (`clip_tokenizer.py`), when installed
                self.tokenizer = offline_clip_tokenizer(ref.preset) or UnavailableTokenizer(ref.preset)
            with torch.device("cpu"):  # a scheduler's tables must be real even in a meta-device build
                self.noise_scheduler = DDPMScheduler.from_config(preset["scheduler"])
        self.prediction_type: str = self.noise_scheduler.config.prediction_type
        self._prompt_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.prompt_cache_size = prompt_cache_size

    # ------------------------------------------------------------------------------------------ latents
    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)  # None for SD1/2's VAE

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)  # every encoder block but the last halves
        if image_size % factor:
            raise ValueError(f"image size {image_size} is not divisible by the VAE's downsampling factor {factor}")
        return int(self.vae.config.latent_channels), image_size // factor, image_size // factor

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents. The posterior mean (deterministic: cached and
        on-the-fly latents agree) unless a generator is passed, then a posterior sample as SD's training does."""
        p = next(self.vae.parameters())
        dist = self.vae.encode(images.to(device=p.device, dtype=p.dtype)).latent_dist
        z = dist.sample(generator) if generator is not None else dist.mean
        return (z - self.shift_factor) * self.scaling_factor

    def decode_latents(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1]. Not under no_grad: perceptual losses backpropagate through it
        (with `clamp=False`: clamping would zero the gradient of every saturated pixel)."""
        p = next(self.vae.parameters())
        z = latents.to(device=p.device, dtype=p.dtype) / self.scaling_factor + self.shift_factor
        images = self.vae.decode(z).sample
        return images.clamp(-1.0, 1.0) if clamp else images

    # ------------------------------------------------------------------------------------------ prompts
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        max_length = self.tokenizer.model_max_length
        return self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length,
                              return_tensors="pt").input_ids

    def _encode_uncached(self, prompts: list[str]) -> torch.Tensor:
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(self.tokenize(prompts).to(device)).last_hidden_state

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text hidden states (B, 77, hidden) of the prompts. While the text encoder is frozen a prompt's
        embedding never changes, so it is cached (least recently used dropped first); a trainable encoder
        bypasses the cache and keeps the graph."""
        prompts = list(prompts)
        if any(p.requires_grad for p in self.text_encoder.parameters()):
            return self._encode_uncached(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._prompt_cache))
        if missing:
            with torch.no_grad():
                states = self._encode_uncached(missing)
            for prompt, state in zip(missing, states):
                self._prompt_cache[prompt] = state.clone()  # a view would pin its whole batch's storage
        for prompt in prompts:
            self._prompt_cache.move_to_end(prompt)
        out = torch.stack([self._prompt_cache[p] for p in prompts])
        while len(self._prompt_cache) > self.prompt_cache_size:
            self._prompt_cache.popitem(last=False)
        device = next(self.text_encoder.parameters()).device
        return out.to(device)  # cached on the device the encoder had then; returned on its current one

    def clear_prompt_cache(self) -> None:
        self._prompt_cache.clear()

    # ---------------------------------------------------------------------------------------- utilities
    def freeze(self) -> "StableDiffusionBackbone":
        """No gradient for any network (a task unfreezes, or adds adapters to, what it trains)."""
        for name in NETWORKS:
            if hasattr(self, name):
                getattr(self, name).requires_grad_(False)
        for name in ("vae", "text_encoder"):
            if hasattr(self, name):
                getattr(self, name).eval()
        return self

    def pipeline(self) -> StableDiffusionPipeline:
        if isinstance(self.tokenizer, UnavailableTokenizer):
            self.tokenizer("")  # raises its explanation
        return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.unet, scheduler=self.noise_scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    def save_pipeline(self, folder) -> None:
        """A plain diffusers `StableDiffusionPipeline` folder: `StableDiffusionPipeline.from_pretrained(folder)`
        loads it without facediff."""
        self.pipeline().save_pretrained(str(folder))


EXPORTED_BASE = "base"  # where an export keeps a base pipeline that exists only as random weights


def export_random_base(ref, out) -> None:
    """Save the base pipeline beside an export when it has no pretrained weights (random tiny presets): a fresh
    build is the same base (seeded), so plain diffusers can load the export without facediff."""
    if ref.pretrained is None:
        StableDiffusionBackbone(ref, load_weights=False).save_pipeline(Path(out) / EXPORTED_BASE)


def exported_base_ref(ref, out):
    """The pipeline an export was made on: its `base/` folder when it holds one, else `ref` itself."""
    folder = Path(out) / EXPORTED_BASE
    return ref.model_copy(update={"pretrained": str(folder), "subfolder": None}) if folder.is_dir() else ref
