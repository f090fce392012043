"""The config of `facediff train-segformer`: the sections and key names of `facediff train`'s experiment config
(`data`, `model`, `optimizer`, `trainer`, `eval`), holding only what fine-tuning SegFormer reads; unknown keys are
errors. The run folder is `trainer.storage_path`/`trainer.run_name` (default: the config's name), local or s3://.

    cfg = load_segformer_config("configs/segformer/tiny.yaml", ["trainer.steps=40"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from facediff.config.load import apply_overrides, load_raw, validate
from facediff.config.schema import DataConfig, PositiveFloat, PositiveInt, PretrainedRef, Strict, TrainerConfig
from facediff.config.trainer_checks import refuse_misspelt_resources

Placement = TrainerConfig.model_fields["placement"].annotation  # the experiment config's choices


class SegformerDataConfig(Strict):
    """As the experiment config's `data` (its keys, its checks of `part_groups`); the groups are what it segments."""

    path: str = "data/synthetic/shards"  # a folder written by `facediff prepare`
    train_split: str = "train"
    eval_split: str = "test"
    image_size: PositiveInt = 256
    part_groups: Literal["default", "full"] | dict[str, list[str]] = "default"
    hflip: bool = True

    @field_validator("part_groups")
    @classmethod
    def _known_parts(cls, value):
        DataConfig(part_groups=value)  # the same checks as training configs
        return value

    def groups(self) -> dict[str, tuple[str, ...]]:
        return DataConfig(part_groups=self.part_groups).resolved_part_groups()


class SegformerOptimizerConfig(Strict):
    """AdamW; the learning rate decays linearly to 0 over `trainer.steps` (SegFormer's poly schedule)."""

    lr: PositiveFloat = 6e-5
    weight_decay: Annotated[float, Field(ge=0)] = 0.01


class SegformerTrainerConfig(Strict):
    """As the experiment config's `trainer` where the keys mean the same; counted in steps, not kimg."""

    run_name: str | None = None  # None = the config's name; re-using a name resumes that run
    storage_path: str = "runs/segformer"  # local path, or s3://, gs:// (see `storage.py`)
    num_workers: PositiveInt = 2
    use_gpu: bool = False
    resources_per_worker: dict[str, PositiveFloat] = {"CPU": 1.0}
    placement: Placement = "pack"  # where Ray places the workers, as in training configs
    placement_timeout_s: PositiveFloat | None = 600.0
    batch_size: PositiveInt = 8  # per worker
    steps: PositiveInt = 4000  # optimizer steps
    checkpoint_every_steps: PositiveInt = 500  # a re-run of an interrupted run resumes from the last of these
    log_every_steps: PositiveInt = 20
    max_failures: Annotated[int, Field(ge=-1)] = 0  # worker-group restarts Ray makes from it (-1: without end)
    seed: int = 0

    @model_validator(mode="after")
    def _ray_resource_names(self):
        refuse_misspelt_resources(self.resources_per_worker, "trainer")
        return self


class SegformerEvalConfig(Strict):
    batch_size: PositiveInt = 16  # test-split batches (per worker)
    num_preview: Annotated[int, Field(ge=0)] = 8  # test faces in preview.png


class SegformerTrainConfig(Strict):
    """Everything `train-segformer` reads."""

    name: str = "segformer"
    description: str = ""
    data: SegformerDataConfig = SegformerDataConfig()
    # the encoder (a preset and/or pretrained weights); the decode head is always new
    model: PretrainedRef = PretrainedRef(preset="segformer_b0_ade512",
                                         pretrained="nvidia/segformer-b0-finetuned-ade-512-512")
    optimizer: SegformerOptimizerConfig = SegformerOptimizerConfig()
    trainer: SegformerTrainerConfig = SegformerTrainerConfig()
    eval: SegformerEvalConfig = SegformerEvalConfig()

    def run_name(self) -> str:
        return self.trainer.run_name or self.name


def load_segformer_config(path: str | Path, overrides: list[str] | None = None) -> SegformerTrainConfig:
    """A YAML config (with `base:` inheritance) plus dotted `key=value` overrides; errors name the file and key."""
    origins: dict[tuple, str] = {}
    raw = apply_overrides(load_raw(path, origins), list(overrides or []), origins)
    raw.setdefault("name", Path(path).stem)
    return validate(SegformerTrainConfig, raw, origins, str(Path(path).resolve()))
