"""The `trainer:` section of an experiment config: workers (fixed or elastic), precision, DeepSpeed, checkpoints,
EMA and the GPU step's speed options. Re-exported by `facediff.config.schema`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from facediff.config.elastic import NoExactSplit, check_elastic
from facediff.config.trainer_checks import owned_deepspeed_keys, refuse_misspelt_resources
from facediff.config.types import ConflictingKeys, PositiveFloat, PositiveInt, Strict, UnitFloat


class EMAConfig(Strict):
    enabled: bool = True
    decay: UnitFloat = 0.9999
    warmup: bool = True  # decay ramps up as 1 - (1 + step / inv_gamma) ** -power, capped at `decay`
    inv_gamma: PositiveFloat = 1.0
    power: PositiveFloat = 0.75
    start_step: Annotated[int, Field(ge=0)] = 0


class GpuStepConfig(Strict):
    """Speed options of the training step on a GPU worker (ignored on CPU workers). Measured one by one with
    `benchmarks/gpu_train.py`."""

    tf32: bool = True  # TF32 tensor-core matmuls and convolutions for fp32 math (Ampere and later)
    fused_adamw: bool = True  # torch's fused (one-kernel) AdamW
    channels_last: bool = False  # NHWC weights and inputs for the conv nets (UNets): cuDNN's fast layout
    compile: bool = False  # torch.compile the training module (DeepSpeed's `engine.compile()`); slow first steps
    # bf16 autocast around the forward with fp32 weights and optimizer: mixed precision without DeepSpeed's
    # bf16 mode (trainer.precision must then be fp32)
    autocast: Literal["none", "bf16"] = "none"


class TrainerConfig(Strict):
    run_name: str | None = None  # None = the experiment's name; re-using a name resumes that run
    storage_path: str = "runs"  # local path here; s3://, gs:// or an NFS mount on a cluster
    # An int: a fixed worker count. `[min, max]` in a file or on the command line: an elastic run (docs/cluster.md,
    # "Preemptible nodes"), stored as min_workers + num_workers (= max): Ray Train runs on as many workers as the
    # cluster can hold in that range, restarting from the last checkpoint when nodes leave or join, with the global
    # batch of max workers kept at every size (config/elastic.py).
    num_workers: PositiveInt = 2
    min_workers: PositiveInt | None = None  # None: a fixed-size run
    # how often Ray Train looks for room to grow an elastic run (its elastic_resize_monitor_interval_s)
    elastic_resize_interval_s: Annotated[float, Field(ge=0)] = 60.0
    use_gpu: bool = False
    # Ray's resources per worker (keys case-sensitive). With use_gpu, Ray adds GPU: 1 where no GPU is given.
    # A misspelt Ray name is refused at load; a name the cluster does not have, or a worker no node can hold,
    # when the run starts (docs/configuration-overrides.md, "Resources and placement").
    resources_per_worker: dict[str, PositiveFloat] = {"CPU": 1.0}
    # Where Ray places the workers (its placement group strategy). pack: as few nodes as possible (the default:
    # NVLink/PCIe between GPUs of a node beats the network, so gradients all-reduce fastest). spread: across
    # nodes where it can (more CPUs and disk bandwidth for decoding per worker, when data, not compute, limits).
    # strict_spread: one worker per node or the run does not start (tests of multi-node code paths).
    # strict_pack: all workers on one node or the run does not start (a run that must not cross the network).
    placement: Literal["pack", "spread", "strict_spread", "strict_pack"] = "pack"
    # Seconds the run waits for Ray to place its workers (a busy cluster, nodes still starting) before it ends
    # with an error naming what was asked and what the cluster has; null waits without end (Ray's own default).
    # An elastic run retries instead, at the size the cluster holds then.
    placement_timeout_s: PositiveFloat | None = 600.0
    batch_size: PositiveInt = 16  # per worker, per micro-step
    grad_accum: PositiveInt = 1
    total_kimg: PositiveFloat = 100.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: Annotated[int, Field(ge=0, le=3)] = 0
    checkpoint_every_kimg: PositiveFloat = 10.0
    # async: a checkpoint is copied to storage by a background thread of each worker while training goes on
    # (Ray's CheckpointUploadMode.ASYNC); Ray registers it, for resuming and evaluation, once every rank's copy
    # is whole. sync: the workers wait for the copy at each checkpoint.
    checkpoint_upload: Literal["sync", "async"] = "sync"
    keep_last: PositiveInt = 3
    log_every_steps: PositiveInt = 10
    max_failures: Annotated[int, Field(ge=0)] = 0
    # A step whose loss is NaN or infinite on any rank (checked across ranks every step): `skip` drops that
    # micro-batch on every rank (no backward, no optimizer step; counted as `skipped_nonfinite` and logged),
    # `stop` ends the run with an error naming the step.
    on_nonfinite_loss: Literal["skip", "stop"] = "stop"
    seed: int = 0
    # Recompute the networks' block activations in the backward instead of keeping them (docs/training.md,
    # "Memory"): less activation memory for about one more forward of compute per step.
    gradient_checkpointing: bool = False
    ema: EMAConfig = EMAConfig()
    gpu: GpuStepConfig = GpuStepConfig()
    # merged last into the generated DeepSpeed config (expert escape hatch); the keys facediff sets from its own
    # (batch sizes, accumulation, clipping, ZeRO stage, precision, optimizer, schedule) are refused
    deepspeed: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _worker_range(cls, data):
        workers = data.get("num_workers") if isinstance(data, dict) else None
        if isinstance(workers, (list, tuple)):
            if len(workers) != 2 or not all(isinstance(w, int) and w > 0 for w in workers) or workers[0] > workers[1]:
                raise ConflictingKeys(f"trainer.num_workers {list(workers)}: a worker count or [min, max] with "
                                      "0 < min <= max", keys=[("num_workers",)])
            # [n, n] is a fixed size
            data = {**data, "min_workers": workers[0] if workers[0] < workers[1] else None, "num_workers": workers[1]}
        return data

    @model_validator(mode="after")
    def _elastic_global_batch(self):
        if self.min_workers is None:
            return self
        if self.min_workers > self.num_workers:
            raise ConflictingKeys(f"trainer.min_workers {self.min_workers} is above trainer.num_workers "
                                  f"{self.num_workers}: write trainer.num_workers=[min, max]",
                                  keys=[("min_workers",), ("num_workers",)])
        try:
            check_elastic(self.min_workers, self.num_workers, self.batch_size, self.grad_accum)
        except NoExactSplit as err:
            raise ConflictingKeys(str(err), keys=[("num_workers",), ("batch_size",), ("grad_accum",)]) from None
        if self.zero_stage != 0:  # DeepSpeed 0.18 loads ZeRO partitions only into as many workers as saved them
            raise ConflictingKeys(f"trainer.num_workers is a range (an elastic run), but trainer.zero_stage is "
                                  f"{self.zero_stage}, whose optimizer partitions load only on the worker count that "
                                  "saved them (DeepSpeed: 'Automatic adjustment of ZeRO's optimizer state "
                                  "partitioning with a new world size is not currently supported'): use "
                                  "trainer.zero_stage 0 or a fixed trainer.num_workers",
                                  keys=[("num_workers",), ("zero_stage",)])
        return self

    @model_validator(mode="after")
    def _one_mixed_precision(self):
        if self.gpu.autocast != "none" and self.precision != "fp32":
            raise ConflictingKeys(f"trainer.gpu.autocast is {self.gpu.autocast}, mixed precision over fp32 weights, "
                                  f"but trainer.precision is {self.precision}: set one of them, not both",
                                  keys=[("gpu", "autocast"), ("precision",)])
        return self

    @model_validator(mode="after")
    def _no_fp16_on_cpu(self):
        # fp16 math on a CPU is emulated: ~30x slower than fp32 (docs/training-precision.md); bf16 is fast there
        if self.precision == "fp16" and not self.use_gpu:
            raise ConflictingKeys("trainer.precision is fp16, but trainer.use_gpu is false: CPUs compute fp16 ~30x "
                                  "slower than fp32; use trainer.precision=bf16 (fast on CPUs) or fp32",
                                  keys=[("precision",), ("use_gpu",)])
        return self

    @model_validator(mode="after")
    def _ray_resource_names(self):
        refuse_misspelt_resources(self.resources_per_worker, "trainer")
        return self

    @model_validator(mode="after")
    def _deepspeed_keys_facediff_sets(self):
        for path, instead in owned_deepspeed_keys(self.deepspeed):
            key = ".".join(("trainer.deepspeed",) + path)
            raise ConflictingKeys(f"{key}: facediff sets it from {instead}; set that instead and remove {key}",
                                  keys=[("deepspeed",) + path])
        return self

    @model_validator(mode="after")
    def _gpu_request_matches_use_gpu(self):
        # Ray's ScalingConfig refuses this pair when the run starts (ray/air/config.py, exit 1 after Ray is up).
        # Its other refusal, use_gpu with GPU: 0, cannot be written here: resource counts are positive.
        if not self.use_gpu and "GPU" in self.resources_per_worker:
            raise ConflictingKeys(
                f"trainer.use_gpu is false, but trainer.resources_per_worker.GPU is "
                f"{self.resources_per_worker['GPU']:g} (Ray refuses GPUs for CPU workers): drop the GPU entry "
                "(command line: `~trainer.resources_per_worker.GPU` or `trainer.resources_per_worker:={CPU: 2}`; "
                "in a file: `GPU: !delete`) or set trainer.use_gpu=true",
                keys=[("use_gpu",), ("resources_per_worker", "GPU")])
        return self

    @model_validator(mode="after")
    def _channels_last_needs_unflattened_weights(self):
        # DeepSpeed keeps the module's own fp32 parameters only at ZeRO-0 in fp32; bf16/fp16 and ZeRO 1-3 move them
        # into flat contiguous buffers (NHWC is lost, or the step fails: ZeRO-2 cannot view an NHWC gradient flat).
        if self.gpu.channels_last and (self.precision != "fp32" or self.zero_stage != 0):
            raise ConflictingKeys(
                f"trainer.gpu.channels_last needs DeepSpeed to keep the module's own weights, but trainer.precision "
                f"is {self.precision} and trainer.zero_stage is {self.zero_stage} (bf16/fp16 weights and ZeRO 1-3 "
                "flatten them into contiguous buffers): set trainer.precision=fp32 and trainer.zero_stage=0 (with "
                "trainer.gpu.autocast=bf16 for a bf16 step), or drop channels_last",
                keys=[("gpu", "channels_last"), ("precision",), ("zero_stage",)])
        return self
