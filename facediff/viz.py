"""Pictures a person looks at: image grids, coloured part maps, dataset previews."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from facediff.data.celebamask import NUM_PART_CLASSES
from facediff.data.shards import shard_paths

# A fixed palette so the same part has the same colour in every picture (0 = background, black).
PART_PALETTE = np.array(
    [
        [0, 0, 0], [204, 153, 102], [255, 102, 51], [51, 51, 51], [0, 153, 255], [0, 204, 255],
        [102, 51, 0], [153, 76, 0], [255, 204, 153], [230, 180, 130], [128, 0, 64], [255, 0, 102],
        [204, 0, 51], [153, 102, 0], [0, 102, 0], [255, 255, 0], [255, 0, 255], [255, 178, 178], [0, 51, 153],
    ],
    dtype=np.uint8,
)
assert len(PART_PALETTE) == NUM_PART_CLASSES


def colorize_parts(label_map: np.ndarray) -> np.ndarray:
    """(H, W) 19-class labels -> (H, W, 3) uint8 RGB."""
    return PART_PALETTE[np.clip(label_map, 0, NUM_PART_CLASSES - 1)]


def image_grid(images: np.ndarray | list[np.ndarray], ncols: int | None = None, pad: int = 2) -> Image.Image:
    """Tile (N, H, W, 3) uint8 images into one picture, row-major, with a white gutter."""
    images = np.asarray(images)
    n, h, w = images.shape[:3]
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    canvas = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, ncols)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    return Image.fromarray(canvas)


def labelled_grid(images: np.ndarray, ncols: int, column_labels: list[str], pad: int = 2,
                  header: int = 14, max_scale: int = 4) -> Image.Image:
    """`image_grid` with a text label above each column (PIL's built-in font, no font files needed).

    Tiles narrower than their longest label are enlarged by a whole factor (each pixel a square block, nothing
    interpolated; at most `max_scale`), so a 32 px sweep's labels are written in full instead of cut to five
    letters and its faces are large enough to see the edit."""
    from PIL import ImageDraw

    images = np.asarray(images)
    width = images.shape[2]
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widest = max((draw.textlength(label) for label in column_labels[:ncols]), default=0)
    scale = int(min(max_scale, max(1, np.ceil((widest + pad) / width))))
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        width *= scale
    grid = image_grid(images, ncols=ncols, pad=pad)
    canvas = Image.new("RGB", (grid.width, grid.height + header), "white")
    canvas.paste(grid, (0, header))
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(column_labels[:ncols]):
        while len(label) > 1 and draw.textlength(label) > width + pad:  # wider than max_scale allows
            label = label[:-1]
        draw.text((pad + c * (width + pad), 1), label, fill="black")
    return canvas


def preview_dataset(dataset: str | Path, out: str | Path, split: str = "train", n: int = 16) -> Path:
    """A PNG of the first `n` records of a prepared split: each face beside its coloured part map."""
    tiles = []
    for path in shard_paths(dataset, split):
        for row in pq.read_table(path, columns=["image", "parts"]).to_pylist():
            image = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))
            parts = Image.fromarray(colorize_parts(np.asarray(Image.open(io.BytesIO(row["parts"])))))
            parts = np.asarray(parts.resize(image.shape[1::-1], Image.Resampling.NEAREST))
            tiles.append(np.concatenate([image, parts], axis=1))
            if len(tiles) == n:
                break
        if len(tiles) == n:
            break
    if not tiles:
        raise ValueError(f"{dataset}: split {split!r} has no records to preview")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(tiles, ncols=4).save(out)
    return out


def plot_curves(rows: list[dict], out: str | Path, keys: tuple[str, ...] = ("loss", "lr")) -> Path:
    """Training curves against kimg, one panel per metric (image distances are added when present)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    distances = sorted({k for r in rows for k in r if k == "fid" or k.startswith("fd_")})
    panels = [k for k in (*keys, *distances) if any(k in r for r in rows)]
    if not panels:
        raise ValueError("no metrics to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, key in zip(axes[0], panels):
        points = [(r["kimg"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points), marker="o" if len(points) < 20 else None)
        ax.set_xlabel("kimg")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
