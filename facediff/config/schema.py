"""The typed configuration of every facediff job.

One schema serves every model family: the sections `data`, `model`, `diffusion`, `loss`, `optimizer`, `trainer`
(with DeepSpeed and EMA) and `eval` are shared, and `model` is a union tagged by `family`, so adding a family
means adding one model class here and one task in `facediff.tasks`. Ray Tune grid files have their own schema
(`GridConfig`, in `grid.py`) whose search-space keys are checked against `ExperimentConfig`.

Every model forbids unknown keys: a misspelt key is an error, never silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from facediff.config.models import (  # noqa: F401  (re-exported: the model section's classes)
    MODEL_FAMILIES, AttributeEmbedderConfig, AutoencoderConfig, ControlNetModelConfig, DiTModelConfig,
    LatentConditionalModelConfig, LoRAConfig, MaskEncoderConfig, ModelConfig, PerceptualLossConfig, PretrainedRef,
    StableDiffusionLoRAModelConfig, UNetModelConfig, check_unet_blocks,
)
from facediff.config.schedule_checks import refuse_zero_snr_without_v
from facediff.config.tracking import TrackingConfig
from facediff.config.trainer import EMAConfig, GpuStepConfig, TrainerConfig  # noqa: F401  (re-exported)
from facediff.config.trainer_checks import refuse_misspelt_resources
from facediff.config.types import ConflictingKeys, PositiveFloat, PositiveInt, Strict, UnitFloat  # noqa: F401
from facediff.data.celebamask import DEFAULT_PART_GROUPS, PART_NAMES

# --------------------------------------------------------------------------------------------------- data
class DataConfig(Strict):
    path: str = "data/synthetic/shards"  # a folder written by `facediff prepare` (holds manifest.json)
    train_split: str = "train"
    eval_split: str = "test"
    image_size: PositiveInt = 128  # decoded size; shards are resized on load if stored at another size
    # "none": no part masks; "default": the 10 face-part groups; "full": one channel per part (18);
    # or an explicit {group: [part, ...]} mapping over CelebAMask-HQ part names.
    part_groups: Literal["none", "default", "full"] | dict[str, list[str]] = "none"
    hflip: bool = True
    shuffle: bool = True
    read_parallelism: PositiveInt | None = None  # Ray Data blocks; None = max(files, 2 x CPUs, rows / 128)
    # true: every rank trains on the same rows in the same order whatever the cluster's shape and on every rerun
    # (Ray Data keeps its block order, shard locality is off, and the default block count no longer depends on
    # the cluster's CPUs), so a run is bit-identical on one node or several. false (faster): blocks go to
    # whichever worker asks first; each epoch still holds every record once, but batches differ between runs.
    deterministic_order: bool = False
    # Training reads this many data epochs per streaming execution of the split (a pass), one after the other:
    # each execution's start costs ~0.2-0.6 s before its first batch. Batches near an epoch's end may hold rows of
    # the next one (the local shuffle buffer mixes them); each row keeps its own epoch's flips and captions.
    # None = enough epochs for 65,536 rows a pass, at most 8 (8 for 2,700 faces, 3 for 27,000).
    epochs_per_pass: PositiveInt | None = None
    use_latents: bool = False  # read the cached `latents` column written by `facediff prepare latents` (and sd_lora's cached prompt embeddings, when the dataset has them)
    # The training split must hold exactly this many records (checked against the manifest when a run starts):
    # the paper's data regimes (2,700 or 27,000 faces) are prepared datasets, and this catches a config of one
    # regime pointed at the other. None = whatever the dataset holds.
    train_records: PositiveInt | None = None
    # Normalize([0.5], [0.5]): pixel models denoise images in [-1, 1]; false keeps them in [0, 1] (Table VI's
    # `no_norm` runs). Pixel families only: latent families always encode images in [-1, 1].
    normalize: bool = True
    # Records whose image or label map does not decode that a run skips (each logged with its id and shard file,
    # counted in metrics.jsonl as `bad_records`) before it stops naming the files; 0: the first one stops it.
    max_bad_records: Annotated[int, Field(ge=0)] = 10

    @field_validator("part_groups")
    @classmethod
    def _known_parts(cls, value):
        if isinstance(value, dict):
            if not value:
                raise ValueError("part_groups mapping is empty")
            for group, parts in value.items():
                unknown = [p for p in parts if p not in PART_NAMES]
                if unknown or not parts:
                    raise ValueError(f"group {group!r}: unknown or no parts {unknown}; known: {list(PART_NAMES)}")
        return value

    def resolved_part_groups(self) -> dict[str, tuple[str, ...]] | None:
        if self.part_groups == "none":
            return None
        if self.part_groups == "default":
            return dict(DEFAULT_PART_GROUPS)
        if self.part_groups == "full":
            return {name: (name,) for name in PART_NAMES}
        return {group: tuple(parts) for group, parts in self.part_groups.items()}


# ----------------------------------------------------------------------------------- diffusion and losses
class TimestepBand(Strict):
    start: Annotated[int, Field(ge=0)]  # first timestep of the band
    stop: PositiveInt  # one past its last
    weight: Annotated[float, Field(ge=0)]

    @model_validator(mode="after")
    def _ordered(self):
        if self.stop <= self.start:
            raise ValueError(f"stop ({self.stop}) must exceed start ({self.start})")
        return self


class TimestepPhase(Strict):
    until: Annotated[float, Field(gt=0, le=1)]  # the phase ends at this fraction of the run's steps
    bands: list[TimestepBand] = []


class DiffusionConfig(Strict):
    num_train_timesteps: PositiveInt = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    beta_start: PositiveFloat = 1e-4
    beta_end: PositiveFloat = 0.02
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    # Training timesteps: uniform (no phases), or per phase of the run (a fraction of its steps) drawn with
    # probability proportional to band weights (1 outside every band) - the paper's SD LoRA Setup 1.
    timestep_phases: list[TimestepPhase] = []
    # Clamp each sampling step's x0 estimate to [-1, 1]: right for pixels, wrong for latents (unbounded).
    # None = the family's default (pixel families true, latent families false); true is refused for latents.
    clip_sample: bool | None = None
    # Loss options (docs/training.md, "Loss options"); the defaults leave the plain loss unchanged.

    # Min-SNR-γ weighting (Hang et al. 2023; γ = 5 there): min(SNR, γ)/SNR for ε, min(SNR, γ) for x0 targets,
    # min(SNR, γ)/(SNR + 1) for v. None = unweighted.
    min_snr_gamma: PositiveFloat | None = None
    # Offset noise: s·N(0, 1) per sample and channel, constant over the image, added to the noise (and target)
    # so the model can change an image's mean brightness (0.05-0.1 in common recipes).
    offset_noise: Annotated[float, Field(ge=0)] = 0.0
    # Input perturbation (Ning et al. 2023): x_t is made from noise + p·N(0, 1), the target keeps the noise
    # (0.1 in diffusers' recipe).
    input_perturbation: Annotated[float, Field(ge=0)] = 0.0
    # Rescale the betas so the last timestep has zero SNR, pure noise (Lin et al. 2023, algorithm 1); samplers
    # then start from that timestep ("trailing" spacing). v-prediction only.
    zero_terminal_snr: bool = False

    @model_validator(mode="after")
    def _phases_cover_the_run(self):
        ends = [phase.until for phase in self.timestep_phases]
        if ends and (ends != sorted(set(ends)) or ends[-1] != 1.0):
            raise ConflictingKeys(f"diffusion.timestep_phases: `until` must increase and the last be 1.0 (the run's "
                                  f"end), got {ends}", keys=[("timestep_phases",)])
        late = [b.stop for phase in self.timestep_phases for b in phase.bands if b.stop > self.num_train_timesteps]
        if late:
            raise ConflictingKeys(f"diffusion.timestep_phases: band stops {late} exceed "
                                  f"diffusion.num_train_timesteps={self.num_train_timesteps}",
                                  keys=[("timestep_phases",), ("num_train_timesteps",)])
        return self


class LossConfig(Strict):
    # Attribute embedder InfoNCE (latent conditional models); weight 0 turns it off.
    infonce_weight: Annotated[float, Field(ge=0)] = 0.0
    infonce_threshold: UnitFloat = 0.8
    infonce_temperature: PositiveFloat = 0.07
    infonce_include_self: bool = False
    # Mask-aware perceptual losses on one-step x0 predictions, only for timesteps below T.
    perceptual_timestep_threshold: PositiveInt = 200  # T
    masked_lpips_weight: Annotated[float, Field(ge=0)] = 0.0  # λ1
    face_feature_weight: Annotated[float, Field(ge=0)] = 0.0  # λ2


LATENT_FAMILIES = ("lc_unet", "sd_lora", "controlnet")
PIPELINE_FAMILIES = ("sd_lora", "controlnet")  # built around a whole Stable Diffusion pipeline
SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")
LOSS_DEFAULTS = {name: f.default for name, f in LossConfig.model_fields.items()}
_INFONCE = {"infonce_weight", "infonce_threshold", "infonce_temperature", "infonce_include_self"}
_PERCEPTUAL = {"perceptual_timestep_threshold", "masked_lpips_weight", "face_feature_weight"}
# The loss keys each family's task reads; any other key set to a non-default value is an error. Checked by value
# (not by whether it was written) so that a run's saved, fully resolved config loads back.
LOSS_KEYS_READ: dict[str, set[str]] = {"unet": set(), "dit": set(), "lc_unet": _INFONCE, "sd_lora": set(),
                                       "controlnet": _PERCEPTUAL}


# ------------------------------------------------------------------------------------ optimiser, trainer
class OptimizerConfig(Strict):
    lr: PositiveFloat = 1e-4
    betas: tuple[UnitFloat, UnitFloat] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: Annotated[int, Field(ge=0)] = 500
    min_lr_ratio: UnitFloat = 0.0
    grad_clip: PositiveFloat | None = 1.0


class EvalConfig(Strict):
    every_kimg: PositiveFloat | None = None  # None = only at the end
    num_samples: PositiveInt | None = None  # None = the size of the evaluation split
    batch_size: PositiveInt = 32
    sampler: Literal["ddpm", "ddim", "dpm++"] = "ddim"
    steps: PositiveInt = 50
    # Classifier-free guidance of conditional families, per condition (1 = conditional model alone, 0 = drop it):
    # eps = eps(0,0) + s_a (eps(a,0) - eps(0,0)) + s_m (eps(a,m) - eps(a,0)).
    attribute_guidance: Annotated[float, Field(ge=0)] = 1.0
    mask_guidance: Annotated[float, Field(ge=0)] = 1.0
    # Conditional families: read the requested attributes back from the samples with a reader trained (once,
    # cached beside the shards) on the training split, and report balanced accuracy `attr_acc` beside the distance.
    attribute_accuracy: bool = True
    seed: int = 1234
    use_ema: bool = True
    inception_weights: str | None = None  # a local FID Inception checkpoint; else the torch hub cache
    # Reported as `fd_<name>`, never as `fid`, when the Inception weights cannot be had.
    fallback_features: Literal["none", "mtcnn_onet"] = "mtcnn_onet"
    # Bootstrap resamples of the generated features for the 95% intervals of FID and KID (`fid_lo`, `fid_hi`,
    # `kid_lo`, `kid_hi`); 0 = no intervals. Resamples features, not images: seconds at the papers' sizes.
    bootstrap: Annotated[int, Field(ge=0)] = 200
    # The memorisation audit (`facediff evaluate --memorisation`, docs/evaluation.md#memorisation): InceptionResnetV1
    # weights, a local state_dict file or `random`; None = facenet-pytorch's VGGFace2 file in the torch hub cache,
    # else a random-init network, labelled `random_init` in the output.
    face_embedding_weights: str | None = None
    # The audit embeds the training split's first N records (file order); None = all of them.
    memorisation_train_cap: PositiveInt | None = 5000
    # Evaluate each `every_kimg` checkpoint in Ray Train's checkpoint validation task, on its own resources,
    # while training goes on (docs/evaluation.md, "Evaluation off the training path"); rows arrive later in
    # metrics.jsonl (and, in a Tune trial, at ASHA), tagged with the checkpoint's step and kimg. Every evaluation
    # then writes a checkpoint.
    async_validation: bool = False
    # Ray resources of that task (CPU, GPU: a fraction shares a GPU; other names: custom node resources)
    async_resources: dict[str, PositiveFloat] = {"CPU": 1.0}

    @model_validator(mode="after")
    def _ray_resource_names(self):
        refuse_misspelt_resources(self.async_resources, "eval", "async_resources")
        return self
    # Mask models (lc_unet with model.mask_encoder): a `facediff train-segformer` run folder (or its segformer/
    # folder) on the same part groups; `facediff evaluate` then reports `mask_miou`, the samples' part mIoU against
    # their conditioning masks, and `mask_miou_real`, the segmenter's on the real faces (docs/evaluation.md).
    mask_segmenter: str | None = None
    # Training-time sample grid (rank 0, EMA weights, fixed noise and the eval split's first records as conditions):
    # RUN/samples/kimg_*.png and TensorBoard's `samples` image, every `log_images_every_kimg` and at the end. The
    # number of faces; 0 = off.
    sample_grid: Annotated[int, Field(ge=0)] = 8
    sample_grid_steps: PositiveInt = 20  # DDIM steps of the training-time grid
    log_images_every_kimg: PositiveFloat | None = None  # the grid's cadence; None = every `eval.every_kimg`


class ExperimentConfig(Strict):
    name: str
    description: str = ""
    data: DataConfig = DataConfig()
    model: ModelConfig
    diffusion: DiffusionConfig = DiffusionConfig()
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    trainer: TrainerConfig = TrainerConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()  # MLflow / W&B (docs/tracking.md)

    @model_validator(mode="after")
    def _sections_agree(self):
        model = self.model
        latent = model.family in LATENT_FAMILIES
        if self.diffusion.clip_sample is None:
            self.diffusion.clip_sample = not latent
        elif latent and self.diffusion.clip_sample:
            raise ConflictingKeys(f"diffusion.clip_sample: true clamps x0 to [-1, 1], but model.family is "
                                  f"{model.family!r}: it denoises latents, which are not bounded; set it to false (the "
                                  "family's default)", keys=[("diffusion", "clip_sample"), ("model", "family")])
        if latent and not self.data.normalize:
            raise ConflictingKeys(f"data.normalize: false is read by the pixel families only; model.family is "
                                  f"{model.family!r}, whose autoencoder takes images in [-1, 1]; remove it",
                                  keys=[("data", "normalize"), ("model", "family")])
        if not latent and model.sample_size != self.data.image_size:
            raise ConflictingKeys(f"model.sample_size is {model.sample_size} but data.image_size is "
                                  f"{self.data.image_size}: they must be equal, a pixel model denoises the images "
                                  "at their decoded size", keys=[("model", "sample_size"), ("data", "image_size")])
        refuse_zero_snr_without_v(self.diffusion, model, model.family in PIPELINE_FAMILIES)
        if model.family in PIPELINE_FAMILIES:
            mine = [k for k in SCHEDULE_KEYS if getattr(self.diffusion, k) != DiffusionConfig.model_fields[k].default]
            if mine:
                raise ConflictingKeys(f"diffusion.{mine[0]}: a {model.family!r} model uses its pipeline's own noise "
                                      f"schedule (model.pipeline's scheduler config); remove "
                                      f"diffusion.{', diffusion.'.join(mine)}", keys=[("diffusion", mine[0])])
            if self.trainer.zero_stage == 3:
                raise ConflictingKeys(f"trainer.zero_stage: 3 would partition the frozen VAE and text encoder of a "
                                      f"{model.family!r} model, which run outside the engine's forward; use 0-2 (its "
                                      "trainable weights are a small adapter, so ZeRO-2 already shards what "
                                      "matters)", keys=[("trainer", "zero_stage")])
        unread = [key for key, default in LOSS_DEFAULTS.items()
                  if getattr(self.loss, key) != default and key not in LOSS_KEYS_READ[model.family]]
        if unread:
            readers = {key: [f for f, keys in LOSS_KEYS_READ.items() if key in keys] for key in unread}
            raise ConflictingKeys("; ".join(
                f"loss.{key}: not read by model family {model.family!r} (only by {readers[key] or 'no family yet'}); "
                "remove it" for key in unread), keys=[("loss", key) for key in unread])
        if isinstance(model, LatentConditionalModelConfig) and model.mask_encoder and self.data.part_groups == "none":
            raise ConflictingKeys("model.mask_encoder encodes part masks, but data.part_groups is 'none': "
                                  "set data.part_groups (e.g. default) or remove the mask encoder",
                                  keys=[("model", "mask_encoder"), ("data", "part_groups")])
        if model.family == "controlnet" and self.loss.masked_lpips_weight + self.loss.face_feature_weight > 1:
            raise ConflictingKeys(f"loss.masked_lpips_weight + loss.face_feature_weight = "
                                  f"{self.loss.masked_lpips_weight + self.loss.face_feature_weight:g} exceeds 1: the "
                                  "denoising loss gets weight 1 - λ1 - λ2 below the threshold (paper Eq. 3)",
                                  keys=[("loss", "masked_lpips_weight"), ("loss", "face_feature_weight")])
        if self.data.use_latents and model_autoencoder(model) is None:
            raise ConflictingKeys(f"data.use_latents: needs a family that trains on cached latents (lc_unet, "
                                  f"sd_lora, controlnet), but model.family is {model.family!r}",
                                  keys=[("data", "use_latents"), ("model", "family")])
        return self


def model_autoencoder(model) -> AutoencoderConfig | None:
    """The frozen autoencoder a model family denoises the latents of (None for pixel families): `lc_unet`'s own,
    or the VAE of a Stable Diffusion pipeline, named so that `prepare latents` and the task build the same one
    (the `pipeline/vae` component of its preset; the pipeline's `vae` subfolder)."""
    if isinstance(model, LatentConditionalModelConfig):
        return model.autoencoder
    pipeline = getattr(model, "pipeline", None)
    if pipeline is None:
        return None
    return AutoencoderConfig(
        kind="kl", preset=f"{pipeline.preset}/vae" if pipeline.preset else None, pretrained=pipeline.pretrained,
        subfolder=f"{pipeline.subfolder}/vae" if pipeline.subfolder else ("vae" if pipeline.pretrained else None),
        revision=pipeline.revision)
