"""The Parquet shard contract shared by `prepare`, the Ray Data loader and every later tool.

A prepared dataset folder holds `manifest.json` and one folder per split of bounded-size shards:
`OUT/train/part-00000.parquet`, `OUT/test/part-00000.parquet`, ... Columns:

    id          int64               the CelebA-HQ index
    image       binary              encoded image (JPEG or PNG), image_size x image_size, RGB
    parts       binary              PNG-encoded uint8 19-class label map (0 background, 1..18 PART_NAMES order)
    attributes  fixed list<int8>[40] in {0, 1}, ATTRIBUTE_NAMES order
    split       string              "train" | "test"

Optional latent columns, written by `facediff prepare latents` (`facediff/data/prepare/latents.py`) beside the above:

    latents          fixed list<float16|float32>[C*h*w]   the autoencoder's scaled latents of the stored image,
                                                          C-major (reshape to (C, h, w))
    latents_flipped  same                                 latents of the horizontally mirrored image (optional)

The manifest's `latents` entry describes them: `shape` [C, h, w], `dtype`, `image_size` (the size encoded),
`flipped` (whether `latents_flipped` exists) and the autoencoder that made them. Shards without these columns
(schema version 1 from before they existed) read as before: the columns are additive, so the version is unchanged.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from facediff.data.celebamask import NUM_ATTRIBUTES

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "test")

SHARD_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("image", pa.binary()),
        ("parts", pa.binary()),
        ("attributes", pa.list_(pa.int8(), NUM_ATTRIBUTES)),
        ("split", pa.string()),
    ]
)

LATENTS = "latents"
LATENTS_FLIPPED = "latents_flipped"
LATENT_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


def latent_schema(width: int, dtype: str = "float16", flipped: bool = False, base: pa.Schema = SHARD_SCHEMA) -> pa.Schema:
    """The shard schema (`base`: CelebAMask's, or COCO people's) plus the latent column(s) of `width` = C*h*w
    values each."""
    if dtype not in LATENT_DTYPES:
        raise ValueError(f"latent dtype must be one of {sorted(LATENT_DTYPES)}, got {dtype!r}")
    columns = [LATENTS, LATENTS_FLIPPED] if flipped else [LATENTS]
    schema = base
    for name in columns:
        schema = schema.append(pa.field(name, pa.list_(LATENT_DTYPES[dtype], width)))
    return schema


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ShardWriter:
    """Appends records of one split into shards of at most `rows_per_shard` rows.

    Each shard is written under a temporary name and renamed when full, so an interrupted job never leaves a
    truncated file that looks finished.
    """

    def __init__(self, out: Path, split: str, rows_per_shard: int, row_group_size: int = 64,
                 schema: pa.Schema = SHARD_SCHEMA):
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.folder = Path(out) / split
        self.folder.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.rows_per_shard = rows_per_shard
        self.row_group_size = min(row_group_size, rows_per_shard)
        self.schema = schema
        self.files: list[dict[str, Any]] = []
        self._buffer: list[dict[str, Any]] = []
        self._tables: list[pa.Table] = []  # rows given as Arrow tables (write_table), in order with _buffer

    def _pending(self) -> int:
        return len(self._buffer) + sum(t.num_rows for t in self._tables)

    def write(self, record: dict[str, Any]) -> None:
        self._buffer.append(record)
        if self._pending() >= self.rows_per_shard:
            self._flush()

    def write_table(self, table: pa.Table) -> None:
        """Append rows given as an Arrow table (cast to the schema; avoids a Python object per value)."""
        table = table.select(self.schema.names).cast(self.schema)
        if self._buffer:  # keep the order of rows written before as records
            self._tables.append(pa.Table.from_pylist(self._buffer, schema=self.schema))
            self._buffer = []
        while table.num_rows:
            take = min(table.num_rows, self.rows_per_shard - self._pending())
            self._tables.append(table.slice(0, take))
            table = table.slice(take)
            if self._pending() >= self.rows_per_shard:
                self._flush()

    def close(self) -> list[dict[str, Any]]:
        if self._pending():
            self._flush()
        return self.files

    def _flush(self) -> None:
        name = f"part-{len(self.files):05d}.parquet"
        rows = self._pending()
        tables = self._tables + ([pa.Table.from_pylist(self._buffer, schema=self.schema)] if self._buffer else [])
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        tmp = self.folder / f".{name}.tmp"
        # Small row groups let a reader split one shard across several read tasks.
        pq.write_table(table, tmp, row_group_size=self.row_group_size)
        os.replace(tmp, self.folder / name)
        self.files.append({"path": f"{self.split}/{name}", "rows": rows})
        self._buffer, self._tables = [], []

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(Path(out) / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def read_manifest(dataset: Path) -> dict[str, Any]:
    path = Path(dataset) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no manifest; is {dataset} a folder written by `facediff prepare`?"
        )
    manifest = json.loads(path.read_text())
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {version!r}, this facediff reads {SCHEMA_VERSION}")
    return manifest


def split_rows(dataset: Path, split: str) -> int:
    """Records of one split, as counted in the manifest."""
    return sum(int(entry.get("rows", 0)) for entry in read_manifest(dataset)["shards"].get(split, []))


def check_train_records(dataset: Path, split: str, expected: int | None) -> None:
    """`data.train_records`: the training split holds exactly the data regime the config names (None: any).
    Reads the manifest either way, so a folder that is not a prepared dataset is refused."""
    found = split_rows(dataset, split)
    if expected is not None and found != expected:
        raise ValueError(
            f"data.train_records: the config trains on {expected} records, but {Path(dataset) / MANIFEST} holds "
            f"{found} in split {split!r}; point data.path at a dataset prepared with `--train-size {expected}` "
            "(or change data.train_records)")


def shard_paths(dataset: Path, split: str) -> list[str]:
    """Absolute paths of one split's shards, as listed in the manifest (checked to exist)."""
    manifest = read_manifest(dataset)
    if split not in manifest["shards"]:
        raise ValueError(f"{Path(dataset) / MANIFEST}: no split {split!r} (has {sorted(manifest['shards'])})")
    paths = [str(Path(dataset) / entry["path"]) for entry in manifest["shards"][split]]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{Path(dataset) / MANIFEST} lists shards that do not exist: {missing[:3]}")
    return paths
