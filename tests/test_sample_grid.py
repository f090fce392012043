"""Training-time sample grids (`train/sample_grid.py`) without Ray: the loop's pieces on one CPU process."""

import numpy as np
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from conftest import REPO, assert_grids

from facediff.config import load_config
from facediff.data.stream.local_batches import local_test_batches
from facediff.storage import RunStorage
from facediff.tasks import build_task
from facediff.train.ema import EMA
from facediff.train.sample_grid import SampleGrid, draw_grid

TINY = REPO / "configs" / "experiments" / "tiny"
STEPS = 3


def _config(name, shards, overrides=()):
    return load_config(TINY / f"{name}.yaml", [f"data.path={shards}", "eval.sample_grid_steps=2", "eval.batch_size=4",
                                               "trainer.batch_size=4", *overrides])


def _train(cfg, grids=None, tensorboard=None):
    """STEPS optimizer steps on one fixed batch as the loop takes them (a generator for the loss's noise, dropout
    from the global stream, EMA after each step), a grid whenever `grids` is due. Returns the losses and grids."""
    batch = next(iter(local_test_batches(cfg, "train")()))
    torch.manual_seed(5)
    task = build_task(cfg).train()
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-2)
    ema = EMA(task, cfg.trainer.ema)
    generator = torch.Generator().manual_seed(0)
    losses, paths = [], []
    for step in range(1, STEPS + 1):
        loss = task(batch, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(task)
        losses.append(loss.item())
        if grids is not None and grids.due(step, step == STEPS):
            paths.append(grids.write(ema, step, tensorboard))
    return losses, paths


def test_grids_leave_the_losses_alone_and_show_the_same_noise_as_the_weights_change(synthetic_shards, tmp_path):
    # dropout on: the grid must not draw from the global stream the training's dropout reads
    cfg = _config("tiny_unet", synthetic_shards, ["model.dropout=0.2", "trainer.ema.warmup=false",
                                                  "trainer.ema.decay=0.5", "eval.log_images_every_kimg=0.008",
                                                  "model.block_out_channels=[8,16]", "model.norm_num_groups=4"])
    storage = RunStorage(str(tmp_path), "run")
    grids = SampleGrid(cfg, 0, torch.device("cpu"), storage, images_per_step=4)
    assert grids.every == 2  # 8 images at 4 a step
    writer = SummaryWriter(str(storage.local / "tensorboard"))
    with_grids, paths = _train(cfg, grids, writer)
    writer.close()
    without, _ = _train(cfg)
    assert with_grids == without  # bit for bit: the grids change nothing the training draws

    # step 2, and the end (step 3): 8 faces of 32 px on a 3x3 grid
    first, last = assert_grids(storage.local, ["kimg_00000.008.png", "kimg_00000.012.png"], [2, 3],
                               (2 + 3 * 34, 2 + 3 * 34, 3))
    assert [p.parent for p in paths] == [storage.local / "samples"] * 2
    assert not np.array_equal(first, last)  # the EMA moved between them
    # the fixed noise bank: the same weights draw the same grid, whatever was drawn in between
    again = draw_grid(grids.task, cfg, grids.conditions)
    torch.randn(100)
    assert np.array_equal(again, draw_grid(grids.task, cfg, grids.conditions))
    assert np.array_equal(np.asarray(Image.open(paths[-1]))[2:34, 2:34], again[0])


def test_conditional_grids_draw_the_first_test_records_every_time(synthetic_shards, tmp_path):
    cfg = _config("tiny_lc_unet_seg", synthetic_shards, ["eval.sample_grid=6", "eval.sample_grid_steps=1"])
    storage = RunStorage(str(tmp_path), "run")
    grids = SampleGrid(cfg, 0, torch.device("cpu"), storage, images_per_step=4, task=build_task(cfg).eval())
    records = next(iter(local_test_batches(cfg)()))  # the 4 test records, in file order
    order = torch.arange(6) % 4  # cycled: the split is smaller than the grid
    assert torch.equal(grids.conditions["id"], records["id"][order])
    assert torch.equal(grids.conditions["attributes"], records["attributes"][order])
    assert torch.equal(grids.conditions["part_masks"], records["part_masks"][order])

    ema = EMA(grids.task, cfg.trainer.ema)
    one, other = grids.write(ema, 1), grids.write(ema, 250)
    assert (one.name, other.name) == ("kimg_00000.004.png", "kimg_00001.000.png")
    first = np.asarray(Image.open(one))
    assert np.array_equal(first, np.asarray(Image.open(other)))  # same weights, same noise, same records
    # the conditions reach the samples: other attributes, other faces from the same noise
    flipped = {**grids.conditions, "attributes": 1 - grids.conditions["attributes"]}
    assert not np.array_equal(draw_grid(grids.task, cfg, flipped), draw_grid(grids.task, cfg, grids.conditions))
