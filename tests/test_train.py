"""Ray Train + DeepSpeed end to end on CPU: resume after a crash, FailureConfig restarts, ZeRO-3 EMA, export."""

import json
import math
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import ray.exceptions
import torch
from diffusers import DDPMPipeline, DiTTransformer2DModel
from safetensors.torch import load_file

from conftest import REPO, report_recorder

from facediff.config import load_config
from facediff.tasks import build_task
from facediff.train.engine import lr_factor, safe_checkpoint_engine
from facediff.train.run_log import read_metrics
from facediff.storage import RunStorage
from facediff.train.identity import RunConfigChanged, read_history
from facediff.train.driver import resume_point
from facediff.train.run import train

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]
STEPS = 8  # 44 train rows, 2 workers x batch 4: 5 steps per epoch, so the run crosses an epoch boundary


def config(synthetic_shards, tmp_path, path="configs/experiments/tiny/tiny_unet.yaml", extra=()):
    return load_config(path, [
        f"data.path={synthetic_shards}", f"trainer.storage_path={tmp_path / 'runs'}", "trainer.run_name=run",
        "trainer.batch_size=4", f"trainer.total_kimg={STEPS * 8 / 1000}", "trainer.checkpoint_every_kimg=0.016",
        "trainer.log_every_steps=1", "trainer.keep_last=2", "trainer.zero_stage=2", "optimizer.warmup_steps=4", "optimizer.schedule=cosine",
        "trainer.ema.warmup=false", "trainer.ema.decay=0.9", "eval.sample_grid_steps=2", *extra,
    ])


def test_rerun_resumes_after_crash_and_exports(synthetic_shards, tmp_path, mlflow_server):
    # bf16 as the production configs (the EMA averages the fp32 masters); tracked to a real MLflow server
    extra = ["data.epochs_per_pass=1", "trainer.precision=bf16", "tracking.backend=mlflow",
             f"tracking.tracking_uri={mlflow_server}", "tracking.experiment=test_train"]
    first = config(synthetic_shards, tmp_path, extra=extra)
    fault = {"crash_at_step": 5, "marker": str(tmp_path / "crashed")}
    with pytest.raises(Exception, match="injected worker crash at step 5"):
        train(first, fault=fault)
    run = tmp_path / "runs" / "run"
    before = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in before] == [1, 2, 3, 4]  # last checkpoint: step 4

    # a re-run with another lr is refused before anything is written (it used to train on at the checkpoint's rate
    # and record the new one); with --resume-with-changes, a model the checkpoint does not fit fails while the
    # workers restore it, and the folder stays byte-identical too (config.yaml included: `sample` still reads it)
    cfg = config(synthetic_shards, tmp_path, extra=[*extra, "optimizer.lr=5e-5"])
    untouched = _files(run)
    with pytest.raises(RunConfigChanged, match=r"optimizer\.lr 0\.001 -> 5e-05"):
        train(cfg, fault=fault)
    other_shape = config(synthetic_shards, tmp_path, extra=[*extra, "model.block_out_channels=[16,32]",
                                                            "model.norm_num_groups=8"])
    with pytest.raises(Exception, match="size mismatch"):
        train(other_shape, resume_with_changes=True)
    assert _files(run) == untouched

    reports = tmp_path / "reports.jsonl"  # resumes from step 4 at the new lr, and records the change
    train(cfg, fault=fault, callbacks=[report_recorder(reports)], resume_with_changes=True)
    [change] = read_history(RunStorage(str(tmp_path / "runs"), "run"))
    assert change["resumed_at_step"] == 4 and change["changes"] == {"optimizer.lr": {"old": 1e-3, "new": 5e-5}}
    assert load_config(run / "config.yaml").optimizer.lr == 5e-5
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # a row is logged every step, but Ray gets a report only with a checkpoint (every 2 steps here): Train V2
    # takes one report per 2 s poll, and a report every step made every step wait for it
    reported = [json.loads(line)[0]["step"] for line in reports.read_text().splitlines()]
    assert reported == [6, 8]
    assert (run / "metrics.jsonl").read_text().splitlines()[:4] == before  # steps 1-4 were not re-run
    total = STEPS
    for r in rows:  # the schedule continues: no second warm-up after the resume, at the new rate from step 5
        rate = (first if r["step"] <= 4 else cfg).optimizer.lr
        assert r["lr"] == pytest.approx(rate * lr_factor(r["step"] - 1, 4, total, "cosine", 0.0))
    # `epoch`: the images trained over the 44-row split, not the newest row's data-epoch tag; kimg: whole steps
    assert [r["epoch"] for r in rows] == [round(r["step"] * 8 / 44, 3) for r in rows]
    assert rows[-1]["kimg"] == pytest.approx(STEPS * 8 / 1000)
    kept = sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir())  # keep_last=2
    assert kept == ["checkpoint_000000006", "checkpoint_000000008"]
    final = run / "checkpoint_000000008"
    assert json.loads((final / "trainer_state.json").read_text())["step"] == STEPS
    ema = load_file(str(final / "ema.safetensors"))
    assert int(ema["ema_step"]) == STEPS  # the EMA was restored, not restarted

    # the EMA weights moved away from the initial weights and differ from the raw trained weights
    torch.manual_seed(cfg.trainer.seed)
    initial = build_task(cfg).state_dict()
    raw = safe_checkpoint_engine(None).load(str(final / "state" / "mp_rank_00_model_states.pt"))["module"]
    moved = [k for k in initial if f"ema.{k}" in ema and not torch.allclose(ema[f"ema.{k}"], initial[k])]
    differs = [k for k in raw if f"ema.{k}" in ema and not torch.allclose(ema[f"ema.{k}"], raw[k].float())]
    assert len(moved) > 0.9 * len(initial) and len(differs) > 0.9 * len(initial)

    pipeline = DDPMPipeline.from_pretrained(run / "export")  # plain diffusers, no facediff
    images = pipeline(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 32, 32, 3)
    assert torch.allclose(pipeline.unet.conv_in.weight, ema["ema.net.conv_in.weight"])
    _assert_one_mlflow_run(mlflow_server, rows)


def _assert_one_mlflow_run(uri: str, rows: list[dict]) -> None:
    """The crashed attempt, the refused and failed re-runs and the resumed run are one MLflow run: every step's
    loss as metrics.jsonl has it, the first start's params, the export as artifacts, finished."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("test_train").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["model.family"] == "unet" and float(run.data.params["optimizer.lr"]) == 1e-3
    history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert "export/model_index.json" in [a.path for a in client.list_artifacts(run.info.run_id, "export")]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _worker_pids(run: Path, rank: int, world: int = 2) -> list[int]:
    """The pids rank `rank` of `world` ran as, one per worker start, from its own log."""
    log_file = run / "logs" / f"rank{rank}.log"
    text = log_file.read_text() if log_file.is_file() else ""
    return [int(pid) for pid in re.findall(rf"rank {rank} of {world}: .*, pid (\d+)", text)]


def _kill_worker_after(run: Path, rank: int, step: int, killed: dict) -> None:
    """From outside the run, as an OOM killer would: SIGKILL rank `rank`'s process (its pid from its own log)
    once the run has logged `step`."""
    give_up = time.monotonic() + 600  # bounded: the run thread's own assertions report a run that never got there
    while time.monotonic() < give_up:
        try:
            logged = read_metrics(run)
        except ValueError:  # a line being written
            logged = []
        pids = _worker_pids(run, rank)
        if pids and logged and logged[-1]["step"] >= step:
            killed.update(pid=pids[0], at=logged[-1]["step"])
            os.kill(pids[0], signal.SIGKILL)
            return
        time.sleep(0.1)


def test_worker_killed_by_sigkill_restarts_from_its_checkpoint(synthetic_shards, tmp_path):
    """FailureConfig restarts the worker group after a real process death (no exception, no cleanup), the new
    workers resume from the last checkpoint before the kill, and the run ends at the configured step."""
    steps = 12
    cfg = config(synthetic_shards, tmp_path, extra=["trainer.max_failures=1", f"trainer.total_kimg={steps * 8 / 1000}",
                                                    "trainer.log_every_steps=1"])
    run, killed = tmp_path / "runs" / "run", {}
    killer = threading.Thread(target=_kill_worker_after, args=(run, 1, 5, killed), daemon=True)
    killer.start()
    train(cfg, fault={"step_delay": 0.5})  # half a second a step: the killer's window
    killer.join(timeout=5)
    assert killed, "the worker was never killed"
    pids = _worker_pids(run, 1)
    assert len(pids) == 2 and pids[0] == killed["pid"] != pids[1]  # a new process took rank 1's place
    rank1 = (run / "logs" / "rank1.log").read_text()
    resumed = [int(s) for s in re.findall(r"resumed from the checkpoint of step (\d+)", rank1)]
    # checkpoints every 2 steps, the kill after step 5 was logged: the restart began at the newest checkpoint Ray
    # had registered by then (it registers one when the controller next polls the reports: 2 or 4 here), not at 0
    assert len(resumed) == 1 and 2 <= resumed[0] <= killed["at"] and resumed[0] % 2 == 0, (resumed, killed)
    assert [r["step"] for r in read_metrics(run)] == list(range(1, steps + 1))
    assert json.loads((run / "checkpoint_000000012" / "trainer_state.json").read_text())["step"] == steps


def test_killed_train_command_resumes_when_run_again(synthetic_shards, tmp_path, ray_session):
    """`facediff train` SIGKILLed mid-run (the driver: no cleanup, no exception), then the same command again:
    the second one resumes from the first one's last checkpoint and ends at the configured step."""
    import subprocess
    import sys

    steps = 16  # 0.5-2 s a step here: a window to kill in
    command = [str(Path(sys.executable).parent / "facediff"), "train", "configs/experiments/tiny/tiny_unet.yaml",
               f"data.path={synthetic_shards}", f"trainer.storage_path={tmp_path / 'runs'}", "trainer.run_name=run",
               "trainer.batch_size=4", f"trainer.total_kimg={steps * 8 / 1000}", "trainer.checkpoint_every_kimg=0.016",
               "trainer.log_every_steps=1", "trainer.keep_last=2"]
    # the test session's cluster: a second local Ray instance on this machine would fight over its ports
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    run = tmp_path / "runs" / "run"
    first = subprocess.Popen(command, cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        give_up = time.monotonic() + 600
        registered = None
        while time.monotonic() < give_up and first.poll() is None:
            try:  # Ray's record of a whole checkpoint (until then a re-run starts over, rightly)
                registered = resume_point(run).checkpoint
                if registered and len(read_metrics(run)) >= 3:
                    break
            except ValueError:  # a file being written
                pass
            time.sleep(0.1)
    finally:
        first.kill()
        first.wait()
    killed_at = read_metrics(run)[-1]["step"]
    assert registered and 3 <= killed_at < steps, (registered, killed_at)  # killed mid-run, after a checkpoint

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = [int(s) for s in re.findall(r"resumed from the checkpoint of step (\d+)",
                                          (run / "logs" / "rank0.log").read_text())]
    assert len(resumed) == 1 and int(registered[-9:]) <= resumed[0] <= killed_at, (resumed, registered, killed_at)
    assert [r["step"] for r in read_metrics(run)] == list(range(1, steps + 1))
    assert (run / "export" / "model_index.json").is_file()



def test_nonfinite_loss_on_one_rank_is_skipped_on_all_or_stops_the_run(synthetic_shards, tmp_path):
    from test_bad_records import with_corrupt_images

    steps = 4
    # the skipping run also reads shards with a corrupt JPEG each (test_bad_records.py): skipped, named, counted
    corrupted, corrupt = with_corrupt_images(synthetic_shards, tmp_path / "corrupted")
    skip = config(corrupted, tmp_path, extra=[f"trainer.total_kimg={steps * 8 / 1000}",
                                              "trainer.on_nonfinite_loss=skip"])
    train(skip, fault={"nan_at_step": 2})  # rank 0's loss at step 2 is NaN; rank 1's is finite
    rows = read_metrics(tmp_path / "runs" / "run")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # the skipped batch did not count as a step
    assert [r["skipped_nonfinite"] for r in rows] == [0, 1, 1, 1]
    assert all(math.isfinite(r["loss"]) for r in rows)  # the NaN never reached the weights or the mean
    counts = [r["bad_records"] for r in rows]  # every decode call met one, so the first log counts one or more
    assert counts == sorted(counts) and 1 <= counts[0] and counts[-1] <= len(corrupt), counts
    named = re.findall(r"record (\d+) of (\S+) does not decode", (tmp_path / "runs" / "run" / "logs" / "rank0.log")
                       .read_text())
    assert 1 <= len(named) <= counts[-1] and all(corrupt[int(i)] == file for i, file in named), (named, corrupt)

    stop = config(synthetic_shards, tmp_path, extra=[f"trainer.total_kimg={steps * 8 / 1000}",
                                                     "trainer.run_name=stop"])  # the default: stop
    with pytest.raises(Exception, match=r"step 2: the loss is not finite on at least one rank"):
        train(stop, fault={"nan_at_step": 2})
    assert [r["step"] for r in read_metrics(tmp_path / "runs" / "stop")] == [1]


def test_zero3_dit_with_ema_and_fallback_metric(synthetic_shards, tmp_path):
    cfg = config(synthetic_shards, tmp_path, "configs/experiments/tiny/tiny_dit.yaml", [
        "trainer.zero_stage=3", "trainer.precision=bf16", f"trainer.total_kimg={4 * 8 / 1000}",
        "eval.every_kimg=0.032", "eval.steps=2",
        "eval.batch_size=4",
    ])
    train(cfg)
    run = tmp_path / "runs" / "run"
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(0 < r["loss"] < 10 for r in rows)  # finite in bf16 under ZeRO-3
    assert "fid" not in rows[-1] and rows[-1]["fd_mtcnn_onet"] > 0  # no Inception weights here: labelled fallback
    ema = load_file(str(run / "checkpoint_000000004" / "ema.safetensors"))
    shapes = {f"ema.{k}": tuple(v.shape) for k, v in build_task(cfg).named_parameters()}
    assert {k: tuple(v.shape) for k, v in ema.items() if k != "ema_step"} == shapes  # gathered, not shards
    model = DiTTransformer2DModel.from_pretrained(run / "export" / "transformer")
    assert torch.allclose(model.pos_embed.proj.weight, ema["ema.net.pos_embed.proj.weight"])


def _epochs_seen(trace_dir) -> dict[int, list[tuple[int, int]]]:
    """(id, flipped) per data epoch over all ranks, from the traces of every worker start: a start's rows count
    up to the step the next start of that rank resumed from (later rows were redone after a crash)."""
    from collections import defaultdict

    attempts = defaultdict(list)  # rank -> [(first step, rows)]
    for path in trace_dir.glob("rank*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        if rows:
            attempts[path.name.split("-")[0]].append((rows[0]["step"], rows))
    seen = defaultdict(list)
    for starts in attempts.values():
        starts.sort(key=lambda a: a[0])
        for k, (first, rows) in enumerate(starts):
            until = starts[k + 1][0] - 1 if k + 1 < len(starts) else float("inf")
            for row in (r for r in rows if r["step"] <= until):
                for epoch, image_id, flipped in zip(row["epoch"], row["id"], row["flipped"]):
                    seen[epoch].append((image_id, flipped))
    return {epoch: sorted(pairs) for epoch, pairs in seen.items()}


@pytest.mark.timeout(900)
def test_interrupted_runs_see_the_uninterrupted_runs_data(synthetic_shards, tmp_path):
    """A restart after a worker crash (same fit) and a resume by re-running (new fit, later pass) continue the
    pass where it was: per epoch, the same (id, flipped) multiset as the uninterrupted run, every record once.
    Passes of 2 epochs: 88 rows / (2 workers x batch 2) = 22 steps a pass, none dropped; 33 steps = epochs 0
    and 1 whole (pass 0), then half of pass 1 (epochs 2 and 3, read one after the other)."""
    steps, ips = 33, 4

    def cfg(name, total, extra=()):
        return load_config("configs/experiments/tiny/tiny_unet.yaml", [
            f"data.path={synthetic_shards}", f"trainer.storage_path={tmp_path / 'runs'}", f"trainer.run_name={name}",
            "trainer.batch_size=2", f"trainer.total_kimg={total * ips / 1000}", "data.epochs_per_pass=2",
            f"trainer.checkpoint_every_kimg={3 * ips / 1000}", "trainer.log_every_steps=100", "trainer.keep_last=2",
            *extra])

    train(cfg("straight", steps), trace_dir=tmp_path / "straight")
    # crash at step 7 (last checkpoint: 6, in pass 0), restart within the fit, stop at 13 (still in pass 0) ...
    train(cfg("interrupted", 13, ["trainer.max_failures=1"]), trace_dir=tmp_path / "interrupted",
          fault={"crash_at_step": 7, "marker": str(tmp_path / "crashed")})
    assert (tmp_path / "crashed").exists()
    # ... then the same run again for 33 steps: a new fit() resuming in pass 0 at step 12, crossing into pass 1
    train(cfg("interrupted", steps), trace_dir=tmp_path / "interrupted")
    assert [r["step"] for r in read_metrics(tmp_path / "runs" / "interrupted")][-1] == steps

    for path in (tmp_path / "interrupted").glob("rank*.jsonl"):  # resumed runs are at the right point of the run
        for row in map(json.loads, path.read_text().splitlines()):
            assert row["progress"] == pytest.approx((row["step"] - 1) / steps if row["step"] > 13 else
                                                    (row["step"] - 1) / 13), row["step"]
    straight, interrupted = _epochs_seen(tmp_path / "straight"), _epochs_seen(tmp_path / "interrupted")
    assert sorted(straight) == sorted(interrupted) == [0, 1, 2, 3]
    for epoch in (0, 1):
        assert len(straight[epoch]) == 44 and len({i for i, _ in straight[epoch]}) == 44  # every record once
        assert interrupted[epoch] == straight[epoch], f"epoch {epoch}"
    assert straight[0] != straight[1]  # and the epochs flip differently
    for seen in (straight, interrupted):  # pass 1: 44 of its 88 records by step 33, none twice in an epoch
        assert len(seen[2]) + len(seen[3]) == 44
        assert all(len({i for i, _ in seen[e]}) == len(seen[e]) for e in (2, 3))


def _evaluated_ids_loop(config):
    """A Train worker that evaluates the split with a recording task: which records did this rank sample?"""
    import ray.train

    from facediff.config.schema import ExperimentConfig
    from facediff.eval.evaluate import evaluate_task
    from facediff.data.stream.dataset import iter_train_batches

    class Task:
        ids = []

        def sample(self, n, generator, sampler, steps, batch):
            self.ids += batch["id"].tolist()
            return torch.zeros(n, 3, 32, 32)

    class Metric:
        name, real, real_from_cache = "fd_test", [], False

        def update_real(self, images):
            self.real.append(len(images))

        def update_fake(self, images):
            pass

        def compute_all(self, bootstrap, seed):
            return {self.name: 0.0}

        def reset_fake(self):
            pass

    cfg = ExperimentConfig.model_validate(config["experiment"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    shard = ray.train.get_dataset_shard("test")
    task, metric = Task(), Metric()
    evaluate_task(task, cfg, lambda: iter_train_batches(shard, 5, drop_last=False), metric,
                  rank=rank, world=world)
    out = {"ids": task.ids, "real": sum(metric.real)}
    (Path(config["out"]) / f"rank{rank}.json").write_text(json.dumps(out))


def test_two_workers_evaluate_every_test_record_once(synthetic_shards, tmp_path):
    """Both workers iterate the whole (unsplit) split, read in 11 blocks in whatever order Ray Data delivers."""
    import pyarrow.parquet as pq
    from ray.train import DataConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from facediff.data.shards import shard_paths
    from facediff.data.stream.dataset import build_dataset

    import sys

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    cfg = config(synthetic_shards, tmp_path)
    test = build_dataset(synthetic_shards, "train", image_size=32, hflip=False, read_parallelism=11)
    TorchTrainer(
        _evaluated_ids_loop, train_loop_config={"experiment": cfg.model_dump(mode="json"), "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name="deal", storage_path=str(tmp_path / "ray")),
        datasets={"test": test}, dataset_config=DataConfig(datasets_to_split=[]),
    ).fit()
    ranks = [json.loads((Path(tmp_path) / f"rank{r}.json").read_text()) for r in (0, 1)]
    split = sorted(i for path in shard_paths(synthetic_shards, "train") for i in pq.read_table(path)["id"].to_pylist())
    assert len(split) == 44
    assert sorted(ranks[0]["ids"] + ranks[1]["ids"]) == split  # the union is the split, with no repeats
    assert ranks[0]["ids"] and ranks[1]["ids"]
    assert ranks[0]["real"] + ranks[1]["real"] == 44
