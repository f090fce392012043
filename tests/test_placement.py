"""Nothing waits forever for workers: a request the cluster's nodes can never hold is refused before the run
starts, naming what was asked and what the nodes offer; a worker group Ray cannot place within
`trainer.placement_timeout_s` ends the run with one line. Only the last test starts Ray."""

import pytest
from typer.testing import CliRunner

from facediff.cli.main import app
from facediff.train.placement import PlacementError, PlacementTimeout, WorkerRequest, check_fits

from conftest import REPO

GIB = 2**30
CPU_NODE = {"CPU": 4.0, "memory": 8 * GIB, "object_store_memory": 2 * GIB, "node:10.0.0.1": 1.0}
GPU_NODE = {"CPU": 16.0, "GPU": 2.0, "memory": 64 * GIB, "accelerator_type:A100": 1.0, "node:10.0.0.2": 1.0}


def refusal(request: WorkerRequest, nodes, autoscaled=None) -> str:
    with pytest.raises(PlacementError) as info:
        check_fits(request, nodes, autoscaled)
    return str(info.value)


def test_a_resource_no_node_has_is_refused_naming_what_the_nodes_offer():
    # the misspelling, as Ray would get it had it passed the load: merged beside the tiny config's CPU
    request = WorkerRequest.of(2, False, {"CPU": 0.5, "CPUS": 1.0})
    message = refusal(request, [CPU_NODE])
    assert message.startswith("trainer.resources_per_worker.CPUS: no node of the running cluster has a resource "
                              "named 'CPUS'")
    assert "{CPU: 4, memory: 8.0 GiB, object_store_memory: 2.0 GiB}" in message and "node:" not in message
    # a custom resource the cluster declares is fine
    check_fits(WorkerRequest.of(2, False, {"CPU": 1.0, "ssd": 1.0}), [{**CPU_NODE, "ssd": 2.0}], None)


def test_more_gpus_per_worker_than_any_node_has():
    request = WorkerRequest.of(1, True, {"CPU": 4.0, "GPU": 4.0})
    message = refusal(request, [CPU_NODE, GPU_NODE])
    assert "1 worker(s) x {CPU: 4, GPU: 4} (pack placement) cannot be placed: no node can hold one worker" in message
    assert "GPU: 2" in message and "lower trainer.num_workers" in message
    # use_gpu alone asks for one GPU per worker, which a CPU-only cluster does not have
    assert "resource named 'GPU'" in refusal(WorkerRequest.of(1, True, {"CPU": 1.0}), [CPU_NODE])


@pytest.mark.parametrize("strategy,workers,fits", [
    ("pack", 3, True), ("spread", 4, False), ("strict_pack", 2, True), ("strict_pack", 3, False),
    ("strict_spread", 2, True), ("strict_spread", 3, False),
])
def test_the_placement_strategy_decides_how_many_fit(strategy, workers, fits):
    nodes = [GPU_NODE, {**GPU_NODE, "GPU": 1.0}]  # they hold 2 and 1 one-GPU workers
    request = WorkerRequest.of(workers, True, {"CPU": 1.0}, strategy)
    if fits:
        check_fits(request, nodes, None)
    else:
        assert "cannot be placed" in refusal(request, nodes)


def test_an_autoscaling_cluster_is_checked_by_name_only():
    request = WorkerRequest.of(8, True, {"CPU": 8.0, "GPU": 1.0})
    check_fits(request, [CPU_NODE], autoscaled={"CPU": 400.0, "GPU": 32.0})  # GPU nodes may come
    assert "named 'TPU'" in refusal(WorkerRequest.of(1, False, {"TPU": 1.0}), [CPU_NODE], {"GPU": 32.0})


def test_segformer_requests_name_its_top_level_keys():
    message = refusal(WorkerRequest.of(2, False, {"CPU": 8.0}, key=""), [CPU_NODE])
    assert message.startswith("resources_per_worker: ") and "lower num_workers" in message


@pytest.mark.ray
@pytest.mark.timeout(300)  # Ray's own behaviour, retrying without end, would hang here
def test_impossible_requests_are_refused_and_unplaced_workers_end_the_run_within_the_timeout(ray_session, synthetic_shards,
                                                                                 tmp_path, tiny_config):
    """Requests the local cluster can never hold are refused at once; workers it could hold, but whose CPUs
    another job holds, end the run after the timeout."""
    from ray.util.placement_group import placement_group, remove_placement_group

    from facediff.train.placement import check_cluster
    from facediff.train.run import train

    # this local instance is a fixed cluster of one CPU-only node: names and amounts are both checked
    for bundle, use_gpu, refusal_text in (({"CPU": 0.5, "CPUS": 1.0}, False, "named 'CPUS'"),
                                          ({"CPU": 1.0}, True, "named 'GPU'"),
                                          ({"CPU": 100.0}, False, "no node can hold one worker")):
        with pytest.raises(PlacementError, match=refusal_text):
            check_cluster(WorkerRequest.of(1, use_gpu, bundle))
    # `facediff train` says so in one line, exit code 2, before any worker starts
    result = CliRunner().invoke(app, ["train", str(REPO / "configs" / "experiments" / "tiny" / "tiny_unet.yaml"),
                                      f"data.path={synthetic_shards}", f"trainer.storage_path={tmp_path}",
                                      "trainer.resources_per_worker={ssd: 1}"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: trainer.resources_per_worker.ssd: no node of the running cluster has a resource named 'ssd'")
    free = ray_session.available_resources()["CPU"]
    hog = placement_group([{"CPU": free - 0.5}])  # half a CPU left for the datasets, none for the workers
    assert hog.wait(30)
    cfg = tiny_config([f"data.path={synthetic_shards}", f"trainer.storage_path={tmp_path}", "trainer.num_workers=1",
                       "trainer.resources_per_worker={CPU: 1}", "trainer.placement_timeout_s=3"])
    try:
        with pytest.raises(PlacementTimeout) as info:
            train(cfg, progress=False)
    finally:
        remove_placement_group(hog)
    message = str(info.value)
    assert message.startswith("trainer.placement_timeout_s: Ray could not place 1 worker(s) x {CPU: 1} (pack "
                              "placement) within 3 s; the cluster has {CPU: 4") and "free now" in message
