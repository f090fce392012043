"""`prepare coco` on a generated COCO-layout tree of people scenes: every record checked against the generator's truth.

No Ray here. The geometry below is written out again on purpose (shorter side to S, centre square), so a drift
in the module's geometry shows up as a mismatch rather than being shared by both sides.
"""

import io
import json
import shutil
from contextlib import redirect_stdout

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from typer.testing import CliRunner

from facediff.cli.main import app
from facediff.data import shards
from facediff.data.prepare.coco import (COCO_SHARD_SCHEMA, DEFAULT_MIN_PERSON_AREA, CocoAnnotationError, captions_path,
                                image_path, instances_path, prepare_coco)
from facediff.data.prepare.celebamask import DatasetLayoutError
from facediff.data.synthetic.coco import PEOPLE_MIN_AREA, SMALL_MAX_AREA, read_truth, render_scene

from conftest import COCO_TREE

SIZE, SEED, VAL_FRACTION = COCO_TREE["size"], COCO_TREE["seed"], COCO_TREE["val_fraction"]
S = 128
FACE_SHARE = 0.7  # claimed share of kept images with >= 1 face box (measured 11/12 at this size, 48/48 at 640)


@pytest.fixture(scope="module")
def tree(synthetic_coco):
    return synthetic_coco()


@pytest.fixture(scope="module")
def prepared(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "out"
    manifest = prepare_coco(tree, out, image_size=S, rows_per_shard=4, workers=2, progress=False)
    return out, manifest


@pytest.fixture(scope="module")
def truth(tree):
    return {t["id"]: t for t in read_truth(tree)}


def rows_of(out, split):
    return [r for path in shards.shard_paths(out, split) for r in pq.read_table(path).to_pylist()]


def square(width, height):
    """(x scale, y scale, left, top) of the reference geometry."""
    short = min(width, height)
    w, h = max(S, round(width * S / short)), max(S, round(height * S / short))
    return w / width, h / height, (w - S) // 2, (h - S) // 2


def to_square(xyxy, width, height):
    sx, sy, left, top = square(width, height)
    x0, y0, x1, y1 = xyxy
    return [min(max(v, 0.0), S) for v in (x0 * sx - left, y0 * sy - top, x1 * sx - left, y1 * sy - top)]


def crop_like_prepare(pil, width, height, resample):
    sx, sy, left, top = square(width, height)
    return pil.resize((round(width * sx), round(height * sy)), resample).crop((left, top, left + S, top + S))


def expected_persons(scene):
    """Non-crowd persons in annotation-id order whose box keeps an area in the square, with that box."""
    kept = []
    for p in sorted(scene["persons"], key=lambda p: p["id"]):
        x, y, w, h = p["bbox"]
        box = to_square([x, y, x + w, y + h], scene["width"], scene["height"])
        if box[2] > box[0] and box[3] > box[1]:
            kept.append((p, box))
    return kept


def polygon_map(scene, kept):
    """The label map drawn from the truth polygons directly in the square (crowd 255 under the persons)."""
    sx, sy, left, top = square(scene["width"], scene["height"])
    labels = np.zeros((S, S), np.uint8)
    for crowd in scene["crowd"]:
        rle = mask_utils.frPyObjects({"counts": crowd["counts"], "size": crowd["size"]}, *crowd["size"])
        source = Image.fromarray(mask_utils.decode(rle) * 255)
        labels[np.asarray(crop_like_prepare(source, scene["width"], scene["height"], Image.NEAREST)) > 0] = 255
    for k, (p, _) in enumerate(kept, 1):
        canvas = Image.new("L", (S, S), 0)
        for poly in p["polygons"]:
            xy = np.reshape(poly, (-1, 2)) * [sx, sy] - [left, top]
            ImageDraw.Draw(canvas).polygon([tuple(v) for v in xy], fill=1)
        labels[np.asarray(canvas) > 0] = k
    return labels


def test_generator_truth_is_usable(tree, truth):
    areas = [t["person_area"] for t in truth.values()]
    # The threshold test below is only meaningful if no scene sits near the default threshold.
    assert all(a == 0 or a <= SMALL_MAX_AREA or a >= PEOPLE_MIN_AREA for a in areas)
    assert SMALL_MAX_AREA < DEFAULT_MIN_PERSON_AREA < PEOPLE_MIN_AREA
    kinds = {t["kind"] for t in truth.values()}
    assert kinds == {"people", "edge", "none", "crowd", "small"}
    assert {(t["width"] > t["height"]) for t in truth.values()} == {True, False}  # landscape and portrait
    pixels, again = render_scene(5, SIZE, SEED, VAL_FRACTION)
    assert again == truth[again["id"]] and np.array_equal(pixels, render_scene(5, SIZE, SEED, VAL_FRACTION)[0])
    for split in ("train", "val"):
        with redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = COCO(str(instances_path(tree, split)))
        assert {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())} == {
            1: "person", 37: "sports ball", 62: "chair"}
        for image in coco.dataset["images"]:
            with Image.open(image_path(tree, split, image["id"])) as im:
                assert im.size == (image["width"], image["height"])
    # Ids and captions are written shuffled, so a reader keeping file order would fail the record test.
    captions = json.loads(captions_path(tree, "train").read_text())["annotations"]
    assert [c["id"] for c in captions] != sorted(c["id"] for c in captions)


def test_schema_and_manifest(prepared, truth):
    out, manifest = prepared
    assert manifest == shards.read_manifest(out)
    assert manifest["kind"] == "coco_people" and manifest["splits"] == ["train", "val"]
    assert manifest["image_size"] == S and manifest["options"]["min_person_area"] == DEFAULT_MIN_PERSON_AREA
    assert manifest["images_per_second"] > 0 and manifest["skipped"] == []
    for split in ("train", "val"):
        scenes = [t for t in truth.values() if t["split"] == split]
        assert manifest["images_listed"][split] == len(scenes)
        assert manifest["excluded"][split] == {
            "no_person": sum(t["kind"] == "none" for t in scenes),
            "below_min_person_area": sum(0 < t["person_area"] < DEFAULT_MIN_PERSON_AREA for t in scenes),
            "skipped": 0}
        table = manifest["person_area_at_least"][split]
        assert table["0.1"] == manifest["counts"][split]
        assert table["0.01"] == sum(t["person_area"] >= 0.01 for t in scenes)
        for entry in manifest["shards"][split]:
            assert entry["rows"] <= 4
            assert pq.read_schema(out / entry["path"]).remove_metadata() == COCO_SHARD_SCHEMA


def test_every_record_matches_truth(tree, prepared, truth):
    out, manifest = prepared
    seen_edge = seen_crowd = False
    for split in ("train", "val"):
        rows = rows_of(out, split)
        scenes = [t for t in truth.values() if t["split"] == split]
        kept_ids = sorted(t["id"] for t in scenes if t["person_area"] >= DEFAULT_MIN_PERSON_AREA)
        assert [r["id"] for r in rows] == kept_ids and manifest["counts"][split] == len(rows)
        for r in rows:
            scene = truth[r["id"]]
            assert r["split"] == split
            assert r["captions"] == [c["caption"] for c in sorted(scene["captions"], key=lambda c: c["id"])]
            kept = expected_persons(scene)
            np.testing.assert_allclose(r["person_boxes"], [box for _, box in kept], atol=1e-3)
            labels = np.asarray(Image.open(io.BytesIO(r["persons"])))
            assert labels.shape == (S, S) and labels.dtype == np.uint8
            assert set(np.unique(labels)) <= {0, 255, *range(1, len(kept) + 1)}
            drawn = polygon_map(scene, kept)
            for k in [*range(1, len(kept) + 1), *([255] if scene["crowd"] else [])]:
                a, b = labels == k, drawn == k
                assert (a & b).sum() / (a | b).sum() > 0.8, (r["id"], k)
            seen_edge |= scene["kind"] == "edge" and len(kept) == len(scene["persons"]) - 1
            seen_crowd |= bool(scene["crowd"]) and (labels == 255).sum() > 50
            with Image.open(tree / f"{split}2017" / scene["file_name"]) as source:
                reference = crop_like_prepare(source.convert("RGB"), scene["width"], scene["height"], Image.LANCZOS)
            image = Image.open(io.BytesIO(r["image"]))
            assert image.format == "JPEG" and image.size == (S, S)
            assert np.abs(np.asarray(image, int) - np.asarray(reference, int)).mean() < 4
    assert seen_edge and seen_crowd  # the renumbering and the crowd label were exercised


def test_label_maps_match_pycocotools_exactly(tree, prepared, truth):
    """The contract's painting order, checked with COCO's own annToMask: crowd, then persons, later on top."""
    out, _ = prepared
    for split in ("train", "val"):
        with redirect_stdout(io.StringIO()):
            coco = COCO(str(instances_path(tree, split)))
        for r in rows_of(out, split):
            scene = truth[r["id"]]
            anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[r["id"]], catIds=[1], iscrowd=None)),
                          key=lambda a: a["id"])
            kept_ids = [p["id"] for p, _ in expected_persons(scene)]
            labels = np.zeros((scene["height"], scene["width"]), np.uint8)
            for a in anns:
                if a["iscrowd"]:
                    labels[coco.annToMask(a) > 0] = 255
            for a in anns:
                if a["id"] in kept_ids:
                    labels[coco.annToMask(a) > 0] = kept_ids.index(a["id"]) + 1
            expected = crop_like_prepare(Image.fromarray(labels), scene["width"], scene["height"], Image.NEAREST)
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r["persons"]))), np.asarray(expected))


def test_face_boxes(prepared, truth):
    out, manifest = prepared
    rows = rows_of(out, "train") + rows_of(out, "val")
    with_face = [r for r in rows if r["face_boxes"]]
    assert len(with_face) / len(rows) >= FACE_SHARE
    for r in rows:
        scene = truth[r["id"]]
        assert len(r["face_scores"]) == len(r["face_boxes"])
        assert r["face_scores"] == sorted(r["face_scores"], reverse=True) and min(r["face_scores"], default=1) >= 0.9
        heads = [to_square([*p["head_box"]], scene["width"], scene["height"]) for p in scene["persons"]]
        for x0, y0, x1, y1 in r["face_boxes"]:
            assert 0 <= x0 < x1 <= S and 0 <= y0 < y1 <= S
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2  # a face box found and mapped right lies on a drawn head
            assert any(h[0] <= cx <= h[2] and h[1] <= cy <= h[3] for h in heads), (r["id"], (x0, y0, x1, y1))
    written = manifest["stats"]["train"]["face_boxes"] + manifest["stats"]["val"]["face_boxes"]
    assert written == sum(len(r["face_boxes"]) for r in rows)


def test_calibration_pass_counts_without_writing(tree, prepared, tmp_path):
    """`--min-person-area 1` decodes no image yet fills the threshold table a user picks the real threshold from."""
    manifest = prepare_coco(tree, tmp_path / "out", image_size=S, min_person_area=1.0, workers=2, progress=False)
    assert manifest["counts"] == {"train": 0, "val": 0}
    assert manifest["person_area_at_least"] == prepared[1]["person_area_at_least"]
    assert sum(manifest["excluded"][s]["below_min_person_area"] for s in ("train", "val")) == sum(
        t["persons"] != [] for t in read_truth(tree))


def test_threshold_zero_keeps_small_people_and_corrupt_image_is_skipped(tree, truth, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(tree, root)
    victim = min(i for i, t in truth.items() if t["kind"] == "people" and t["split"] == "train")
    path = image_path(root, "train", victim)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a truncated JPEG
    manifest = prepare_coco(root, tmp_path / "out", image_size=S, min_person_area=0.0, detect_faces=False,
                            workers=2, progress=False)
    assert [(s["id"], s["file"]) for s in manifest["skipped"]] == [(victim, str(path))]
    assert "corrupt or truncated" in manifest["skipped"][0]["reason"]
    assert manifest["excluded"]["train"]["skipped"] == 1
    ids = [r["id"] for split in ("train", "val") for r in rows_of(tmp_path / "out", split)]
    assert sorted(ids) == sorted(i for i, t in truth.items() if t["persons"] and i != victim)
    assert any(truth[i]["kind"] == "small" for i in ids)  # the default threshold, not the generator, excluded them
    assert all(r["face_boxes"] == [] for r in rows_of(tmp_path / "out", "train"))


def _annotations_only(tree, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(tree / "annotations", root / "annotations")
    (root / "train2017").mkdir()
    (root / "val2017").mkdir()
    return root


def _break_json(path):
    path.write_text(path.read_text()[:200])


def _bad_segmentation(path):
    data = json.loads(path.read_text())
    person = next(a for a in data["annotations"] if a["category_id"] == 1)
    person["segmentation"] = "a polygon"
    path.write_text(json.dumps(data))


def _no_person_category(path):
    data = json.loads(path.read_text())
    data["categories"] = [c for c in data["categories"] if c["name"] != "person"]
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("which, damage, message", [
    ("instances_val2017.json", _break_json, "not valid JSON"),
    ("instances_train2017.json", _bad_segmentation, "segmentation must be polygons or RLE"),
    ("instances_train2017.json", _no_person_category, "no category 'person'"),
    ("captions_val2017.json", _break_json, "not valid JSON"),
])
def test_malformed_annotation_file_is_an_error_naming_it(tree, tmp_path, which, damage, message):
    root = _annotations_only(tree, tmp_path)
    damage(root / "annotations" / which)
    with pytest.raises(CocoAnnotationError, match=message) as err:
        prepare_coco(root, tmp_path / "out", workers=1, progress=False)
    assert str(root / "annotations" / which) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_missing_files_of_a_requested_split(tree, tmp_path):
    root = _annotations_only(tree, tmp_path)
    (root / "annotations" / "captions_train2017.json").unlink()
    with pytest.raises(DatasetLayoutError, match="captions_train2017.json"):
        prepare_coco(root, tmp_path / "out", splits=["train"], progress=False)
    shutil.rmtree(root / "val2017")
    with pytest.raises(DatasetLayoutError, match="val2017: image folder"):
        prepare_coco(root, tmp_path / "out", splits=["val"], progress=False)
    with pytest.raises(ValueError, match="subset of"):
        prepare_coco(root, tmp_path / "out", splits=["test"], progress=False)


def test_cli_reports_one_line_errors(tree, prepared, tmp_path):
    out, _ = prepared
    before = (out / "manifest.json").read_bytes()
    runner = CliRunner()
    result = runner.invoke(app, ["prepare", "coco", str(tree), str(out)])
    assert result.exit_code == 2 and (out / "manifest.json").read_bytes() == before
    assert result.stderr.strip().startswith("error:") and "--overwrite" in result.stderr
    root = _annotations_only(tree, tmp_path)
    _break_json(root / "annotations" / "instances_train2017.json")
    result = runner.invoke(app, ["prepare", "coco", str(root), str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "instances_train2017.json" in lines[0]
    result = runner.invoke(app, ["prepare", "synthetic-coco", str(tmp_path / "tiny"), "--n", "3", "--size", "160"])
    assert result.exit_code == 0 and len(read_truth(tmp_path / "tiny")) == 3
    assert instances_path(tmp_path / "tiny", "train").is_file() and captions_path(tmp_path / "tiny", "val").is_file()


def test_overwrite_replaces_and_a_failed_run_keeps_the_old_dataset(tree, prepared, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(prepared[0], out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_coco(tree, out, image_size=S, detect_faces=False, progress=False)
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    calls = []

    def fail_on_second(self, record):
        calls.append(record["id"])
        if len(calls) == 2:
            raise RuntimeError("disk full")
    monkeypatch.setattr(shards.ShardWriter, "write", fail_on_second)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_coco(tree, out, image_size=S, detect_faces=False, overwrite=True, workers=2, progress=False)
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind

    manifest = prepare_coco(tree, out, splits=["train"], image_size=S, detect_faces=False, overwrite=True,
                            workers=2, progress=False)
    assert manifest["splits"] == ["train"] and not (out / "val").exists()
    assert [r["id"] for r in rows_of(out, "train")] == [r["id"] for r in rows_of(prepared[0], "train")]


# ------------------------------------------------------------------------------ streaming (decode, no Ray)
def decoded(out, split, *, hflip, epoch=0, size=S):
    from facediff.data.stream.dataset import decode_batch

    table = pq.read_table(shards.shard_paths(out, split))
    columns = {name: np.asarray(table[name].to_pylist(), dtype=object) for name in table.column_names}
    return decode_batch(columns, image_size=size, hflip=hflip, seed=0, epoch=epoch), columns


def test_decoded_batches_have_the_contract_shapes_and_dtypes(prepared):
    from facediff.data.stream.coco import CAPTION_BYTES, MAX_FACES, MAX_PERSON_BOXES, decode_captions

    out, _ = prepared
    batch, columns = decoded(out, "train", hflip=False)
    n = len(columns["id"])
    expected = {"image": ((n, 3, S, S), np.uint8), "persons": ((n, S, S), np.uint8),
                "person_boxes": ((n, MAX_PERSON_BOXES, 4), np.float32), "person_valid": ((n, MAX_PERSON_BOXES), np.uint8),
                "face_boxes": ((n, MAX_FACES, 4), np.float32), "face_valid": ((n, MAX_FACES), np.uint8),
                "face_scores": ((n, MAX_FACES), np.float32), "caption": ((n, CAPTION_BYTES), np.uint8)}
    for key, (shape, dtype) in expected.items():
        assert batch[key].shape == shape and batch[key].dtype == dtype, key
    assert batch["image"].max() > batch["image"].min()  # uint8 pixels: made float in [-1, 1] on the device
    for row, caption in enumerate(decode_captions(batch["caption"])):  # one of the record's own captions
        assert caption in list(columns["captions"][row])
    assert batch["person_valid"].sum(1).tolist() == [len(b) for b in columns["person_boxes"]]
    again, _ = decoded(out, "train", hflip=False, epoch=1)
    assert (again["caption"] != batch["caption"]).any()  # another epoch draws other captions


def test_flip_mirrors_image_person_map_and_boxes_together(prepared):
    out, _ = prepared
    plain, _ = decoded(out, "train", hflip=False)
    flipped, _ = decoded(out, "train", hflip=True)
    rows = np.nonzero(flipped["flipped"])[0]
    assert 0 < len(rows) < len(plain["id"])
    for r in rows:
        assert np.array_equal(flipped["image"][r], plain["image"][r][:, :, ::-1])
        assert np.array_equal(flipped["persons"][r], plain["persons"][r][:, ::-1])
        for key, valid in (("person_boxes", "person_valid"), ("face_boxes", "face_valid")):
            keep = plain[valid][r].astype(bool)
            before, after = plain[key][r][keep], flipped[key][r][keep]
            assert np.allclose(after[:, [0, 2]], S - before[:, [2, 0]]) and np.allclose(after[:, [1, 3]], before[:, [1, 3]])
        for k, box in enumerate(flipped["person_boxes"][r][flipped["person_valid"][r].astype(bool)], start=1):
            ys, xs = np.nonzero(flipped["persons"][r] == k)  # person k's pixels stay inside its mirrored box
            if len(xs):
                assert xs.min() >= np.floor(box[0]) - 1 and xs.max() <= np.ceil(box[2]) + 1
    unflipped = np.nonzero(flipped["flipped"] == 0)[0]
    assert np.array_equal(flipped["persons"][unflipped], plain["persons"][unflipped])
