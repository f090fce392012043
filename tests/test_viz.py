"""Pictures: the labelled sweep grid keeps every sample pixel and writes its labels in full."""

import numpy as np

from facediff.viz import labelled_grid


def _tiles(n: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_narrow_tiles_are_enlarged_pixel_for_pixel_so_labels_fit():
    images = _tiles(6, 32)
    labels = ["as is", "glasses", "hat", "blond", "black", "pale"]
    pad, header = 2, 14
    canvas = np.asarray(labelled_grid(images, ncols=6, column_labels=labels, pad=pad, header=header))
    assert canvas.shape == (header + 64 + 2 * pad, 6 * (64 + pad) + pad, 3)  # one row of 2x tiles
    second = canvas[header + pad: header + pad + 64, pad + 66: pad + 66 + 64]
    assert np.array_equal(second, images[1].repeat(2, 0).repeat(2, 1))  # blocks, nothing interpolated


def test_tiles_wide_enough_keep_their_size():
    images = _tiles(4, 64)
    canvas = np.asarray(labelled_grid(images, ncols=2, column_labels=["as is", "glasses"], pad=2, header=14))
    assert canvas.shape == (14 + 2 * (64 + 2) + 2, 2 * (64 + 2) + 2, 3)
    assert np.array_equal(canvas[14 + 2: 14 + 66, 2: 66], images[0])
