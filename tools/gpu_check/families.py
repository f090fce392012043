"""The rows of each model family: a short `facediff train` of its tiny config (controlnet, sd_lora, dit; the UNet
and lc_unet families train in the resume and sample rows), and `facediff train --dry-run --random-weights` of
one production config at its real size (on a CPU: of the tiny config, see plan.py)."""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

from tools.gpu_check.plan import FAMILIES, PRECISION, Family, Sizes, common, config_path
from tools.gpu_check.steps import FACEDIFF, Row, Runner, last_output, read_rows

DRY_RUN_TIMEOUT_S = {True: 240.0, False: 300.0}  # by cpu: tiny configs on a CPU, production ones on a GPU
EMA_FILE = "ema.safetensors"


def row_family(row: Row, r: Runner, s: Sizes, cpu: bool, work: Path, data: Path, family: str) -> Row:
    """The family's tiny config in bf16 under ZeRO-2 for `s.family_steps` steps, a checkpoint every half: every
    loss finite, the last step's checkpoint with its EMA, an export (ControlNet: the perceptual terms ran)."""
    spec = FAMILIES[family]
    name = f"{spec.tiny}_{os.getpid()}_{int(time.time())}"
    run_dir = work / "runs" / name
    kimg = s.family_steps * spec.batch / 1000
    cmd = [*FACEDIFF, "train", str(config_path(spec.tiny)), *common(cpu, name, work, data), "trainer.zero_stage=2",
           f"trainer.batch_size={spec.batch}", f"trainer.total_kimg={kimg}", f"trainer.checkpoint_every_kimg={kimg / 2}",
           "trainer.log_every_steps=1", "eval.every_kimg=null", *spec.overrides]
    if r.run(row, "train", cmd, s.step_timeout_s) != 0:
        return row
    trained = [m for m in read_rows(run_dir) if "loss" in m]
    if not trained:
        row.fail(f"no loss rows in {run_dir / 'metrics.jsonl'}")
        return row
    last = trained[-1]
    losses = {k: v for k, v in last.items() if k.startswith("loss")}
    row.details.append(f"{PRECISION}, ZeRO-2, steps {trained[0]['step']}..{last['step']}: "
                       + ", ".join(f"{k} {v:.4g}" for k, v in losses.items()))
    bad = [f"{k}={m[k]} at step {m['step']}" for m in trained for k in m if k.startswith("loss")
           and not math.isfinite(m[k])]
    if bad:
        row.fail(f"losses not finite: {', '.join(bad[:3])}")
    if last["step"] != s.family_steps:
        row.fail(f"last step {last['step']}, {s.family_steps} expected")
    if family == "controlnet":
        _check_perceptual(row, trained)
    checkpoint = run_dir / f"checkpoint_{s.family_steps:09d}"
    if not (checkpoint / EMA_FILE).is_file():
        row.fail(f"no {checkpoint / EMA_FILE}")
    else:
        kept = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
        row.details.append(f"checkpoints {', '.join(k.removeprefix('checkpoint_').lstrip('0') for k in kept)}")
    if not (run_dir / "export").is_dir():
        row.fail("no export/")
    return row


def _check_perceptual(row: Row, trained: list[dict]) -> None:
    """With the threshold at T every sample is below it: every step must have run the masked LPIPS term."""
    below = [m.get("below_threshold") for m in trained]
    lpips = [m.get("loss_lpips", 0.0) for m in trained]
    row.details.append(f"below_threshold {below}")
    if any(b != 1.0 for b in below) or not all(v > 0 for v in lpips):
        row.fail(f"the perceptual terms did not run at every step (below_threshold {below}, loss_lpips {lpips})")


def dry_run_config(spec: Family, cpu: bool) -> tuple[str, str, list[str]]:
    """(config, dataset, overrides) of a family's dry run: the production config unchanged but for its data on a
    GPU; the tiny config in the production configs' precision on a CPU."""
    if cpu:
        return spec.tiny, spec.data, [f"trainer.precision={PRECISION}"]
    return spec.production, spec.production_data, []


def row_dry_run(row: Row, r: Runner, cpu: bool, data_for, family: str) -> Row:
    """`facediff train CONFIG --dry-run --random-weights`: exit 0 and the table's row with every stage ok."""
    config, dataset, overrides = dry_run_config(FAMILIES[family], cpu)
    data = data_for(dataset, row)
    if data is None:
        return row
    label = f"dry run {config}"
    rc = r.run(row, label, [*FACEDIFF, "train", str(config_path(config)), f"data.path={data}", *overrides,
                            "--dry-run", "--random-weights"], DRY_RUN_TIMEOUT_S[cpu])
    lines = [line for line in last_output(row, label).splitlines() if line.strip() and not line.startswith("=====")]
    table = parse_table(lines)
    if table is None:
        if rc == 0:
            row.fail("printed no table row")
        return row
    row.details.insert(0, f"{config}: trainable {table['trainable']}, frozen {table['frozen']}, "
                          f"{table['s/step']} s/step, peak {table['peak mem']}, per-GPU est. {table['per-GPU est.']}, "
                          f"projected {table['projected']} on {table['device']}")
    if table["config"] != config or table["stages"] != "7/7 ok":
        row.fail(f"stages {table['stages']}")
    return row


def parse_table(lines: list[str]) -> dict[str, str] | None:
    """The dry run's last two lines (its table's header and row; columns apart by 2+ spaces) as a dict."""
    if len(lines) < 2 or not lines[-2].startswith("config"):
        return None
    header, values = (re.split(r"\s{2,}", line.strip()) for line in lines[-2:])
    return dict(zip(header, values)) if len(header) == len(values) else None
