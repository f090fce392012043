"""Runs stored in S3: a real S3-compatible server (moto's standalone server) on 127.0.0.1, credentials and
endpoint from the environment, as a user's AWS set-up gives them."""

import io
import json

import pytest
import torch
from conftest import REPO, two_trial_grid
from PIL import Image
from safetensors.torch import load as load_safetensors

from facediff.config import load_config
from facediff.console import RunProgressLine
from facediff.storage import RunStorage, is_remote
from facediff.train.run_log import METRICS_FILE

BUCKET = "facediff-runs"


@pytest.fixture
def s3(monkeypatch):
    """An S3 server on a free port of 127.0.0.1 with one empty bucket; the AWS variables point at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    # moto keeps its buckets in the process, not the server: empty the bucket, so that no test sees another's
    # files (a run folder with another config.yaml is, rightly, refused)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        if page.get("Contents"):
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": o["Key"]} for o in page["Contents"]]})
    try:
        yield client
    finally:
        server.stop()


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    keys = (item["Key"][len(prefix):] for page in pages for item in page.get("Contents", []))
    return sorted(key for key in keys if key and not key.endswith("/"))  # pyarrow marks folders with empty keys


def test_run_storage_copies_files_and_folders_both_ways(s3, tmp_path):
    storage = RunStorage(f"s3://{BUCKET}/exp", "run")
    assert storage.remote and is_remote(storage.uri) and not is_remote(tmp_path)
    (storage.local / "export" / "unet").mkdir(parents=True, exist_ok=True)
    (storage.local / "export" / "unet" / "weights.bin").write_bytes(b"\x00\x01" * 1000)
    (storage.local / "config.yaml").write_text("name: run\n")
    storage.push("export")
    storage.push("config.yaml")
    assert _keys(s3, "exp/run/") == ["config.yaml", "export/unet/weights.bin"]
    assert storage.listing() == {"config.yaml": False, "export": True}

    other = RunStorage(f"s3://{BUCKET}/exp", "run")  # another command (or node): a local folder of its own
    assert other.local != storage.local and not any(other.local.iterdir())
    assert other.pull("export") and not other.pull("missing")
    assert (other.local / "export" / "unet" / "weights.bin").read_bytes() == b"\x00\x01" * 1000


def test_progress_line_follows_metrics_in_s3(s3):
    storage = RunStorage(f"s3://{BUCKET}/exp", "progress")
    rows = [{"step": s, "kimg": float(s), "loss": 1.0 / s, "images_per_s": 10.0} for s in (1, 2)]
    out = io.StringIO()
    with RunProgressLine("train s3", storage.file(METRICS_FILE), 4.0, stream=out, interval_s=0.01) as progress:
        # rank 0 writes its rows, the last one torn mid-line, and copies the file to S3
        (storage.local / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "ki')
        storage.push(METRICS_FILE)
    assert progress._last == rows[-1]  # the torn third row is left for the next read
    assert "train s3 [##########----------] 2.00/4.00 kimg" in out.getvalue() and "loss 0.5000" in out.getvalue()


def _stored_steps(s3, key: str) -> list[int]:
    return [json.loads(r)["step"] for r in s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode().splitlines()]


def test_run_log_copies_to_s3_with_the_first_row_checkpoints_and_the_end_not_every_row(s3):
    from facediff.train.run_log import RunLog

    storage = RunStorage(f"s3://{BUCKET}/exp", "cadence")
    key = f"exp/cadence/{METRICS_FILE}"
    run_log = RunLog(storage, total_steps=6, total_kimg=0.6, resumed_step=0)
    row = {"kimg": 0.1, "loss": 0.5, "lr": 1e-3, "images_per_s": 10.0}
    run_log.write({"step": 1, **row})
    run_log.write({"step": 2, **row})
    run_log.write({"step": 3, **row})
    assert _stored_steps(s3, key) == [1]  # rows between copies stay local (within PUSH_EVERY_S)
    run_log.write({"step": 4, **row}, sync=True)  # a checkpoint's row: everything up to it is stored
    assert _stored_steps(s3, key) == [1, 2, 3, 4]
    run_log.write({"step": 5, **row})
    run_log.close()
    assert _stored_steps(s3, key) == [1, 2, 3, 4, 5]
    assert any(k.startswith("tensorboard/events.out.tfevents") for k in _keys(s3, "exp/cadence/"))


def test_evaluation_of_a_run_in_s3_is_saved_in_the_run_there(s3):
    from facediff.eval import protocol

    uri = f"s3://{BUCKET}/exp/evaluated"
    evaluation = {"metric": "fid", "value": 12.5, "protocol": {"model": {"kind": "run checkpoint", "path": uri}}}
    assert protocol.save(evaluation, None) == f"{uri}/{protocol.EVALUATION_FILE}"
    stored = s3.get_object(Bucket=BUCKET, Key=f"exp/evaluated/{protocol.EVALUATION_FILE}")["Body"].read()
    assert json.loads(stored) == evaluation


def test_each_rank_reads_a_remote_checkpoint_from_its_own_download(s3, tmp_path):
    """Ray's shared download let a late rank re-download over files another rank was reading (a truncated
    safetensors header on resume from S3); `checkpoint.local_folder` gives every reader its own copy."""
    from ray.train import Checkpoint

    from facediff.train.checkpoint import local_folder

    storage = RunStorage(f"s3://{BUCKET}/exp", "ckpt")
    (storage.local / "checkpoint_000000004").mkdir()
    (storage.local / "checkpoint_000000004" / "ema.safetensors").write_bytes(b"\x07" * 4096)
    storage.push("checkpoint_000000004")
    remote = Checkpoint(path=f"{storage.root}/checkpoint_000000004", filesystem=storage.fs)
    with local_folder(remote) as first, local_folder(remote) as second:  # two ranks of one node at once
        assert first != second
        assert (first / "ema.safetensors").read_bytes() == (second / "ema.safetensors").read_bytes() == b"\x07" * 4096
    assert not first.exists() and not second.exists()  # downloads are removed, the stored checkpoint stays
    assert "checkpoint_000000004/ema.safetensors" in _keys(s3, "exp/ckpt/")

    local = Checkpoint.from_directory(str(tmp_path))  # a local checkpoint is read in place and left alone
    with local_folder(local) as folder:
        assert folder == tmp_path
    assert tmp_path.exists()


def test_rerun_is_compared_with_the_config_recorded_in_the_bucket(s3, tiny_config):
    """The run's identity lives in the bucket: a re-run of another config is refused without writing there; one
    that may resume is recorded there (history line, then config.yaml), whichever command's mirror writes it."""
    import yaml

    from facediff.train.identity import RunConfigChanged, check_resume, commit, read_history

    def run_config(*extra):
        return tiny_config([f"trainer.storage_path=s3://{BUCKET}/identity", "trainer.run_name=run", *extra])

    def stored() -> dict[str, bytes]:
        return {k: s3.get_object(Bucket=BUCKET, Key=f"identity/run/{k}")["Body"].read()
                for k in _keys(s3, "identity/run/")}

    first = RunStorage(f"s3://{BUCKET}/identity", "run")
    assert commit(first, check_resume(run_config(), first), step=0)
    before = stored()
    assert list(before) == ["config.yaml"]
    refusal = r"s3://facediff-runs/identity/run/config\.yaml\): optimizer\.lr 0\.001 -> 0\.0001"
    with pytest.raises(RunConfigChanged, match=refusal):
        check_resume(run_config("optimizer.lr=1e-4"), RunStorage(f"s3://{BUCKET}/identity", "run"))
    assert stored() == before

    again = RunStorage(f"s3://{BUCKET}/identity", "run")  # another command: its own, empty local mirror
    assert commit(again, check_resume(run_config("trainer.total_kimg=2"), again), step=8)
    [entry] = read_history(RunStorage(f"s3://{BUCKET}/identity", "run"))
    assert entry["resumed_at_step"] == 8 and entry["changes"] == {"trainer.total_kimg": {"old": 1.0, "new": 2.0}}
    assert yaml.safe_load(stored()["config.yaml"])["trainer"]["total_kimg"] == 2.0


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(900)
def test_train_resume_and_sample_with_runs_in_s3(s3, synthetic_shards, tmp_path, monkeypatch):
    from facediff.runs.load import load_model
    from facediff.train.run import train

    monkeypatch.chdir(tmp_path)  # nothing of the run may land in a local folder named after storage_path
    steps = 6
    # checkpoints copied to S3 in the background (trainer.checkpoint_upload=async): the resumed run starts from
    # the last registered, whole one; evaluations in Ray's validation task (eval.async_validation) every 2 steps
    cfg = load_config(REPO / "configs" / "experiments" / "tiny" / "tiny_unet.yaml", [
        f"data.path={synthetic_shards}", f"trainer.storage_path=s3://{BUCKET}/exp", "trainer.run_name=run",
        "trainer.batch_size=4", f"trainer.total_kimg={steps * 8 / 1000}", "trainer.checkpoint_every_kimg=0.016",
        "trainer.log_every_steps=1", "trainer.keep_last=2", "trainer.zero_stage=2", "trainer.ema.warmup=false",
        "trainer.checkpoint_upload=async", "eval.async_validation=true", "eval.every_kimg=0.016", "eval.steps=2",
        "eval.batch_size=8", "eval.num_samples=8", "eval.bootstrap=0", "eval.async_resources={CPU: 0.5}",
    ])
    fault = {"crash_at_step": 5, "marker": str(tmp_path / "crashed")}
    with pytest.raises(Exception, match="injected worker crash at step 5"):
        train(cfg, fault=fault)
    stored = _keys(s3, "exp/run/")
    metrics = s3.get_object(Bucket=BUCKET, Key=f"exp/run/{METRICS_FILE}")["Body"].read().decode()
    assert [r["step"] for r in map(json.loads, metrics.splitlines()) if not r.get("async_eval")] == [1, 2, 3, 4]
    assert "config.yaml" in stored
    # the checkpoint a re-run resumes from: the latest Ray registered, i.e. whose every rank's background copy
    # finished before the crash (step 4's, unless the crash came first), whole in S3
    from facediff.train.driver import resume_point

    registered = resume_point(RunStorage(f"s3://{BUCKET}/exp", "run")).checkpoint
    assert registered in ("checkpoint_000000002", "checkpoint_000000004")
    load_safetensors(s3.get_object(Bucket=BUCKET, Key=f"exp/run/{registered}/ema.safetensors")["Body"].read())

    train(cfg, fault=fault)  # the same command again: resumes from the checkpoint in S3
    stored = _keys(s3, "exp/run/")
    rows = [json.loads(r) for r in s3.get_object(Bucket=BUCKET, Key=f"exp/run/{METRICS_FILE}")["Body"].read()
            .decode().splitlines()]
    # every training step logged (training never waited for an evaluation to finish), and one evaluation row per
    # evaluated checkpoint, tagged with its step and kimg, whenever it arrived (one cut short by the crash is
    # redone by the resumed run: Ray keeps pending validations in its checkpoint snapshot)
    assert [r["step"] for r in rows if not r.get("async_eval")] == list(range(1, steps + 1))
    evals = sorted((r for r in rows if r.get("async_eval")), key=lambda r: r["step"])
    assert [(r["step"], r["kimg"]) for r in evals] == [(2, 0.016), (4, 0.032), (6, 0.048)]
    assert all(0 < r["fd_mtcnn_onet"] < 1e4 for r in evals)  # no Inception weights here: the labelled fallback
    rank0_log = s3.get_object(Bucket=BUCKET, Key="exp/run/logs/rank0.log")["Body"].read().decode()
    assert f"resumed from the checkpoint of step {int(registered.split('_')[1])}" in rank0_log
    assert sorted({k.split("/")[0] for k in stored if k.startswith("checkpoint_0")}) == \
        ["checkpoint_000000004", "checkpoint_000000006"]  # keep_last=2, pruned in S3 by Ray
    assert any(k.startswith("tensorboard/events.out.tfevents") for k in stored)
    assert {"export/model_index.json", "export/unet/config.json"} <= set(stored)
    assert not (tmp_path / "s3:").exists() and not (tmp_path / BUCKET).exists()

    # sampling and evaluation read the run straight from S3: the newest checkpoint's EMA weights
    ema = load_safetensors(s3.get_object(Bucket=BUCKET, Key="exp/run/checkpoint_000000006/ema.safetensors")
                           ["Body"].read())
    _, task = load_model(f"s3://{BUCKET}/exp/run")
    assert torch.equal(task.state_dict()["net.conv_in.weight"], ema["ema.net.conv_in.weight"])

    from typer.testing import CliRunner

    from facediff.cli.main import app

    done = CliRunner().invoke(app, ["sample", f"s3://{BUCKET}/exp/run", "--n", "4", "--steps", "2",
                                    "--out", str(tmp_path / "grid.png")])
    assert done.exit_code == 0, done.output
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size[0] >= 2 * 32 and grid.size[1] >= 2 * 32  # 4 tiles of 32 px




@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(900)
def test_tune_experiment_in_s3_writes_there_and_restores_from_there(s3, synthetic_shards, tmp_path, monkeypatch):
    import csv

    from facediff.tune import run_tune

    monkeypatch.chdir(tmp_path)
    grid = tmp_path / "grid.yaml"
    grid.write_text(two_trial_grid(0.032))  # 2 steps a trial
    args = [f"data.path={synthetic_shards}", f"storage_path=s3://{BUCKET}/tune"]
    summary = run_tune(grid, args)
    assert summary["experiment"] == f"s3://{BUCKET}/tune/grid"
    assert summary["trials"] == 2 and summary["errors"] == 0 and summary["reported_metric"] == 2
    stored = _keys(s3, "tune/grid/")
    assert {"results.csv", "results.md", "metric_vs_kimg.png", "best.json"} <= set(stored)
    assert any(k.startswith("experiment_state-") for k in stored)  # Tune's own state, for a restore
    rows = list(csv.DictReader(io.StringIO(s3.get_object(Bucket=BUCKET, Key="tune/grid/results.csv")["Body"]
                                           .read().decode())))
    assert len(rows) == 2 and all(r["outcome"] == "completed" and float(r["kimg"]) == 0.032 for r in rows)
    logged = {}
    for r in rows:  # each trial's Train run lives in the bucket: rows, checkpoint, export
        assert {f"{r['trial']}/train/metrics.jsonl", f"{r['trial']}/train/export/model_index.json"} <= set(stored)
        key = f"tune/grid/{r['trial']}/train/metrics.jsonl"
        logged[r["trial"]] = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert [json.loads(x)["step"] for x in logged[r["trial"]].splitlines()] == [1, 2]
        assert r["checkpoint"] == f"s3://{BUCKET}/tune/grid/{r['trial']}/train/checkpoint_000000002"
    assert summary["best"]["checkpoint"].startswith(f"s3://{BUCKET}/")

    again = run_tune(grid, args)  # restored from the bucket: no trial runs again
    assert again["trials"] == 2 and again["best"]["trial"] == summary["best"]["trial"]
    for trial, rows_before in logged.items():
        key = f"tune/grid/{trial}/train/metrics.jsonl"
        assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == rows_before
