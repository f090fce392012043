"""What the check runs: the sizes of each mode, the datasets, every model family's rows, and the rows' order.

Every family gets a short `facediff train` of its tiny config (Ray Train + DeepSpeed, bf16, a few steps, finite
losses, checkpoints, an export) and a `facediff train --dry-run --random-weights` of one production config at
its real size (a GPU) or of its tiny config (a CPU, where the production dry runs take minutes each:
docs/dry-run.md; tests/test_dry_run.py's slow tests run them there)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tools.gpu_check.steps import ROOT

EXPERIMENTS = ROOT / "configs" / "experiments"
PRECISION = "bf16"  # of every training row in both modes (the production configs' precision; CPUs run it too)
GPU_BUDGET_S = 420.0  # + installing .gpu-wheels (~30 s) and ending the last step: within 8 min of device time
CPU_BUDGET_S = 2400.0


@dataclass
class Sizes:
    """What each mode runs; GPU sizes keep the whole check within 8 minutes on one H100/H200."""

    faces: int = 256
    face_size: int = 128
    coco_scenes: int = 24
    coco_raw_size: int = 640  # the scenes' longer side: prepared at 64 px and (GPU) 512 px
    coco_size: int = 64
    # row resume (tiny_unet, batch 8 per worker): 50 steps, then 50 more
    kimg_first: float = 0.4
    kimg_second: float = 0.8
    ckpt_kimg: float = 0.2
    eval_kimg: float = 0.2
    eval_samples: int = 16
    eval_steps: int = 10
    # row sample (tiny_lc_unet, batch 8)
    lc_kimg: float = 0.4
    sample_steps: int = 20
    # rows controlnet, sd_lora, dit: this many steps, a checkpoint every half
    family_steps: int = 4
    # row speed (unet_r3 at 128 px)
    bench_batch: int = 64
    bench_steps: int = 20
    speed_kimg: float = 0.768  # 12 steps of 64 images
    speed_log_every: int = 2
    speed_skip_rows: int = 2  # warm-up: data pipeline start, cuDNN autotuning
    step_timeout_s: float = 300.0


CPU_SIZES = Sizes(
    faces=128, face_size=64, coco_raw_size=160,
    kimg_first=0.16, kimg_second=0.24, ckpt_kimg=0.08, eval_kimg=0.08, eval_samples=8, eval_steps=4,
    lc_kimg=0.08, sample_steps=4,
    bench_batch=4, speed_kimg=0.048, speed_log_every=2, speed_skip_rows=2,
)
# the CPU stand-in for UNet r3: its config file, the model made tiny (6 levels, 32 px)
CPU_SPEED_MODEL = [
    "model.sample_size=32", "data.image_size=32", "model.layers_per_block=1", "model.norm_num_groups=8",
    "model.block_out_channels=[8,16,16,16,16,16]",
]


@dataclass(frozen=True)
class Dataset:
    """`faces`: `prepare synthetic` + `prepare celebamask`; `coco`: `prepare synthetic-coco` + `prepare coco`."""

    kind: str
    n: int
    raw_size: int
    size: int
    test_size: int | None = None  # faces: --test-size (None: the tool's default, scaled down for tiny sets)

    @property
    def raw(self) -> str:  # datasets of one kind, count and raw size share their raw tree
        return f"raw-{self.kind}-{self.n}-{self.raw_size}"


def datasets(s: Sizes, cpu: bool) -> dict[str, Dataset]:
    sets = {"faces": Dataset("faces", s.faces, s.face_size, s.face_size),
            "coco": Dataset("coco", s.coco_scenes, s.coco_raw_size, s.coco_size)}
    # GPU: the production configs' sizes; lc_unet_3 reads 32 records a batch, sd2_lora 4 (`prepare celebamask`
    # scales a tiny set's test split down: 58/6 and 15/1 train/test records; the scenes give 15/3)
    if not cpu:
        sets |= {"faces256": Dataset("faces", 64, 256, 256, test_size=8),
                 "faces512": Dataset("faces", 16, 512, 512, test_size=4),
                 "coco512": Dataset("coco", s.coco_scenes, s.coco_raw_size, 512)}
    return sets


@dataclass(frozen=True)
class Family:
    tiny: str  # config trained by the family's training row
    data: str  # its dataset
    trained_by: str  # the row that trains it
    production: str  # the production config of the GPU dry run
    production_data: str
    batch: int = 8
    overrides: tuple[str, ...] = ()


FAMILIES = {
    "unet": Family("tiny_unet", "faces", "resume", "unet_r3", "faces256"),
    "lc_unet": Family("tiny_lc_unet", "faces", "sample", "lc_unet_3", "faces256"),
    "dit": Family("tiny_dit", "faces", "dit", "dit_small_27k", "faces256"),
    "sd_lora": Family("tiny_sd_lora", "faces", "sd_lora", "sd2_lora", "faces512"),
    # T = 1000: every sample is below the threshold, so every step runs the masked LPIPS and face terms
    "controlnet": Family("tiny_controlnet", "coco", "controlnet", "mask_ldm_t100", "coco512", batch=4,
                         overrides=("loss.perceptual_timestep_threshold=1000",)),
}
# the rows in the order they run: when --budget-s is spent, the rest are SKIP
ROWS = ["data", "resume", "sample", "controlnet", "sd_lora", "dit",
        *(f"dry-{family}" for family in ("unet", "dit", "lc_unet", "sd_lora", "controlnet")), "speed"]


def select(only: str) -> list[str]:
    """`--only`: row names, comma-separated (`all`; `dry` = every dry-run row); the data row always runs."""
    asked = {name.strip() for name in only.split(",") if name.strip()}
    if "all" in asked:
        asked = (asked - {"all"}) | set(ROWS)
    if "dry" in asked:
        asked = (asked - {"dry"}) | {row for row in ROWS if row.startswith("dry-")}
    unknown = asked - set(ROWS)
    if unknown:
        raise ValueError(f"--only: unknown rows {sorted(unknown)}; known: {', '.join(ROWS)} (or dry)")
    return [row for row in ROWS if row == "data" or row in asked]


def common(cpu: bool, name: str, work: Path, data: Path) -> list[str]:
    """The overrides of every `facediff train` row: one worker on the mode's device, bf16, the run's folder.
    On a CPU the workers' resources are replaced whole (`:=`), since the production configs ask for a GPU."""
    device = ["trainer.use_gpu=false", "trainer.resources_per_worker:={CPU: 0.5}"] if cpu else ["trainer.use_gpu=true"]
    return [*device, f"trainer.precision={PRECISION}", "trainer.num_workers=1", f"trainer.run_name={name}",
            f"trainer.storage_path={work / 'runs'}", f"data.path={data}"]


def config_path(name: str) -> Path:
    return next(EXPERIMENTS.glob(f"*/{name}.yaml"))  # tiny/, celebamask/ or mask_aware/
