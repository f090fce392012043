"""The rows of the UNet family's resume, the latent conditional model under ZeRO-3 with `facediff sample`, and
the speed of the trainer beside the bare benchmark step."""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

from tools.gpu_check.plan import CPU_SPEED_MODEL, PRECISION, Sizes, common, config_path
from tools.gpu_check.steps import FACEDIFF, ROOT, Row, Runner, read_rows


def row_resume(row: Row, r: Runner, s: Sizes, cpu: bool, work: Path, data: Path) -> Row:
    """tiny_unet, ZeRO-2, evaluation + checkpoints; the same command with a larger total_kimg must resume."""
    name = f"tiny_unet_resume_{os.getpid()}_{int(time.time())}"
    config = str(config_path("tiny_unet"))
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
    """tiny_lc_unet under ZeRO-3; `facediff sample` of its export writes a PNG that is not constant."""
    name = f"tiny_lc_unet_{os.getpid()}_{int(time.time())}"
    run_dir = work / "runs" / name
    if r.run(row, "train", [*FACEDIFF, "train", str(config_path("tiny_lc_unet")), *common(cpu, name, work, data),
                            "trainer.zero_stage=3", f"trainer.total_kimg={s.lc_kimg}"], s.step_timeout_s) != 0:
        return row
    rows = read_rows(run_dir)
    if rows:
        row.details.append(f"ZeRO-3, steps ..{rows[-1]['step']}, loss {rows[-1].get('loss', float('nan')):.4g}")
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
    """benchmarks/gpu_train.py's bare step beside a short `facediff train unet_r3` at the same batch."""
    import yaml

    bench = None
    if cpu:
        row.skip("benchmark skipped (needs CUDA)")
    else:
        # in the trainer's precision: the ratio then compares the same step with and without Ray and DeepSpeed
        bench_cmd = [sys.executable, str(ROOT / "benchmarks/gpu_train.py"), "--model", "unet_r3", "--only-configured",
                     "--batch", str(s.bench_batch), "--steps", str(s.bench_steps), "--precision", PRECISION]
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
    extra = [f"trainer.batch_size={s.bench_batch}", f"trainer.total_kimg={s.speed_kimg}",
             f"trainer.log_every_steps={s.speed_log_every}", "trainer.checkpoint_every_kimg=1000",
             "eval.every_kimg=null",  # no evaluation
             "data.train_records=null"]  # the synthetic faces, not the paper's 2.7k
    extra += CPU_SPEED_MODEL if cpu else ["data.image_size=128"]
    rc = r.run(row, "train unet_r3", [*FACEDIFF, "train", str(config_path("unet_r3")), *common(cpu, name, work, data),
                                      *extra], s.step_timeout_s)
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
