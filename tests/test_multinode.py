"""Across nodes on one machine: a Ray cluster of a head and two worker nodes (`ray.cluster_utils.Cluster`, each
node its own raylet and object store), and `facediff train` with one worker per node."""

import json
import re
from pathlib import Path

import pytest

from facediff.config import load_config
from facediff.train.progress import read_metrics
from facediff.train.run import train

pytestmark = pytest.mark.ray
STEPS = 6  # 2 workers x batch 4 = 8 images a step; a checkpoint every 2 steps


@pytest.fixture
def two_node_cluster():
    """Head (1 CPU, no worker slot) + 2 nodes with 2 CPUs and one `worker_slot` each: a Train worker takes a
    CPU and the slot, so each node holds exactly one and Ray Data decodes on the CPUs left over."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # the session's single-node instance (tests/conftest.py restarts it on demand)
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2, resources={"worker_slot": 1}) for _ in range(2)]
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    try:
        yield cluster, {node.node_id for node in workers}
    finally:
        ray.shutdown()
        cluster.shutdown()


def rank_nodes(run: Path) -> dict[int, list[str]]:
    """Each rank's node ids, one per worker start, from the workers' own logs.

    Not its local or node rank: Ray Train derives those from node IP addresses, and the simulated nodes share
    this machine's, so here the second worker reads as local rank 1 of node rank 0 (measured). facediff uses
    neither (devices come from `ray.train.torch.get_device()`, data and checkpoints from the world rank)."""
    nodes = {}
    for rank in (0, 1):
        text = (run / "logs" / f"rank{rank}.log").read_text()
        nodes[rank] = re.findall(rf"rank {rank} of 2: local rank \d+ on node (\w+)", text)
    return nodes


def test_one_worker_per_node_trains_checkpoints_every_rank_and_resumes_after_a_crash(
        two_node_cluster, synthetic_shards, tmp_path):
    _, worker_nodes = two_node_cluster
    cfg = load_config("configs/experiments/tiny_unet.yaml", [
        f"data.path={synthetic_shards}", f"trainer.storage_path={tmp_path / 'runs'}", "trainer.run_name=run",
        "trainer.num_workers=2", "trainer.placement=strict_spread", "trainer.resources_per_worker={CPU: 1, worker_slot: 1}",
        "trainer.batch_size=4", f"trainer.total_kimg={STEPS * 8 / 1000}", "trainer.checkpoint_every_kimg=0.016",
        "trainer.log_every_steps=1", "trainer.zero_stage=2", "trainer.max_failures=1", "trainer.keep_last=5",
    ])
    marker = tmp_path / "crashed"
    run = train(cfg, fault={"crash_at_step": 3, "marker": str(marker)})  # a worker raises at step 3, once
    assert marker.exists()

    nodes = rank_nodes(run)
    assert [len(nodes[0]), len(nodes[1])] == [2, 2]  # each rank started twice: the first attempt and the restart
    for attempt in (0, 1):  # in both attempts the two ranks sat on the two worker nodes, one each
        assert {nodes[0][attempt], nodes[1][attempt]} == worker_nodes
    restarts = re.findall(r"resumed from the checkpoint of step (\d+)", (run / "logs" / "rank0.log").read_text())
    assert restarts == ["2"]  # the restart began at the last checkpoint before the crash, not at step 0
    assert [r["step"] for r in read_metrics(run)] == list(range(1, STEPS + 1))  # and ended at the configured step

    checkpoints = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    assert checkpoints[-1].name.endswith(f"{STEPS:09d}")
    for folder in checkpoints:  # every rank's files, written on its own node, are in each checkpoint
        names = {p.name for p in folder.rglob("*") if p.is_file()}
        assert {"rng_rank0.safetensors", "rng_rank1.safetensors"} <= names, folder
        optimizer_shards = [n for n in names if re.match(r"(bf16_)?zero_pp_rank_\d+_mp_rank_00_optim_states\.pt", n)]
        assert len(optimizer_shards) == 2, (folder, sorted(names))  # ZeRO-2: one optimizer partition per rank
    assert json.loads((run / "export" / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
