"""`make gpu-check`: the GPU paths of facediff end to end on one CUDA GPU, in one table.

    python tools/gpu_check/run.py [--cpu] [--out DIR] [--work DIR] [--budget-s S] [--keep]

Rows (each PASS/FAIL/SKIP, wall seconds, key numbers; a failing row does not stop the others):
  data    `facediff prepare synthetic` (256 faces, 128 px) + `prepare celebamask` (128 px shards)
  resume  tiny_unet, 1 GPU worker, bf16, ZeRO-2, evaluation + checkpoints; the same command with a larger
          total_kimg must resume: its first metrics.jsonl row's step > the first run's last step
  sample  tiny_lc_unet, 1 GPU worker, bf16, ZeRO-3; `facediff sample RUN/export --attributes Smiling,Eyeglasses`
          writes a PNG that is not constant
  speed   benchmarks/gpu_train.py (UNet r3, 128 px, bf16 as the trainer: images/s, MFU) and a short
          `facediff train unet_r3` run at the same per-worker batch: trainer images/s / benchmark images/s, each
          with the precision it ran in

`--cpu` runs the same steps with use_gpu=false, fp32 and tiny sizes (the benchmark, CUDA only, is SKIP), to
test this script without a GPU. Logs (one per row, every step's full stdout/stderr) and `table.md` go to
`--out` ($OUT if set, else outputs/gpu-check/); data and runs to `--work` (a temporary folder when $OUT is set,
since runs hold gigabytes of checkpoints; else OUT/work). Exit status: 0 all rows passed or skipped, 1 a row
failed, 2 no CUDA GPU (without --cpu).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# `python -m facediff.cli` would only define the app (cli.py has main() but no __main__ guard)
FACEDIFF = [sys.executable, "-c", "from facediff.cli import main; main()"]


@dataclass
class Sizes:
    """What each mode runs; GPU sizes keep the whole check well under 5 minutes on one H200."""

    faces: int = 256
    face_size: int = 128
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
    # row speed (unet_r3 at 128 px)
    bench_batch: int = 64
    bench_steps: int = 20
    speed_kimg: float = 0.768  # 12 steps of 64 images
    speed_log_every: int = 2
    speed_skip_rows: int = 2  # warm-up: data pipeline start, cuDNN autotuning
    step_timeout_s: float = 300.0


CPU_SIZES = Sizes(
    faces=128, face_size=64,
    kimg_first=0.16, kimg_second=0.24, ckpt_kimg=0.08, eval_kimg=0.08, eval_samples=8, eval_steps=4,
    lc_kimg=0.08, sample_steps=4,
    bench_batch=4, speed_kimg=0.048, speed_log_every=2, speed_skip_rows=2,
)
# the CPU stand-in for UNet r3: its config file, the model made tiny (6 levels, 32 px)
CPU_SPEED_MODEL = [
    "model.sample_size=32", "data.image_size=32", "model.layers_per_block=1", "model.norm_num_groups=8",
    "model.block_out_channels=[8,16,16,16,16,16]",
]


@dataclass
class Row:
    name: str
    status: str = "PASS"
    seconds: float = 0.0
    details: list[str] = field(default_factory=list)
    log: Path | None = None

    def fail(self, why: str) -> None:
        self.status = "FAIL"
        self.details.append(why)


class Runner:
    def __init__(self, logs: Path, deadline: float):
        self.logs, self.deadline = logs, deadline

    def run(self, row: Row, label: str, cmd: list[str], timeout_s: float, cwd: Path = ROOT) -> int | None:
        """Run one step, appending its full output to the row's log; None when it timed out or could not start."""
        row.log = row.log or self.logs / f"{row.name}.log"
        left = self.deadline - time.monotonic()
        if left < 15:
            row.fail(f"{label}: not run (check's time budget spent)")
            return None
        timeout_s = min(timeout_s, left)
        start = time.monotonic()
        with row.log.open("a") as log:
            log.write(f"\n===== {label}: {' '.join(cmd)}\n")
            log.flush()
            try:
                proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)  # its own group: a timeout ends Ray's helpers too
            except OSError as err:
                log.write(f"could not start: {err}\n")
                row.fail(f"{label}: could not start ({err})")
                return None
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _end_group(proc)
                rc = None
            seconds = time.monotonic() - start
            log.write(f"===== {label}: {'timed out after' if rc is None else f'exit {rc},'} {seconds:.1f} s\n")
        row.seconds += seconds
        if rc is None:
            row.fail(f"{label}: timed out after {seconds:.0f} s")
        elif rc != 0:
            row.fail(f"{label}: exit {rc}")
        return rc

    def output(self, cmd: list[str], timeout_s: float = 120) -> str:
        try:
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s).stdout
        except (subprocess.TimeoutExpired, OSError):
            return ""


def _end_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def precision(cpu: bool) -> str:  # of every training row, and of the benchmark step the speed row compares with
    return "fp32" if cpu else "bf16"


def common(cpu: bool, name: str, work: Path, data: Path) -> list[str]:
    gpu = [f"trainer.use_gpu={str(not cpu).lower()}", f"trainer.precision={precision(cpu)}"]
    return [*gpu, "trainer.num_workers=1", f"trainer.run_name={name}", f"trainer.storage_path={work / 'runs'}",
            f"data.path={data}"]


def row_data(r: Runner, s: Sizes, work: Path) -> tuple[Row, Path]:
    row = Row("data")
    raw, shards = work / "raw", work / "shards"
    if r.run(row, "prepare synthetic", [*FACEDIFF, "prepare", "synthetic", str(raw), "--n", str(s.faces), "--size",
                                        str(s.face_size)], 180) == 0:
        r.run(row, "prepare celebamask", [*FACEDIFF, "prepare", "celebamask", str(raw), str(shards), "--image-size",
                                          str(s.face_size), "--mask-size", str(s.face_size)], 180)
    manifest = shards / "manifest.json"
    if row.status == "PASS":
        if manifest.exists():
            counts = json.loads(manifest.read_text()).get("counts", {})
            row.details.append(f"{s.faces} faces at {s.face_size} px -> shards {counts}")
        else:
            row.fail(f"no {manifest}")
    return row, shards


def row_resume(row: Row, r: Runner, s: Sizes, cpu: bool, work: Path, data: Path) -> Row:
    name = f"tiny_unet_resume_{os.getpid()}_{int(time.time())}"
    config = str(ROOT / "configs/experiments/tiny_unet.yaml")
    base = [*common(cpu, name, work, data), "trainer.zero_stage=2", f"trainer.checkpoint_every_kimg={s.ckpt_kimg}",
            f"eval.every_kimg={s.eval_kimg}", f"eval.num_samples={s.eval_samples}", f"eval.steps={s.eval_steps}"]
    run_dir = work / "runs" / name
    if r.run(row, "train", [*FACEDIFF, "train", config, *base, f"trainer.total_kimg={s.kimg_first}"],
             s.step_timeout_s) != 0:
        return row
    first = read_rows(run_dir)
    if not first:
        row.fail(f"first run wrote no {run_dir / 'metrics.jsonl'}")
        return row
    last_first = max(m["step"] for m in first)
    distance = [k for k in first[-1] if k.startswith(("fd_", "fid"))]
    started = time.time()
    if r.run(row, "train again (resume)", [*FACEDIFF, "train", config, *base, f"trainer.total_kimg={s.kimg_second}"],
             s.step_timeout_s) != 0:
        row.details.insert(0, f"run 1: steps ..{last_first}")
        return row
    second = [m for m in read_rows(run_dir) if m.get("time", 0) >= started]
    if not second:
        row.fail("second run wrote no metrics.jsonl rows")
        return row
    first_second, last_second = min(m["step"] for m in second), max(m["step"] for m in second)
    row.details.append(f"run 1 steps ..{last_first}, run 2 steps {first_second}..{last_second}")
    if first_second <= last_first:
        row.fail(f"did not resume: run 2's first step {first_second} <= run 1's last {last_first}")
    if distance:
        row.details.append(f"{distance[0]} {first[-1][distance[0]]:.4g} -> {second[-1].get(distance[0], float('nan')):.4g}")
    else:
        row.fail("no image distance (fd_*/fid) in run 1's last row: evaluation did not run")
    checkpoints = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    row.details.append(f"{len(checkpoints)} checkpoints kept, last {checkpoints[-1] if checkpoints else None}")
    if not (run_dir / "export").is_dir():
        row.fail("no export/")
    return row


def row_sample(row: Row, r: Runner, s: Sizes, cpu: bool, work: Path, data: Path, out: Path) -> Row:
    name = f"tiny_lc_unet_{os.getpid()}_{int(time.time())}"
    run_dir = work / "runs" / name
    if r.run(row, "train", [*FACEDIFF, "train", str(ROOT / "configs/experiments/tiny_lc_unet.yaml"),
                            *common(cpu, name, work, data), "trainer.zero_stage=3", f"trainer.total_kimg={s.lc_kimg}"],
             s.step_timeout_s) != 0:
        return row
    rows = read_rows(run_dir)
    if rows:
        row.details.append(f"steps ..{rows[-1]['step']}, loss {rows[-1].get('loss', float('nan')):.4g}")
    help_text = r.output([*FACEDIFF, "sample", "--help"])
    device = []
    if "--device" in help_text:
        device = ["--device", "cpu" if cpu else "cuda"]
    png = work / "sample.png"
    if r.run(row, "sample", [*FACEDIFF, "sample", str(run_dir / "export"), "--attributes", "Smiling,Eyeglasses",
                             "--n", "4", "--steps", str(s.sample_steps), "--out", str(png), *device], 180) != 0:
        return row
    row.details.append(f"--device {device[1]}" if device else "no --device option")
    if not png.exists():
        row.fail(f"no {png}")
        return row
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32)
    row.details.append(f"{png.name} {pixels.shape[1]}x{pixels.shape[0]}, pixel std {pixels.std():.1f}")
    if pixels.std() < 1.0:
        row.fail("the PNG is constant")
    shutil.copy(png, out / "sample.png")
    return row


def row_speed(row: Row, r: Runner, s: Sizes, cpu: bool, work: Path, data: Path) -> Row:
    import yaml

    bench = None
    if cpu:
        row.status = "SKIP"
        row.details.append("benchmark skipped (needs CUDA)")
    else:
        # in the trainer's precision: the ratio then compares the same step with and without Ray and DeepSpeed
        bench_cmd = [sys.executable, str(ROOT / "benchmarks/gpu_train.py"), "--model", "unet_r3", "--only-configured",
                     "--batch", str(s.bench_batch), "--steps", str(s.bench_steps), "--precision", precision(cpu)]
        r.run(row, "benchmarks/gpu_train.py", bench_cmd, 240)
        text = row.log.read_text() if row.log and row.log.exists() else ""
        ips = re.search(r"as configured\s+(.+?)\s+([\d.]+) images/s", text)
        mfu = re.search(r"MFU ([\d.]+)%", text)
        if ips:
            bench = float(ips.group(2))
            row.details.append(f"benchmark {bench:.1f} img/s ({ips.group(1)}), MFU {mfu.group(1) if mfu else '?'}%")
        elif row.status == "PASS":
            row.fail("benchmark printed no images/s")
    name = f"unet_r3_speed_{os.getpid()}_{int(time.time())}"
    config = ROOT / "configs/experiments/unet_r3.yaml"
    extra = [f"trainer.batch_size={s.bench_batch}", f"trainer.total_kimg={s.speed_kimg}",
             f"trainer.log_every_steps={s.speed_log_every}", "trainer.checkpoint_every_kimg=1000",
             "eval.every_kimg=null",  # no evaluation (its base evaluates 2000 samples at the end)
             "data.train_records=null"]  # the synthetic faces, not the paper's 2.7k
    if cpu:
        config, extra = cpu_config(config, work), [*extra, *CPU_SPEED_MODEL]
    else:
        extra.append("data.image_size=128")
    rc = r.run(row, "train unet_r3", [*FACEDIFF, "train", str(config), *common(cpu, name, work, data), *extra],
               s.step_timeout_s)
    if rc != 0:
        return row
    rows = read_rows(work / "runs" / name)
    timed = [m["images_per_s"] for m in rows[s.speed_skip_rows:] if "images_per_s" in m]
    if not timed:
        row.fail(f"{len(rows)} metrics rows: none after the first {s.speed_skip_rows}")
        return row
    trainer = sum(timed) / len(timed)
    ran = yaml.safe_load((work / "runs" / name / "config.yaml").read_text())["trainer"]["precision"]  # as saved
    row.details.append(f"trainer {trainer:.1f} img/s (DeepSpeed {ran}, batch {s.bench_batch}, "
                       f"mean of rows {s.speed_skip_rows + 1}..{len(rows)})")
    if bench:
        row.details.append(f"ratio {trainer / bench:.2f}")
    return row


def cpu_config(config: Path, work: Path) -> Path:
    """unet_r3.yaml as one file whose workers ask for CPU only: overrides merge into resources_per_worker, so
    they cannot drop the GPU that the base asks for (and Ray refuses GPU resources with use_gpu=false)."""
    import yaml

    from facediff.config.load import load_raw

    raw = load_raw(config)
    raw["trainer"]["resources_per_worker"] = {"CPU": 0.5}
    path = work / "cpu-configs" / config.name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"name": config.stem, **raw}, sort_keys=False))
    return path


def table(rows: list[Row], mode: str) -> str:
    lines = [f"gpu-check ({mode})", "", "| row | status | wall s | details |", "| --- | --- | ---: | --- |"]
    for row in rows:
        lines.append(f"| {row.name} | {row.status} | {row.seconds:.0f} | {'; '.join(row.details)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="use_gpu=false, fp32, tiny sizes; benchmark SKIP")
    env_out = os.environ.get("OUT")
    parser.add_argument("--out", type=Path, default=Path(env_out) if env_out else ROOT / "outputs" / "gpu-check")
    parser.add_argument("--work", type=Path, default=None, help="data and runs (default: see above)")
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting steps after this (GPU 480 s)")
    parser.add_argument("--keep", action="store_true", help="keep a temporary --work folder")
    parser.add_argument("--only", default="resume,sample,speed", help="rows to run besides data, comma-separated")
    args = parser.parse_args()

    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            print("gpu-check: no CUDA GPU here (torch.cuda.is_available() is False); --cpu runs the CPU mode")
            return 2
    sizes = CPU_SIZES if args.cpu else Sizes()
    budget = args.budget_s or (1500.0 if args.cpu else 480.0)
    out = args.out.resolve()
    logs = out
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.log")) + [out / "table.md", out / "sample.png"]:
        old.unlink(missing_ok=True)
    temporary = args.work is None and env_out is not None
    work = (Path(tempfile.mkdtemp(prefix="gpu-check-")) if temporary else (args.work or out / "work")).resolve()
    if not temporary and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)

    # the children: unbuffered, offline (FID Inception download not tried: the fallback distance is reported),
    # and the repo importable (the device has no install of facediff)
    os.environ.update(PYTHONUNBUFFERED="1", FACEDIFF_ALLOW_DOWNLOAD="0", HF_HUB_OFFLINE="1",
                      RAY_USAGE_STATS_ENABLED="0", RAY_DATA_DISABLE_PROGRESS_BARS="1", NO_COLOR="1",
                      TERM="dumb", COLUMNS="200")
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(ROOT) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([*paths, str(ROOT)])
    sys.path.insert(0, str(ROOT))

    r = Runner(logs, time.monotonic() + budget)
    start = time.monotonic()
    data_row, shards = row_data(r, sizes, work)
    rows = [data_row]
    have_data = data_row.status == "PASS"
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    checks = {"resume": lambda row: row_resume(row, r, sizes, args.cpu, work, shards),
              "sample": lambda row: row_sample(row, r, sizes, args.cpu, work, shards, out),
              "speed": lambda row: row_speed(row, r, sizes, args.cpu, work, shards)}
    if only - set(checks):
        parser.error(f"--only: unknown rows {sorted(only - set(checks))}; known: {list(checks)}")
    for name, build in checks.items():
        if name not in only:
            continue
        if have_data or name == "speed":  # the benchmark needs no data
            rows.append(_guarded(Row(name), build))
        else:
            rows.append(Row(name, "FAIL", details=["not run: no data"]))

    text = table(rows, f"{'CPU' if args.cpu else 'GPU'} mode, {time.monotonic() - start:.0f} s in all")
    (out / "table.md").write_text(text)
    print(text)
    failed = [row for row in rows if row.status == "FAIL"]
    for row in failed:
        print(f"log of failed row {row.name}: {row.log or 'none'}")
    if temporary and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def _guarded(row: Row, build) -> Row:
    """A row whose checking code itself broke is a FAIL row, not the end of the check."""
    try:
        return build(row)
    except Exception as err:  # noqa: BLE001
        row.fail(f"check raised {type(err).__name__}: {err}")
        return row


if __name__ == "__main__":
    sys.exit(main())
