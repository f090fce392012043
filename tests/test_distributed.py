"""facediff.train.distributed on the CPU: collectives on the device the process group serves, exact reductions
without one, per-rank dropout from one seed, and the first non-finite step kept on the device."""

import pytest
import torch
from torch import nn

from facediff.tasks import build_task
from facediff.train import distributed


# ------------------------------------------------------------------------------------- collectives on device
class ReduceCalled(Exception):
    """Raised by `fake_process_group`'s all_reduce: a meta tensor holds no values to go on with."""


def fake_process_group(monkeypatch, devices: list):
    """A two-rank process group whose all_reduce notes the device of what it is given (then raises ReduceCalled)."""
    def all_reduce(tensor, *args, **kwargs):
        devices.append(tensor.device.type)
        raise ReduceCalled

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)


def test_loss_means_are_reduced_on_the_workers_device(monkeypatch):
    """Under NCCL a CPU tensor cannot be reduced: the values must travel on the worker's device ("meta" stands in
    for the GPU here)."""
    devices = []
    fake_process_group(monkeypatch, devices)
    with pytest.raises(ReduceCalled):
        distributed.mean_across_ranks({"loss": 0.5, "loss_mse": 0.25}, torch.device("meta"))
    assert devices == ["meta"]  # one collective for all values, on that device


def test_reductions_are_exact_without_a_process_group():
    assert distributed.mean_across_ranks({"loss": 0.5}, "cpu") == {"loss": 0.5}
    (total,) = distributed.sum_across_ranks([torch.tensor([1.0, 2.0])], "cpu")
    assert total.tolist() == [1.0, 2.0]


# ---------------------------------------------------------------------------------------- per-rank dropout
def test_ranks_draw_different_dropout_but_build_identical_weights(tiny_config):
    cfg = tiny_config(["model.dropout=0.5"])
    weights, masks = [], []
    for rank in (0, 1):
        distributed.seed_worker_rng(cfg.trainer.seed, rank)
        task = build_task(cfg)
        weights.append(torch.cat([p.detach().flatten() for p in task.parameters()]))
        masks.append(nn.functional.dropout(torch.ones(1000), 0.5, training=True))
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(masks[0], masks[1])
    distributed.seed_worker_rng(cfg.trainer.seed, 1)  # and each rank's stream is reproducible
    assert torch.equal(nn.functional.dropout(torch.ones(1000), 0.5, training=True), masks[1])


def test_first_nonfinite_keeps_the_first_bad_step_on_the_device():
    from facediff.train.distributed import FirstNonFinite

    watch = FirstNonFinite("cpu")
    for step, loss in enumerate([0.5, 0.4, 0.3], start=1):
        watch.note(torch.tensor(loss), step)
    assert watch.first() is None  # finite losses only
    for step, loss in [(4, float("nan")), (5, 0.2), (6, float("inf"))]:
        watch.note(torch.tensor(loss), step)
    assert watch.first() == 4 and watch.step.device.type == "cpu"  # the first bad step, not the last
