"""The `model` section of an experiment config: one class per model family, a union tagged by `family`.

Field names of the network classes are their diffusers constructor arguments; pretrained networks are named by
a `PretrainedRef` (a preset shipped with facediff and/or weights).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from facediff.config.types import ConflictingKeys, PositiveFloat, PositiveInt, Strict, UnitFloat

def check_unet_blocks(cfg):
    """Shared validator of diffusers UNet configs: one block type per level each way, widths fit the norm groups."""
    n = len(cfg.block_out_channels)
    if len(cfg.down_block_types) != n or len(cfg.up_block_types) != n:
        raise ConflictingKeys(
            f"model.block_out_channels has {n} entries but model.down_block_types has {len(cfg.down_block_types)} "
            f"and model.up_block_types {len(cfg.up_block_types)}: give one block type per level each way",
            keys=[("block_out_channels",), ("down_block_types",), ("up_block_types",)])
    bad = [c for c in cfg.block_out_channels if c % cfg.norm_num_groups]
    if bad:
        raise ConflictingKeys(f"model.block_out_channels holds widths {bad} that model.norm_num_groups, "
                              f"{cfg.norm_num_groups}, does not divide",
                              keys=[("block_out_channels",), ("norm_num_groups",)])
    return cfg


class UNetModelConfig(Strict):
    """Pixel-space `diffusers.UNet2DModel`; field names are its constructor arguments."""

    family: Literal["unet"] = "unet"
    sample_size: PositiveInt = 128
    in_channels: PositiveInt = 3
    out_channels: PositiveInt = 3
    layers_per_block: PositiveInt = 2
    block_out_channels: list[PositiveInt] = [128, 256, 512, 512]
    down_block_types: list[str] = ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"]
    up_block_types: list[str] = ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]
    attention_head_dim: PositiveInt | None = 8
    resnet_time_scale_shift: Literal["default", "scale_shift"] = "default"
    norm_num_groups: PositiveInt = 32
    dropout: UnitFloat = 0.0

    @model_validator(mode="after")
    def _blocks_match(self):
        return check_unet_blocks(self)


class DiTModelConfig(Strict):
    """Pixel-space `diffusers.DiTTransformer2DModel`, unconditional through one constant class label."""

    family: Literal["dit"] = "dit"
    sample_size: PositiveInt = 128
    patch_size: PositiveInt = 4
    in_channels: PositiveInt = 3
    out_channels: PositiveInt = 3
    num_layers: PositiveInt = 6
    num_attention_heads: PositiveInt = 8
    attention_head_dim: PositiveInt = 64
    dropout: UnitFloat = 0.1

    @model_validator(mode="after")
    def _patch_divides(self):
        if self.sample_size % self.patch_size:
            raise ConflictingKeys(f"model.sample_size, {self.sample_size}, is not divisible by model.patch_size, "
                                  f"{self.patch_size}", keys=[("sample_size",), ("patch_size",)])
        return self


class PretrainedRef(Strict):
    """Where pretrained weights come from: a hub id or a local folder, loaded only when a job asks for them.

    `preset` names an architecture config that ships with facediff (random init, offline); `pretrained` names
    weights. With both, the weights must fit the preset's architecture.
    """

    preset: str | None = None
    pretrained: str | None = None
    subfolder: str | None = None
    revision: str | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if self.preset is None and self.pretrained is None:
            raise ValueError("give a `preset` (architecture shipped with facediff) or `pretrained` (hub id or path)")
        return self


class AutoencoderConfig(PretrainedRef):
    kind: Literal["vq", "kl"] = "vq"
    scaling_factor: PositiveFloat | None = None  # None = from the autoencoder's own config


class AttributeEmbedderConfig(Strict):
    """MLP from the 40-d multi-hot attribute vector to `tokens` cross-attention tokens of width `dim`."""

    hidden: list[PositiveInt] = [512, 512]
    dim: PositiveInt = 256
    tokens: PositiveInt = 1
    dropout: UnitFloat = 0.1


class MaskEncoderConfig(PretrainedRef):
    """SegFormer over the grouped part masks (`data.part_groups`), pooled and projected to `proj_dim`."""

    input: Literal["channels", "labels"] = "channels"
    frozen: bool = True
    proj_dim: PositiveInt = 128


class LatentConditionalModelConfig(Strict):
    """`UNet2DConditionModel` over a frozen autoencoder, conditioned on attributes (and part masks).

    The UNet fields are its constructor arguments; `sample_size`/`in_channels` must match the autoencoder's
    latents at `data.image_size` (checked when the task is built).
    """

    family: Literal["lc_unet"] = "lc_unet"
    sample_size: PositiveInt = 64
    in_channels: PositiveInt = 3
    out_channels: PositiveInt = 3
    layers_per_block: PositiveInt = 2
    block_out_channels: list[PositiveInt] = [128, 128, 256, 256, 512, 512]
    down_block_types: list[str]
    up_block_types: list[str]
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    attention_head_dim: PositiveInt = 8
    # width of the context the condition encoder emits: attribute tokens (dim) ⊕ mask features (proj_dim),
    # projected to it by a Linear whenever masks are fused (or dim differs)
    cross_attention_dim: PositiveInt = 256
    use_linear_projection: bool = True
    norm_num_groups: PositiveInt = 32
    autoencoder: AutoencoderConfig
    attribute_embedder: AttributeEmbedderConfig = AttributeEmbedderConfig()
    mask_encoder: MaskEncoderConfig | None = None  # None: attributes only
    # Condition dropout for classifier-free guidance: each sample's attributes (masks) are replaced by a learned
    # null condition with this probability, independently.
    attribute_dropout: UnitFloat = 0.1
    mask_dropout: UnitFloat = 0.1

    @model_validator(mode="after")
    def _blocks_match(self):
        return check_unet_blocks(self)


class LoRAConfig(Strict):
    rank: PositiveInt = 8
    alpha: PositiveFloat = 8.0
    dropout: UnitFloat = 0.0
    # PEFT matches a module whose name is, or ends in ".<target>" (so "conv" targets the down/upsamplers' convs)
    target_modules: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]


class StableDiffusionLoRAModelConfig(Strict):
    """LoRA (PEFT) on the UNet of a frozen Stable Diffusion pipeline, prompted with the face's attributes.

    `pipeline` names the whole pipeline: a shipped preset (`sd2_base`, `sd2_768`, `sd15`, `tiny_sd`) and/or
    pretrained weights (hub id or a local diffusers folder). Its own noise scheduler is used (prediction type
    included), so the `diffusion` section's schedule keys must stay at their defaults.
    """

    family: Literal["sd_lora"] = "sd_lora"
    pipeline: PretrainedRef
    lora: LoRAConfig = LoRAConfig()
    # conditional: each record's prompt is `prompt_template` over its positive attributes; unconditional: every
    # record gets the neutral `placeholder_prompt` (the paper's unconditional LoRA rows)
    conditional: bool = True
    prompt_template: str = "A photo of a person with {attributes}"
    placeholder_prompt: str = "A photo of a person"
    prompt_dropout: UnitFloat = 0.0  # the prompt is replaced by "" (classifier-free guidance's null prompt)
    guidance_scale: Annotated[float, Field(ge=0)] = 1.0  # 1 = the conditional prediction alone
    sample_with_lora: bool = True  # false: sample/evaluate the base model ("No Tuning" rows)

    @field_validator("prompt_template")
    @classmethod
    def _has_slot(cls, value):
        if "{attributes}" not in value:
            raise ValueError("must contain {attributes}, where the attribute phrases go")
        return value


class PerceptualLossConfig(Strict):
    """The frozen networks of the mask-aware perceptual loss (the weights λ1, λ2 and T are in `loss`).

    `lpips_trunk` / `face_net`: `imagenet` / `vggface2` are the published weights (torchvision's VGG16, read from
    the torch hub cache, downloaded when the hub is reachable; facenet-pytorch's VGGFace2 InceptionResnetV1, the
    same), a path is a local state_dict file of that network, `random` a seeded random init (tests, the tiny
    demo: lpips' own linear heads ship with the package and are always loaded)."""

    lpips_net: Literal["vgg", "alex", "squeeze"] = "vgg"  # the paper: VGG
    lpips_trunk: str = "imagenet"
    face_net: str = "vggface2"
    # α of Eq. 1: InceptionResnetV1 module -> weight of the L2 distance of its output on the two face crops
    face_layers: dict[str, Annotated[float, Field(ge=0)]] = {"repeat_1": 1.0, "mixed_6a": 1.0, "repeat_2": 1.0,
                                                            "mixed_7a": 1.0}
    face_size: Annotated[int, Field(ge=80)] = 160  # face crops are resized to this (InceptionResnetV1: 160)
    checkpoint_decoder: bool = True  # gradient checkpointing of the VAE decoder: 512 px fits on one GPU

    @field_validator("lpips_trunk", "face_net")
    @classmethod
    def _named_or_path(cls, value):
        if not value:
            raise ValueError("give the published weights' name, `random`, or a path to a state_dict file")
        return value


class ControlNetModelConfig(Strict):
    """A ControlNet branch (`ControlNetModel.from_unet`: the UNet's encoder copied, zero convolutions) beside the
    frozen UNet of a Stable Diffusion pipeline, trained on captioned people images with the mask-aware
    perceptual loss (`loss.masked_lpips_weight`, `loss.face_feature_weight`, `loss.perceptual_timestep_threshold`).

    `conditioning`: what the branch is fed. `constant` (the default; the paper feeds no explicit condition) is an
    all-zero image, the same at training and sampling, so the branch acts as a learned second modality that
    needs nothing from the user at inference; `persons` is the record's person mask (people white on black), so
    sampling needs a person mask (a test record's, or the user's)."""

    family: Literal["controlnet"] = "controlnet"
    pipeline: PretrainedRef
    controlnet: PretrainedRef | None = None  # start from these ControlNet weights; None = from the UNet's encoder
    conditioning: Literal["constant", "persons"] = "constant"
    prompt_dropout: UnitFloat = 0.0  # captions replaced by "" (classifier-free guidance's null prompt)
    guidance_scale: Annotated[float, Field(ge=0)] = 7.5
    perceptual: PerceptualLossConfig = PerceptualLossConfig()


ModelConfig = Annotated[
    UNetModelConfig
    | DiTModelConfig
    | LatentConditionalModelConfig
    | StableDiffusionLoRAModelConfig
    | ControlNetModelConfig,
    Field(discriminator="family"),
]
MODEL_FAMILIES = ("unet", "dit", "lc_unet", "sd_lora", "controlnet")
