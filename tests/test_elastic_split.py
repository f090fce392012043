"""Elastic runs' batch rule without Ray (`config/elastic.py`, `train/elastic.py`): the global batch of the maximum
worker count split exactly at every size, or the config refused with one line naming the keys."""

import pytest
from typer.testing import CliRunner

from facediff.cli.main import app
from facediff.config import dump_config, load_config
from facediff.config.elastic import NoExactSplit, split_global_batch
from facediff.train.elastic import for_world, scaling_workers

from conftest import REPO

TINY = REPO / "configs" / "experiments" / "tiny" / "tiny_unet.yaml"


@pytest.mark.parametrize("global_batch, world, max_micro, split", [
    (16, 2, 8, (8, 1)),  # the full size: the configured micro-batch
    (16, 1, 8, (8, 2)),  # half the workers: twice the accumulation, the same micro-batch
    (12, 4, 4, (3, 1)),  # 3 a worker fits in one micro-batch of at most 4
    (24, 2, 5, (4, 3)),  # 12 a worker: the fewest micro-batches of at most 5 that divide it exactly
    (7, 1, 2, (1, 7)),  # a prime share: micro-batches of 1
])
def test_split_keeps_the_global_batch(global_batch, world, max_micro, split):
    micro, accum = split_global_batch(global_batch, world, max_micro)
    assert (micro, accum) == split and micro * accum * world == global_batch and micro <= max_micro


def test_split_without_an_exact_one_is_refused():
    with pytest.raises(NoExactSplit, match="16 images does not divide among 3 workers"):
        split_global_batch(16, 3, 8)


def test_elastic_config_recomputes_the_batch_per_size_and_round_trips(tmp_path):
    cfg = load_config(TINY, ["trainer.num_workers=[1, 2]", "trainer.batch_size=4", "trainer.grad_accum=2"])
    assert (cfg.trainer.min_workers, cfg.trainer.num_workers) == (1, 2)
    assert scaling_workers(cfg.trainer.num_workers, cfg.trainer.min_workers) == (1, 2)
    sizes = {w: (for_world(cfg, w).trainer.batch_size, for_world(cfg, w).trainer.grad_accum) for w in (1, 2)}
    assert sizes == {1: (4, 4), 2: (4, 2)}  # 16 images a step at both sizes
    assert load_config(TINY, ["trainer.num_workers=[2, 2]"]).trainer.min_workers is None  # one size: fixed
    fixed = load_config(TINY, ["trainer.num_workers=2"])
    assert for_world(fixed, 1) is fixed and scaling_workers(2, None) == 2
    path = tmp_path / "config.yaml"  # the run's recorded config reads back as the same range
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert (again.trainer.min_workers, again.trainer.num_workers) == (1, 2)


@pytest.mark.parametrize("overrides, names", [
    (["trainer.num_workers=[2, 4]", "trainer.batch_size=2"],
     ["trainer.num_workers", "trainer.batch_size", "trainer.grad_accum", "over 3 worker(s)"]),
    (["trainer.num_workers=[3, 1]"], ["trainer.num_workers", "min <= max"]),
    (["trainer.num_workers=[1, 2]", "trainer.zero_stage=3"], ["trainer.num_workers", "trainer.zero_stage"]),
    (["trainer.num_workers=[1, 2]", "trainer.zero_stage=2"], ["trainer.num_workers", "trainer.zero_stage"]),
])
def test_cli_refuses_an_elastic_config_in_one_line(overrides, names):
    result = CliRunner().invoke(app, ["config", str(TINY), *overrides])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and all(name in line for name in names), line
