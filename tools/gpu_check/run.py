"""`make gpu-check`: facediff's GPU paths end to end on one CUDA GPU, every model family in bf16, in one table.

    python tools/gpu_check/run.py [--cpu] [--out DIR] [--work DIR] [--budget-s S] [--only ROWS] [--keep]

Rows, in this order (each PASS/FAIL/SKIP, wall seconds, key numbers; a failing row does not stop the others):
  data        `facediff prepare synthetic` + `prepare celebamask` (256 faces, 128 px) and `prepare synthetic-coco`
              + `prepare coco` (24 people scenes, 64 px)
  resume      UNet: tiny_unet, ZeRO-2, evaluation + checkpoints; the same command with a larger total_kimg must
              resume: its first metrics.jsonl row's step > the first run's last step
  sample      lc_unet: tiny_lc_unet under ZeRO-3; `facediff sample RUN/export --attributes Smiling,Eyeglasses`
              writes a PNG that is not constant
  controlnet  tiny_controlnet, 4 steps with the perceptual threshold at T (masked LPIPS + face terms every step)
  sd_lora     tiny_sd_lora, 4 steps
  dit         tiny_dit, 4 steps
              (these three under ZeRO-2: every loss finite, checkpoints at steps 2 and 4 with the EMA, an export)
  dry-unet, dry-dit, dry-lc_unet, dry-sd_lora, dry-controlnet
              `facediff train CONFIG data.path=... --dry-run --random-weights` of unet_r3, dit_small_27k,
              lc_unet_3, sd2_lora, mask_ldm_t100 unchanged at their real size (data made at their image size):
              exit 0, every stage ok; the table's parameters, s/step, peak memory, per-GPU estimate, projection
  speed       benchmarks/gpu_train.py (UNet r3, 128 px, bf16 as the trainer: images/s, MFU) and a short
              `facediff train unet_r3` run at the same per-worker batch: trainer images/s / benchmark images/s

Every training row runs in bf16 with one worker. `--cpu` runs the same rows with use_gpu=false and the workers'
resources replaced by {CPU: 0.5} (`:=`), tiny sizes, the dry-run rows on each family's tiny config (a production
dry run takes 0.5 to 6 minutes on 2 cores: docs/dry-run.md) and the benchmark SKIP, to test this check without a
GPU. No step starts after --budget-s (GPU 420 s, CPU 2400 s): rows left are SKIP, as is a step the budget cuts
off. Logs (one per row, every step's full stdout/stderr) and `table.md` go to `--out` ($OUT if set, else
outputs/gpu-check/); data and runs to `--work` (a temporary folder when $OUT is set, since runs hold gigabytes of
checkpoints; else OUT/work). Exit status: 0 every row passed or was skipped, 1 a row failed, 2 bad arguments or
no CUDA GPU (without --cpu).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: the check's own modules are tools.gpu_check.*
    sys.path.insert(0, str(ROOT))

from tools.gpu_check.data import Datasets, row_data  # noqa: E402
from tools.gpu_check.families import row_dry_run, row_family  # noqa: E402
from tools.gpu_check.plan import CPU_BUDGET_S, CPU_SIZES, GPU_BUDGET_S, Sizes, select  # noqa: E402
from tools.gpu_check.rows import row_resume, row_sample, row_speed  # noqa: E402
from tools.gpu_check.steps import MIN_STEP_S, Row, Runner, guarded  # noqa: E402

CHILD_ENV = dict(PYTHONUNBUFFERED="1", FACEDIFF_ALLOW_DOWNLOAD="0", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
                 RAY_DATA_DISABLE_PROGRESS_BARS="1", NO_COLOR="1", TERM="dumb", COLUMNS="200")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="use_gpu=false, tiny sizes and configs; benchmark SKIP")
    env_out = os.environ.get("OUT")
    parser.add_argument("--out", type=Path, default=Path(env_out) if env_out else ROOT / "outputs" / "gpu-check")
    parser.add_argument("--work", type=Path, default=None, help="data and runs (default: see above)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"no step starts after this (GPU {GPU_BUDGET_S:.0f} s, CPU {CPU_BUDGET_S:.0f} s)")
    parser.add_argument("--keep", action="store_true", help="keep a temporary --work folder")
    parser.add_argument("--only", default="all", help="rows besides data, comma-separated ('dry': the dry runs)")
    args = parser.parse_args(argv)
    try:
        args.rows = select(args.only)
    except ValueError as err:
        parser.error(str(err))  # exit 2
    args.budget_s = args.budget_s or (CPU_BUDGET_S if args.cpu else GPU_BUDGET_S)
    return args


def checks(r: Runner, s: Sizes, cpu: bool, work: Path, out: Path, data: Datasets) -> dict:
    """Each row's name -> (the dataset it reads or None, its check taking (row, data path))."""
    table = {"data": (None, lambda row, _: row_data(row, data)),
             "resume": ("faces", lambda row, d: row_resume(row, r, s, cpu, work, d)),
             "sample": ("faces", lambda row, d: row_sample(row, r, s, cpu, work, d, out)),
             "speed": ("faces", lambda row, d: row_speed(row, r, s, cpu, work, d))}
    for family, dataset in (("controlnet", "coco"), ("sd_lora", "faces"), ("dit", "faces")):
        table[family] = (dataset, lambda row, d, f=family: row_family(row, r, s, cpu, work, d, f))
    for family in ("unet", "dit", "lc_unet", "sd_lora", "controlnet"):  # each prepares the data it reads
        table[f"dry-{family}"] = (None, lambda row, _, f=family: row_dry_run(row, r, cpu, data.get, f))
    return table


def run_row(name: str, r: Runner, data: Datasets, table: dict) -> Row:
    row = Row(name)
    if r.left() < MIN_STEP_S:
        row.skip("not run: the check's --budget-s is spent")
        return row
    dataset, check = table[name]
    path = None
    if dataset is not None:
        path = data.ready.get(dataset)
        if path is None:
            row.fail(f"not run: no {dataset} data (row data)")
            return row
    return guarded(row, lambda row: check(row, path))


def table_text(rows: list[Row], mode: str) -> str:
    lines = [f"gpu-check ({mode})", "", "| row | status | wall s | details |", "| --- | --- | ---: | --- |"]
    for row in rows:
        lines.append(f"| {row.name} | {row.status} | {row.seconds:.0f} | {'; '.join(row.details)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            print("gpu-check: no CUDA GPU here (torch.cuda.is_available() is False); --cpu runs the CPU mode")
            return 2
    sizes = CPU_SIZES if args.cpu else Sizes()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.log")) + [out / "table.md", out / "sample.png"]:
        old.unlink(missing_ok=True)
    temporary = args.work is None and os.environ.get("OUT") is not None
    work = (Path(tempfile.mkdtemp(prefix="gpu-check-")) if temporary else (args.work or out / "work")).resolve()
    if not temporary and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)

    # the children: unbuffered, offline (FID Inception download not tried: the fallback distance is reported),
    # and the repo importable (the device has no install of facediff)
    os.environ.update(CHILD_ENV)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(ROOT) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([*paths, str(ROOT)])

    start = time.monotonic()
    r = Runner(out, start + args.budget_s)
    data = Datasets(r, sizes, args.cpu, work)
    table = checks(r, sizes, args.cpu, work, out, data)
    rows = []
    for name in args.rows:
        rows.append(run_row(name, r, data, table))
        print(f"gpu-check: {name} {rows[-1].status} ({rows[-1].seconds:.0f} s)", flush=True)

    mode = f"{'CPU' if args.cpu else 'GPU'} mode, {time.monotonic() - start:.0f} s in all, budget {args.budget_s:.0f} s"
    text = table_text(rows, mode)
    (out / "table.md").write_text(text)
    print(text)
    failed = [row for row in rows if row.status == "FAIL"]
    for row in failed:
        print(f"log of failed row {row.name}: {row.log or 'none'}")
    if temporary and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
