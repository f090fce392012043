"""Workers Ray can place, or one line that says why not: checked before a run starts, and bounded while it waits.

Ray places a worker group only when nodes hold every worker's bundle (its `resources_per_worker`, plus GPU: 1
with `use_gpu`); until then it waits without a word, and Ray Train V2 retries a worker group that did not start
in 60 s without end (its controller failures are unlimited by default). So:

- before the trainer starts, `check_cluster` compares the request with the nodes the cluster has now (their
  totals, not what is free): a resource name no node has, or a bundle no node (or not enough nodes, for the
  placement strategy) can hold, is a `PlacementError` (exit 2) naming what was asked and what the cluster
  offers. A cluster with an autoscaler may add nodes, so there only the names are checked, against the node
  types it may start too.
- while the run waits, `placement_timeout` sets Ray Train's own knob (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S,
  passed from the driver to its controller) to the config's timeout, and `failure_config` stops the controller
  from retrying past it: a group still unplaced after the timeout ends the run with a `PlacementTimeout`, which
  names the request and what the cluster has, in total and free.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # ray.train.v2._internal.constants
_BYTES = ("memory", "object_store_memory")


class PlacementError(ValueError):
    """The running cluster cannot hold the workers asked for: the user's request, not a failure (exit 2)."""


class PlacementTimeout(RuntimeError):
    """The workers were not placed within the configured time."""


@dataclass(frozen=True)
class WorkerRequest:
    num_workers: int
    bundle: dict[str, float]  # one worker's resources, as Ray asks for them
    strategy: str  # Ray's placement strategy: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD
    key: str  # where the request is configured, for messages: "trainer" (both training commands), "" for top-level keys
    timeout_s: float | None = None
    field: str = "resources_per_worker"  # the key of `key` that sets `bundle`, for messages

    @classmethod
    def of(cls, num_workers: int, use_gpu: bool, resources: dict[str, float], strategy: str = "PACK",
           key: str = "trainer", timeout_s: float | None = None) -> WorkerRequest:
        bundle = dict(resources)
        if use_gpu:
            bundle.setdefault("GPU", 1.0)  # what Ray's ScalingConfig adds
        return cls(num_workers, bundle, strategy.upper(), key, timeout_s)

    def option(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def __str__(self) -> str:
        return f"{self.num_workers} worker(s) x {_amounts(self.bundle)} ({self.strategy.lower()} placement)"


def _amounts(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in sorted(resources.items()) if not k.startswith("node:")}
    return "{" + ", ".join(f"{k}: {v / 2**30:.1f} GiB" if k in _BYTES else f"{k}: {v:g}"
                           for k, v in shown.items()) + "}"


def _capacity(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many bundles fit on a node of these total resources."""
    return min((math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in bundle.items()), default=0)


def check_fits(request: WorkerRequest, nodes: list[dict[str, float]], autoscaled: dict[str, float] | None) -> None:
    """PlacementError unless `nodes` (each node's total resources) can ever hold the request. `autoscaled`: the
    largest amounts the cluster's autoscaler may bring (None without one): then only names are checked."""
    offered = sorted({name for node in nodes for name in node} | set(autoscaled or {}))
    offer = "; ".join(_amounts(node) for node in nodes) or "no nodes"
    for name in request.bundle:
        if name not in offered:
            raise PlacementError(
                f"{request.option(request.field)}.{name}: no node of the running cluster has a resource "
                f"named {name!r}, so Ray would wait for it forever; the cluster's nodes offer {offer}")
    if autoscaled is not None:
        return
    fits = [_capacity(node, request.bundle) for node in nodes]
    if not any(fits):
        why = "no node can hold one worker"
    elif request.strategy == "STRICT_PACK" and max(fits) < request.num_workers:
        why = f"strict_pack puts them on one node, and no node holds more than {max(fits)}"
    elif request.strategy == "STRICT_SPREAD" and sum(f > 0 for f in fits) < request.num_workers:
        why = f"strict_spread puts each on its own node, and {sum(f > 0 for f in fits)} node(s) can hold one"
    elif sum(fits) < request.num_workers:
        why = f"the nodes hold {sum(fits)} such worker(s) together"
    else:
        return
    fix = (f"lower {request.option('num_workers')} or the resources per worker" if request.field == "resources_per_worker"
           else f"lower {request.option(request.field)}")
    raise PlacementError(f"{request.option(request.field)}: {request} cannot be placed: {why}; the "
                         f"cluster's nodes offer {offer}; {fix}, or add nodes")


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def _autoscaler_maximum() -> dict[str, float] | None:
    from ray._private import state  # what Ray Train's own check reads (worker_group.py)

    try:
        return state.state.get_max_resources_from_cluster_config() or None
    except Exception:  # noqa: BLE001 - no autoscaler state to read: a fixed cluster
        return None


def check_cluster(request: WorkerRequest) -> None:
    """`check_fits` against the running cluster (after `start_ray`)."""
    check_fits(request, _alive_nodes(), _autoscaler_maximum())


def failure_config(request: WorkerRequest, max_failures: int):
    """Ray Train's FailureConfig: worker failures as configured; a worker group that cannot start is not
    retried when there is a placement timeout (Ray would retry it without end)."""
    from ray.train import FailureConfig

    return FailureConfig(max_failures=max_failures, controller_failure_limit=-1 if request.timeout_s is None else 0)


def _is_start_timeout(err: BaseException) -> bool:
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    return isinstance(getattr(err, "controller_failure", None), WorkerGroupStartupTimeoutError)


@contextmanager
def placement_timeout(request: WorkerRequest) -> Iterator[None]:
    """Around `trainer.fit()`: Ray Train waits at most `request.timeout_s` to place the workers, then the run ends
    with a PlacementTimeout naming the request and the cluster's total and free resources."""
    if request.timeout_s is None:
        yield
        return
    before = os.environ.get(START_TIMEOUT_ENV)
    os.environ[START_TIMEOUT_ENV] = str(request.timeout_s)
    try:
        yield
    except Exception as err:
        if not _is_start_timeout(err):
            raise
        import ray

        raise PlacementTimeout(
            f"{request.option('placement_timeout_s')}: Ray could not place {request} within "
            f"{request.timeout_s:g} s; the cluster has {_amounts(ray.cluster_resources())} in all, "
            f"{_amounts(ray.available_resources())} free now (other jobs hold the rest, or nodes are still "
            f"starting); free them, or raise {request.option('placement_timeout_s')} (null waits without end)"
        ) from None
    finally:
        if before is None:
            os.environ.pop(START_TIMEOUT_ENV, None)
        else:
            os.environ[START_TIMEOUT_ENV] = before
