"""`prepare celebamask` on generated synthetic trees: every record checked against the generator's truth."""

import io
import json
import logging
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from facediff.cli.main import app
from facediff.data import celebamask
from facediff.data.prepare.annotations import AnnotationError
from facediff.data.celebamask import PART_LABELS, mask_path, paint_label_map
from facediff.data.prepare.celebamask import DatasetLayoutError, assign_splits, load_label_map, prepare_celebamask
from facediff.data.shards import read_manifest, shard_paths
from facediff.data.synthetic.celebamask import render_face

from conftest import CELEBAMASK_TREE, REPO

N, SIZE, SEED = CELEBAMASK_TREE["n"], CELEBAMASK_TREE["size"], CELEBAMASK_TREE["seed"]


@pytest.fixture
def tree(synthetic_celebamask):
    return synthetic_celebamask()


def read_split(dataset, split):
    rows = []
    for path in shard_paths(dataset, split):
        rows += pq.read_table(path).to_pylist()
    return rows


def prepare(root, out, **kw):
    kw = {"image_size": SIZE, "mask_size": SIZE // 2, "rows_per_shard": 8, "workers": 2, "progress": False} | kw
    return prepare_celebamask(root, out, **kw)


def test_every_record_matches_generator_truth(tree, tmp_path):
    manifest = prepare(tree, tmp_path / "out")
    splits = assign_splits(list(range(N)), None, 300, None, seed=0)
    assert manifest["counts"] == {"train": N - 4, "test": 4}  # test set scaled to a tenth for tiny inputs
    assert manifest["skipped"] == [] and manifest["split_method"] == "seeded"
    assert manifest["source_sizes"] == {"image": {"64x64": N}, "mask": {"32x32": N}}
    assert manifest["upsampled"] == {"images": 0, "masks": 0}
    for split in ("train", "test"):
        rows = read_split(tmp_path / "out", split)
        assert [r["id"] for r in rows] == splits[split]
        assert all(f["rows"] <= 8 for f in manifest["shards"][split])
        for r in rows:
            truth = render_face(r["id"], size=SIZE, seed=SEED)
            assert r["split"] == split
            assert r["attributes"] == truth.attributes.tolist()
            parts = np.asarray(Image.open(io.BytesIO(r["parts"])))
            assert parts.dtype == np.uint8 and parts.shape == (SIZE // 2, SIZE // 2)
            np.testing.assert_array_equal(parts, paint_label_map(truth.part_masks, parts.shape))
            image = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")).astype(int)
            assert image.shape == (SIZE, SIZE, 3)
            assert np.abs(image - truth.image.astype(int)).mean() < 8  # two JPEG round trips
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["schema_version"] == 1 and on_disk["counts"] == manifest["counts"]


def test_upsampling_is_counted_warned_once_and_in_the_manifest(tree, tmp_path, caplog):
    """64 px faces stored at 128 px: the user is told how many, from what size to what, once."""
    with caplog.at_level(logging.WARNING, logger="facediff"):
        manifest = prepare(tree, tmp_path / "out", image_size=128, mask_size=32, train_size=10)
    stored = 10 + 4
    assert manifest["upsampled"] == {"images": stored, "masks": 0}
    assert manifest["source_sizes"] == {"image": {"64x64": stored}, "mask": {"32x32": stored}}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["upsampled"]["images"] == stored
    warnings = [r.getMessage() for r in caplog.records if "upsampled" in r.getMessage()]
    assert warnings == [f"{stored} of {stored} images were upsampled from 64x64 to 128x128: the source is smaller "
                        "than --image-size 128, so the shards hold no more detail than it (manifest.json: "
                        "'upsampled', 'source_sizes')"]


def test_splits_fixed_nested_and_disjoint():
    ids = list(range(1000))
    small = assign_splits(ids, None, 300, 270, seed=0)
    full = assign_splits(ids, None, 300, None, seed=0)
    assert small["test"] == full["test"] and len(full["test"]) == 100
    assert set(small["train"]) <= set(full["train"]) and len(small["train"]) == 270
    assert not set(full["test"]) & set(full["train"]) and len(full["train"]) == 900
    assert assign_splits(ids, None, 300, 270, seed=1)["test"] != small["test"]
    official = list(range(0, 1000, 7))
    split = assign_splits(ids, official, 300, None, seed=0)
    assert set(split["test"]) <= set(official) and not set(official) & set(split["train"])
    with pytest.raises(ValueError, match="--train-size 5000"):
        assign_splits(ids, None, 300, 5000, seed=0)


def test_official_partition_is_used_when_present(synthetic_celebamask, tmp_path):
    root = synthetic_celebamask(n=30, size=32, with_partition=True)
    manifest = prepare(root, tmp_path / "out", image_size=32, mask_size=16)
    assert manifest["split_method"] == "official"
    mapping = dict(line.split()[::2] for line in (root / celebamask.MAPPING_FILE).read_text().splitlines()[1:])
    partition = dict(line.split() for line in (root / celebamask.PARTITION_FILE).read_text().splitlines())
    test_ids = [r["id"] for r in read_split(tmp_path / "out", "test")]
    assert test_ids and all(partition[mapping[str(i)]] == "2" for i in test_ids)
    assert all(partition[mapping[str(r["id"])]] != "2" for r in read_split(tmp_path / "out", "train"))


def test_bad_files_are_skipped_and_listed(tree, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(tree, root)
    corrupt_image = celebamask.image_path(root, 5)
    corrupt_image.write_bytes(corrupt_image.read_bytes()[:300])  # truncated JPEG
    celebamask.image_path(root, 6).unlink()
    skin = mask_path(root, 7, "skin")
    skin.write_bytes(b"not a png")
    for part in celebamask.PART_NAMES:
        mask_path(root, 8, part).unlink(missing_ok=True)
    manifest = prepare(root, tmp_path / "out")
    reasons = {s["id"]: (s["file"], s["reason"]) for s in manifest["skipped"]}
    assert sorted(reasons) == [5, 6, 7, 8]
    assert reasons[5] == (str(corrupt_image), reasons[5][1]) and "corrupt or truncated" in reasons[5][1]
    assert reasons[6][1] == "image file missing"
    assert reasons[7][0] == str(skin) and "unreadable mask" in reasons[7][1]
    assert reasons[8][1] == "no part mask files found" and "00008_*.png" in reasons[8][0]
    kept = [r["id"] for s in ("train", "test") for r in read_split(tmp_path / "out", s)]
    assert sorted(kept) == [i for i in range(N) if i not in (5, 6, 7, 8)]  # every good record is kept


def test_layout_and_annotation_errors_stop_the_job(tree, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(tree, root)
    attr = root / celebamask.ATTRIBUTE_FILE
    lines = attr.read_text().splitlines()
    lines[4] = lines[4].rsplit(" ", 1)[0] + " 2"
    attr.write_text("\n".join(lines) + "\n")
    with pytest.raises(AnnotationError, match=rf"{attr}:5: attribute values must be 1 or -1"):
        prepare(root, tmp_path / "out")
    result = CliRunner().invoke(app, ["prepare", "celebamask", str(root), str(tmp_path / "out")])
    assert result.exit_code == 2 and f"{attr}:5" in result.output
    shutil.rmtree(root / celebamask.MASK_DIR)
    with pytest.raises(DatasetLayoutError, match=rf"{root / celebamask.MASK_DIR}: required folder not found"):
        prepare(root, tmp_path / "out")


def test_existing_dataset_is_not_overwritten_by_accident(tree, tmp_path):
    prepare(tree, tmp_path / "out", train_size=10)
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare(tree, tmp_path / "out")
    manifest = prepare(tree, tmp_path / "out", train_size=20, overwrite=True)
    assert manifest["counts"]["train"] == 20 and read_manifest(tmp_path / "out")["counts"]["train"] == 20


def test_parts_painted_in_official_order(tmp_path):
    """Later parts cover earlier ones; 1- and 3-channel mask files read alike."""
    size = 16
    masks = {
        "skin": np.ones((size, size), bool),
        "nose": np.zeros((size, size), bool),
        "hair": np.zeros((size, size), bool),
        "hat": np.zeros((size, size), bool),
    }
    masks["nose"][6:10, 6:10] = True
    masks["hair"][:8] = True  # covers the top of the nose: hair (13) is painted after nose (2)
    masks["hat"][:3] = True  # hat (14) is painted after hair
    for k, (part, mask) in enumerate(masks.items()):
        path = mask_path(tmp_path, 0, part)
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = mask.astype(np.uint8) * 255
        Image.fromarray(np.stack([pixels] * 3, -1) if k % 2 else pixels).save(path)
    label_map = load_label_map(tmp_path, 0)
    assert label_map[0, 0] == PART_LABELS["hat"] and label_map[5, 0] == PART_LABELS["hair"]
    assert label_map[7, 7] == PART_LABELS["hair"] and label_map[9, 7] == PART_LABELS["nose"]
    assert label_map[15, 15] == PART_LABELS["skin"]
    np.testing.assert_array_equal(label_map, paint_label_map(masks, (size, size)))


def test_ray_job_entry_point_runs_the_same_preparation(tmp_path):
    """`ray job submit ... -- python ray_jobs/prepare.py ...` runs the CLI's code as a plain script."""
    import subprocess
    import sys

    script = REPO / "ray_jobs" / "prepare.py"
    run = lambda *args: subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)  # noqa: E731
    made = run("synthetic", str(tmp_path / "raw"), "--n", "12", "--size", "32", "--workers", "1")
    assert made.returncode == 0, made.stderr
    done = run("celebamask", str(tmp_path / "raw"), str(tmp_path / "out"), "--image-size", "32", "--mask-size", "16")
    assert done.returncode == 0, done.stderr
    assert read_manifest(tmp_path / "out")["counts"] == {"train": 11, "test": 1}
    bad = run("celebamask", str(tmp_path / "nowhere"), str(tmp_path / "out2"))
    assert bad.returncode == 2 and "required folder not found" in bad.stderr
