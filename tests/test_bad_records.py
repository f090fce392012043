"""Bad data met mid-run (`facediff/data/stream/bad_records.py`): records that do not decode are skipped, named and
counted up to `data.max_bad_records`; a truncated shard and an output folder under a file are one line, exit 2.
The run that completes over skipped records is `test_train.py`'s non-finite-loss run (on `with_corrupt_images`)."""

import logging
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facediff.data.stream.bad_records import SHARD_FILE_COLUMN, BadRecordWatch, TooManyBadRecords
from facediff.data.shards import shard_paths
from facediff.data.stream.dataset import decode_batch

from test_cli_errors import TINY, invoke, user_error


def with_corrupt_images(shards, out, split="train"):
    """A copy of a prepared dataset whose every `split` shard holds one record with a cut-off JPEG (its first
    row; shards are one row group each here, so every read task and decode call meets one). Returns the copy and
    {corrupt id: its shard file}."""
    shutil.copytree(shards, out)
    corrupt = {}
    for path in shard_paths(out, split):
        table = pq.read_table(path)
        images = table["image"].to_pylist()
        images[0] = images[0][: len(images[0]) // 3]
        table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
        pq.write_table(table, path, row_group_size=table.num_rows)
        corrupt[table["id"][0].as_py()] = path
    return out, corrupt


def numpy_rows(path):
    table = pq.read_table(path)
    rows = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
    return rows | {SHARD_FILE_COLUMN: np.full(table.num_rows, path, dtype=object)}


def test_a_corrupt_jpeg_is_skipped_and_named(synthetic_shards, tmp_path, caplog):
    dataset, corrupt = with_corrupt_images(synthetic_shards, tmp_path / "shards")
    path = shard_paths(dataset, "train")[0]
    rows = numpy_rows(path)
    (bad_id,) = [i for i in rows["id"] if i in corrupt]
    with caplog.at_level(logging.WARNING, logger="facediff.data"):
        out = decode_batch(rows, image_size=32, hflip=True, seed=0, epoch=0)
    assert out["id"].tolist() == [i for i in rows["id"].tolist() if i != bad_id]
    assert all(len(v) == len(rows["id"]) - 1 for v in out.values())
    assert f"record {bad_id} of {path} does not decode" in caplog.text


def test_past_the_limit_the_watch_stops_naming_the_files():
    watch = BadRecordWatch(None, limit=2, rank=0)
    watch.summary = {"count": 3, "files": ["/d/train/part-00001.parquet"], "records": []}
    watch.check(2)  # at the limit: the run goes on
    with pytest.raises(TooManyBadRecords, match=r"^3 records did not decode, more than data.max_bad_records=2, "
                                                r"in /d/train/part-00001.parquet \(ids in logs/rank0.log\)"):
        watch.check(3)
    watch.summary["files"] = [f"/data/shards/train/part-{i:05d}.parquet" for i in range(40)]
    with pytest.raises(TooManyBadRecords, match=r"in /data/shards/train: part-00000.parquet, part-00001.parquet, "
                                                r"part-00002.parquet and 37 more \(") as stopped:
        watch.check(40)
    assert len(str(stopped.value)) < 250  # Ray Train shows a worker's traceback's last 500 characters only


def test_truncated_shard_is_named_before_ray_starts(synthetic_shards, tmp_path, monkeypatch):
    dataset = tmp_path / "shards"
    shutil.copytree(synthetic_shards, dataset)
    path = shard_paths(dataset, "train")[2]
    with open(path, "r+b") as f:
        f.truncate(700)
    monkeypatch.setattr("facediff.train.run.init_ray", lambda cfg: pytest.fail("Ray started"))
    user_error(invoke("train", TINY, f"data.path={dataset}", f"trainer.storage_path={tmp_path / 'runs'}"),
               path, "not a whole Parquet file")


def test_output_folder_under_a_file(synthetic_celebamask, synthetic_shards, tmp_path):
    blocker = tmp_path / "some_file"
    blocker.write_text("")
    out = blocker / "out"
    for args in (("prepare", "celebamask", synthetic_celebamask(), out), ("prepare", "coco", tmp_path, out),
                 ("prepare", "latents", synthetic_shards, out / "deeper", "--preset", "tiny_vq"),
                 ("prepare", "synthetic", out),
                 ("train", TINY, f"data.path={synthetic_shards}", f"trainer.storage_path={out}")):
        line = user_error(invoke(*args), blocker)
        assert "is a file" in line, line


@pytest.mark.ray
def test_a_run_past_max_bad_records_stops_naming_the_file(synthetic_shards, tmp_path, ray_session):
    from facediff.config import load_config
    from facediff.train.run_log import read_metrics
    from facediff.train.run import train

    dataset, corrupt = with_corrupt_images(synthetic_shards, tmp_path / "shards")
    cfg = load_config(TINY, [f"data.path={dataset}", f"trainer.storage_path={tmp_path / 'runs'}",
                             "trainer.run_name=run", "trainer.batch_size=4", "trainer.total_kimg=0.016",
                             "trainer.log_every_steps=1", "data.max_bad_records=0"])
    with pytest.raises(Exception, match=r"\n\S*TooManyBadRecords: \d records did not decode, more than "
                                        r"data.max_bad_records=0, in \S+/shards/train: part-\d+\.parquet"):
        train(cfg)
    (row,) = read_metrics(tmp_path / "runs" / "run")  # the first log stopped it, with the count it stopped at
    assert row["step"] == 1 and 1 <= row["bad_records"] <= len(corrupt)
