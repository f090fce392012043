"""Across nodes on one machine: a Ray cluster of a head and two worker nodes (`ray.cluster_utils.Cluster`, each
node its own raylet and object store). `facediff train` with one worker per node (and the same run on one node),
a `facediff tune` grid whose trials land on different nodes, and a `ray job submit` to the head's job API (the
job's entrypoint names the environment's python by absolute path: it runs in an uploaded copy of the repo)."""

import csv
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from safetensors.torch import load_file

from facediff.config import load_config
from facediff.train.run_log import read_metrics
from facediff.train.run import train
from facediff.tune import run_tune

from conftest import REPO

pytestmark = pytest.mark.ray
RAY = Path(sys.executable).parent / "ray"  # the environment's own Ray CLI (and python, in the job's entrypoint)
STEPS = 6  # 2 workers x batch 4 = 8 images a step; a checkpoint every 2 steps


@pytest.fixture(scope="module")
def two_node_cluster():
    """Head (1 CPU, no worker slot, the job API) + 2 nodes with 2 CPUs and one `worker_slot` each: a Train worker
    that asks for a CPU and the slot can only sit one to a node, and Ray Data decodes on the CPUs left over."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # the session's single-node instance (tests/conftest.py restarts it on demand)
        ray.shutdown()
    # Under `uv run` Ray starts every worker process with `uv run` in a packaged copy of the working dir, which
    # first builds that copy's own environment: here, on three raylets, the first batch of a run came after
    # ~2 min. The nodes share this machine's environment, so the workers use its python directly.
    uv_hook, ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV, False
    dashboard = _free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard,
        # not the fixed defaults: another Ray instance of this user may hold them
        "dashboard_agent_listen_port": _free_port(), "metrics_export_port": _free_port()})
    workers = [cluster.add_node(num_cpus=2, resources={"worker_slot": 1}) for _ in range(2)]
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    try:
        yield cluster, {node.node_id for node in workers}, f"http://127.0.0.1:{dashboard}"
    finally:
        ray.shutdown()
        cluster.shutdown()
        ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = uv_hook


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAY), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _env() -> dict:
    # Never another cluster: no inherited RAY_ADDRESS; every command names this head's address.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"  # a token exists once any ray.init ran here (~/.ray/auth_token): be explicit
    return env


def rank_nodes(run: Path, world: int = 2) -> dict[int, list[str]]:
    """Each rank's node ids, one per worker start, from the workers' own logs.

    Not its local or node rank: Ray Train derives those from node IP addresses, and the simulated nodes share
    this machine's, so here the second worker reads as local rank 1 of node rank 0 (measured). facediff uses
    neither (devices come from `ray.train.torch.get_device()`, data and checkpoints from the world rank)."""
    nodes = {}
    for rank in range(world):
        text = (run / "logs" / f"rank{rank}.log").read_text()
        nodes[rank] = re.findall(rf"rank {rank} of {world}: local rank \d+ on node (\w+)", text)
    return nodes


def tiny_run(tmp_path: Path, shards: Path, name: str, placement: str, resources: str) -> object:
    return load_config("configs/experiments/tiny/tiny_unet.yaml", [
        f"data.path={shards}", f"trainer.storage_path={tmp_path / 'runs'}", f"trainer.run_name={name}",
        "data.deterministic_order=true", "trainer.num_workers=2", f"trainer.placement={placement}",
        f"trainer.resources_per_worker={resources}", "trainer.batch_size=4", f"trainer.total_kimg={STEPS * 8 / 1000}",
        "trainer.checkpoint_every_kimg=0.016", "trainer.log_every_steps=1", "trainer.zero_stage=2",
        "trainer.max_failures=1", "trainer.keep_last=5",
    ])


@pytest.mark.timeout(1500)
def test_one_worker_per_node_checkpoints_every_rank_resumes_and_matches_the_one_node_run(
        two_node_cluster, synthetic_shards, tmp_path):
    _, worker_nodes, _ = two_node_cluster
    runs = {}
    for name, placement, resources in (("two_nodes", "strict_spread", "{CPU: 1, worker_slot: 1}"),
                                       ("one_node", "strict_pack", "{CPU: 1}")):
        marker = tmp_path / f"crashed_{name}"  # a worker raises at step 3, once, in each run
        runs[name] = train(tiny_run(tmp_path, synthetic_shards, name, placement, resources),
                           fault={"crash_at_step": 3, "marker": str(marker)})
        assert marker.exists()
    run = runs["two_nodes"]

    nodes = rank_nodes(run)
    assert [len(nodes[0]), len(nodes[1])] == [2, 2]  # each rank started twice: the first attempt and the restart
    for attempt in (0, 1):  # in both attempts the two ranks sat on the two worker nodes, one each
        assert {nodes[0][attempt], nodes[1][attempt]} == worker_nodes
    packed = rank_nodes(runs["one_node"])
    assert [len(packed[0]), len(packed[1])] == [2, 2]
    assert all(packed[0][k] == packed[1][k] for k in (0, 1))  # in each attempt both ranks shared one node
    for each in runs.values():
        restarts = re.findall(r"resumed from the checkpoint of step (\d+)", (each / "logs" / "rank0.log").read_text())
        assert restarts == ["2"]  # the restart began at the last checkpoint before the crash, not at step 0
        assert [r["step"] for r in read_metrics(each)] == list(range(1, STEPS + 1))  # and ended at the last step

    checkpoints = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    assert checkpoints[-1].name.endswith(f"{STEPS:09d}")
    for folder in checkpoints:  # every rank's files, written on its own node, are in each checkpoint
        names = {p.name for p in folder.rglob("*") if p.is_file()}
        assert {"rng_rank0.safetensors", "rng_rank1.safetensors"} <= names, folder
        optimizer_shards = [n for n in names if re.match(r"(bf16_)?zero_pp_rank_\d+_mp_rank_00_optim_states\.pt", n)]
        assert len(optimizer_shards) == 2, (folder, sorted(names))  # ZeRO-2: one optimizer partition per rank
    assert json.loads((run / "export" / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"

    # With data.deterministic_order each rank is dealt the same rows in the same order on any placement, the
    # noise streams are per rank and seeded, and the all-reduce of two ranks sums the same two numbers: the
    # crashed-and-resumed runs on two nodes and on one end with bit-identical EMA weights (and losses).
    spread, one = (load_file(r / checkpoints[-1].name / "ema.safetensors") for r in (run, runs["one_node"]))
    assert spread.keys() == one.keys()
    assert all(spread[k].equal(one[k]) for k in spread), [k for k in spread if not spread[k].equal(one[k])][:5]
    assert [r["loss"] for r in read_metrics(run)] == [r["loss"] for r in read_metrics(runs["one_node"])]


GRID = """
train_config: {config}
reproduces: nothing (test)
metric: loss
mode: min
overrides:
  trainer.num_workers: 1
  trainer.resources_per_worker: {{CPU: 1, worker_slot: 1}}
  trainer.batch_size: 8
  trainer.checkpoint_every_kimg: 0.032
  trainer.log_every_steps: 2
  trainer.keep_last: 1
search_space:
  optimizer.lr: {{grid: [1.0e-3, 3.0e-4]}}
scheduler: {{kind: fifo, max_kimg: 0.032}}
resources_per_trial: {{CPU: 0.25}}
max_concurrent_trials: 2
"""


@pytest.mark.timeout(900)
def test_tune_trials_run_at_once_on_different_nodes(two_node_cluster, synthetic_shards, tmp_path):
    """Each trial's single worker needs the one `worker_slot` a node has: two concurrent trials take both."""
    _, worker_nodes, _ = two_node_cluster
    grid = tmp_path / "nodes.yaml"
    grid.write_text(GRID.format(config=REPO / "configs" / "experiments" / "tiny" / "tiny_unet.yaml"))
    summary = run_tune(grid, [f"data.path={synthetic_shards}", f"storage_path={tmp_path / 'tune'}"])
    assert summary["trials"] == 2 and summary["errors"] == 0
    exp = tmp_path / "tune" / "nodes"
    with open(exp / "results.csv") as f:
        rows = list(csv.DictReader(f))
    trial_nodes = set()
    for row in rows:
        train_run = exp / row["trial"] / "train"
        assert [r["step"] for r in read_metrics(train_run)] == [2, 4]  # 32 images in steps of 8, logged every 2
        trial_nodes.update(rank_nodes(train_run, world=1)[0])
    assert trial_nodes == worker_nodes


def submit_job(address: str, args: list[str], env: dict) -> tuple[str, str]:
    """`ray job submit --no-wait` of `args` (entrypoint included), waited for: the job's status and output."""
    job = f"facediff-nodes-{uuid.uuid4().hex[:8]}"
    submit = ["job", "submit", "--address", address, "--working-dir", str(REPO), "--submission-id", job,
              "--no-wait", "--", *args]
    # a fresh head answers before its job agent is up ("No available agent ... try again later") and may drop the
    # first package upload: submit again, within a bound
    give_up = time.monotonic() + 180
    while True:
        submitted = _ray(submit, env)
        if submitted.returncode == 0 or "already exists" in submitted.stdout + submitted.stderr \
                or time.monotonic() > give_up:
            break
        time.sleep(4)
    assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-4000:]
    status, give_up = "", time.monotonic() + 600  # a bound, so a stuck job fails with its logs below
    while time.monotonic() < give_up:
        status = _ray(["job", "status", job, "--address", address], env, timeout=60).stdout
        if re.search(r"\b(succeeded|failed|stopped)\b", status.lower()):
            break
        time.sleep(2)
    return status, _ray(["job", "logs", job, "--address", address], env, timeout=60).stdout


@pytest.mark.timeout(1500)
def test_ray_job_submit_to_the_heads_job_api_trains_across_the_nodes_and_prints_what_the_cli_prints(
        two_node_cluster, synthetic_shards, tmp_path):
    _, worker_nodes, address = two_node_cluster
    env, runs = _env(), tmp_path / "runs"
    job_train = lambda name, kimg: [  # noqa: E731
        sys.executable, "ray_jobs/train.py", "configs/experiments/tiny/tiny_unet.yaml",
        f"data.path={synthetic_shards}", f"trainer.storage_path={runs}", f"trainer.run_name={name}",
        "trainer.placement=strict_spread", "trainer.resources_per_worker={CPU: 1, worker_slot: 1}",
        "trainer.batch_size=4", f"trainer.total_kimg={kimg}", "trainer.checkpoint_every_kimg=0.016",
        "trainer.log_every_steps=1"]
    status, logs = submit_job(address, job_train("job", 0.016), env)
    assert "succeeded" in status.lower(), status + logs[-4000:]
    run = runs / "job"
    assert [r["step"] for r in read_metrics(run)] == [1, 2]  # 16 images / (2 workers x 4)
    nodes = rank_nodes(run)
    assert {nodes[0][0], nodes[1][0]} == worker_nodes  # the job's workers sat one on each worker node
    assert (run / "checkpoint_000000002" / "ema.safetensors").is_file()
    # the job's output is what `facediff train` prints: the progress line (to its end) and the run folder; the
    # workers' and Ray's own output (each line "(ActorName pid=N) ...") stays in Ray's and the run's logs
    lines = logs.splitlines()
    assert any(line.startswith("train job [####################] 0.016/0.016 kimg") for line in lines), logs
    assert f"run folder: {run}" in logs
    assert "pid=" not in logs and "TrainingReport(" not in logs, logs
    assert len(lines) <= 30, logs

    # `FACEDIFF_VERBOSE=1` / `--verbose` bringing Ray's output back is checked without a second job
    # (tests/test_console.py: the job's flag and env var become the CLI's --verbose; join_cluster follows it)


def _valid_trace_rows(trace_dir: Path) -> list[dict]:
    """The trace rows that count: a worker start's rows up to the step the next start (of any size) resumed from;
    the rows a later start redid replace them."""
    files = [[json.loads(line) for line in p.read_text().splitlines()] for p in trace_dir.glob("rank*.jsonl")]
    files = [rows for rows in files if rows]
    starts = sorted({(rows[0]["started"], rows[0]["step"]) for rows in files})
    valid = []
    for rows in files:
        # the ranks of one start begin within seconds; a group restarts tens of seconds after the last one
        later = [step for started, step in starts if started > rows[0]["started"] + 8.0]
        valid += [r for r in rows if r["step"] < min(later, default=float("inf"))]
    return valid


def _wait(what: str, ready, timeout: float = 420) -> None:
    give_up = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > give_up:
            raise TimeoutError(f"waited {timeout:g} s for {what}")
        time.sleep(0.5)


def _trace_worlds(trace_dir: Path) -> list[tuple[float, int]]:
    """(start time, world size) of each worker start that trained a micro-batch."""
    out = []
    for path in trace_dir.glob("rank*.jsonl"):
        line = path.read_text().split("\n", 1)[0]
        if line.endswith("}"):  # a whole first row
            row = json.loads(line)
            out.append((row["started"], row["world"]))
    return out


@pytest.mark.timeout(1200)
def test_elastic_run_shrinks_when_a_node_leaves_grows_when_one_joins_and_keeps_the_global_batch(
        two_node_cluster, synthetic_shards, tmp_path):
    """`trainer.num_workers: [1, 2]`, one worker per node: a node removed at step >= 3 → the run goes on with one
    worker from its last checkpoint; once that worker has logged a step, the run is held at its next one and a
    node is added → it grows back to two workers, from the last checkpoint. 44 rows, global batch 4 (2 workers x 2,
    or 1 worker x 2 micro-batches of 2): 11 steps, one epoch, a checkpoint every step. Runs last in the module: it
    replaces one of the fixture's worker nodes.

    The node is added from a helper thread (the main one is in `train`), which must outlive the run: the node's
    processes are started with PR_SET_PDEATHSIG (`Cluster` nodes share their starter's fate), which Linux sends
    when the *thread* that started them ends. An earlier version let the thread end once the run had grown: the
    raylet was killed, Ray's GCS declared the node dead ("missing too many heartbeats") and the run shrank again."""
    import threading
    from unittest import mock

    from pyarrow import parquet as pq

    from facediff.data.shards import shard_paths
    from facediff.train.engine import lr_factor

    cluster, _, _ = two_node_cluster
    steps, name = 11, "elastic"
    cfg = load_config("configs/experiments/tiny/tiny_unet.yaml", [
        f"data.path={synthetic_shards}", f"trainer.storage_path={tmp_path / 'runs'}", f"trainer.run_name={name}",
        "trainer.num_workers=[1, 2]", "trainer.placement=spread", "trainer.resources_per_worker={CPU: 1, worker_slot: 1}",
        "trainer.batch_size=2", f"trainer.total_kimg={steps * 4 / 1000}", "trainer.checkpoint_every_kimg=0.004",
        "trainer.log_every_steps=1", "trainer.zero_stage=0", "trainer.max_failures=2", "trainer.keep_last=3",
        "trainer.elastic_resize_interval_s=5", "data.epochs_per_pass=1", "optimizer.schedule=cosine",
        # right after the node left, Ray Train still counts it and asks for 2 workers: retried after this
        "trainer.placement_timeout_s=30",
    ])
    run, traces, pause = tmp_path / "runs" / name, tmp_path / "trace", tmp_path / "pause"
    finished, errors = threading.Event(), []

    def change_the_cluster():
        added = None
        try:
            _wait("step 3", lambda: any(r["step"] >= 3 for r in read_metrics(run)))
            cluster.remove_node(next(iter(cluster.worker_nodes)))  # each worker node holds one of the two workers
            _wait("a step on one worker", lambda: any(r["world_size"] == 1 for r in read_metrics(run)))
            pause.touch()  # hold the one-worker run at its next step until the grown group has started
            # Ray's SIGTERM handler can only be set from the main thread; the node is removed below anyway
            with mock.patch("ray._private.utils.set_sigterm_handler", lambda handler: None):
                added = cluster.add_node(num_cpus=2, resources={"worker_slot": 1})
            shrunk = max(t for t, w in _trace_worlds(traces) if w == 1)
            _wait("two workers again", lambda: any(w == 2 and t > shrunk for t, w in _trace_worlds(traces)))
        except Exception as err:  # noqa: BLE001 (reported by the test below)
            errors.append(err)
        finally:
            pause.unlink(missing_ok=True)
        finished.wait(timeout=900)  # this thread's end would kill the added node's processes (see above)
        if added is not None:
            cluster.remove_node(added)

    changer = threading.Thread(target=change_the_cluster, daemon=True)
    changer.start()
    try:
        train(cfg, trace_dir=traces, fault={"pause_file": str(pause)})
    finally:
        finished.set()
        changer.join(timeout=120)
    assert not errors, errors

    metrics = read_metrics(run)
    assert [r["step"] for r in metrics] == list(range(1, steps + 1))  # each step once, none lost or doubled
    worlds = [r["world_size"] for r in metrics]
    assert [w for k, w in enumerate(worlds) if k == 0 or worlds[k - 1] != w] == [2, 1, 2], worlds
    resumed = [int(s) for s in re.findall(r"resumed from the checkpoint of step (\d+)",
                                          (run / "logs" / "rank0.log").read_text())]
    assert len(resumed) >= 2 and resumed == sorted(resumed)  # each new group went on from the last checkpoint
    o = cfg.optimizer
    for r in metrics:  # the schedule follows optimizer steps, whatever the size
        assert r["lr"] == pytest.approx(o.lr * lr_factor(r["step"] - 1, o.warmup_steps, steps, o.schedule,
                                                        o.min_lr_ratio)), r["step"]

    rows = _valid_trace_rows(traces)
    per_step = {}
    for row in rows:
        per_step.setdefault(row["step"], []).append(row)
    assert sorted(per_step) == list(range(1, steps + 1))
    for step, batches in per_step.items():  # 4 images a step at every size: 2 x 2, or 1 worker x 2 x 2
        assert sum(len(b["id"]) for b in batches) == 4, (step, [(b["world"], len(b["id"])) for b in batches])
        assert {b["world"] for b in batches} == {worlds[step - 1]}
    trained = sorted(i for row in rows for e, i in zip(row["epoch"], row["id"]) if e == 0)
    epoch_ids = sorted(i for path in shard_paths(synthetic_shards, cfg.data.train_split)
                       for i in pq.read_table(path, columns=["id"])["id"].to_pylist())
    assert trained == epoch_ids  # the epoch's records, each exactly once, across the three worker groups
