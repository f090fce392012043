"""`make gpu-check`'s plan without running it (the whole CPU mode takes many minutes): every model family has a
bf16 training row and a production dry-run row, the CPU mode's overrides load, `--only` and the budget behave,
and the dry run's printed table parses."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))  # the check's modules: tools.gpu_check.*

from tools.gpu_check import plan, steps  # noqa: E402
from tools.gpu_check.families import dry_run_config, parse_table  # noqa: E402
from tools.gpu_check.run import parse_args  # noqa: E402

from facediff.config import load_config  # noqa: E402
from facediff.config.models import MODEL_FAMILIES  # noqa: E402


def test_every_family_trains_in_bf16_and_dry_runs_one_production_config():
    assert set(plan.FAMILIES) == set(MODEL_FAMILIES)
    assert plan.PRECISION == "bf16"
    work, data = Path("/tmp/work"), Path("/tmp/data")
    for family, spec in plan.FAMILIES.items():
        assert spec.trained_by in plan.ROWS and f"dry-{family}" in plan.ROWS
        for cpu in (False, True):
            # the overrides the training row gives its tiny config load, and train this family in bf16
            cfg = load_config(plan.config_path(spec.tiny), [*plan.common(cpu, "run", work, data), *spec.overrides])
            assert (cfg.model.family, cfg.trainer.precision, cfg.trainer.use_gpu) == (family, "bf16", not cpu)
            config, dataset, overrides = dry_run_config(spec, cpu)
            assert dataset in plan.datasets(plan.CPU_SIZES if cpu else plan.Sizes(), cpu)
            cfg = load_config(plan.config_path(config), [f"data.path={data}", *overrides])
            assert (cfg.model.family, cfg.trainer.precision) == (family, "bf16")
        # on a GPU the production config runs as shipped: its precision is its own
        assert dry_run_config(spec, False) == (spec.production, spec.production_data, [])
    controlnet = load_config(plan.config_path("tiny_controlnet"), list(plan.FAMILIES["controlnet"].overrides))
    assert controlnet.loss.perceptual_timestep_threshold == 1000  # every sample gets the perceptual terms


def test_cpu_mode_replaces_a_production_configs_gpu_request():
    cfg = load_config(plan.config_path("unet_r3"), plan.common(True, "run", Path("/tmp/w"), Path("/tmp/d")))
    assert cfg.trainer.resources_per_worker == {"CPU": 0.5} and not cfg.trainer.use_gpu


def test_only_selects_rows_in_order_and_refuses_unknown_ones(capsys):
    assert parse_args([]).rows == plan.ROWS
    assert parse_args(["--only", "dry,speed"]).rows == ["data", *[r for r in plan.ROWS if r.startswith("dry-")],
                                                         "speed"]
    assert parse_args(["--cpu"]).budget_s == plan.CPU_BUDGET_S and parse_args([]).budget_s == plan.GPU_BUDGET_S
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--only", "resume,dry-unt"])
    assert exit_.value.code == 2 and "dry-unt" in capsys.readouterr().err


def test_dry_run_table_parses():
    from facediff.train.dry_run import STAGES, DryRunReport, format_table

    report = DryRunReport("unet_r3", "cuda:0", "bf16", 8, 0, trainable=288_906_627, steps=2, step_seconds=0.25,
                          peak_bytes=3 * 2**30, per_gpu_bytes=5 * 2**30, total_steps=7813, projected_seconds=1953,
                          stages={stage: "ok" for stage in STAGES})
    table = parse_table(["dry run: export ok", *format_table([report]).splitlines()])
    assert table["config"] == "unet_r3" and table["trainable"] == "288,906,627" and table["stages"] == "7/7 ok"
    assert table["per-GPU est."] == "5.0 GiB (8x, ZeRO 0, bf16)" and table["s/step"] == "0.25"
    assert parse_table(["error: dry run failed at stage 'step'"]) is None


def test_budget_skips_a_step_it_cuts_off_and_fails_one_over_its_own_timeout(tmp_path, monkeypatch):
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    spent = steps.Runner(tmp_path, time.monotonic() - 1)
    row = steps.Row("late")
    assert spent.run(row, "train", sleep, 60) is None and row.status == "SKIP" and row.seconds == 0
    monkeypatch.setattr(steps, "MIN_STEP_S", 0)
    row = steps.Row("cut")
    assert steps.Runner(tmp_path, time.monotonic() + 0.5).run(row, "train", sleep, 60) is None
    assert row.status == "SKIP" and "budget" in row.details[0]
    row = steps.Row("hung")
    assert steps.Runner(tmp_path, time.monotonic() + 600).run(row, "train", sleep, 0.5) is None
    assert row.status == "FAIL" and "timed out" in row.details[0]
    row = steps.Row("ok")
    assert steps.Runner(tmp_path, time.monotonic() + 600).run(row, "step", [sys.executable, "-c", "print(42)"], 60) == 0
    assert row.passed and steps.last_output(row, "step").splitlines()[1] == "42"


def test_gpu_check_sh_without_a_gpu_says_so_in_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    env = {**os.environ, "GPU_CHECK_PYTHON": sys.executable}  # this environment's Python: it has the stack
    done = subprocess.run(["bash", str(REPO / "tools/gpu_check/gpu_check.sh")], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 2 and "GPU_CHECK_ARGS=--cpu" in done.stdout
