"""facediff.data.stream.dataset: decoding and flips without Ray, then the Ray Data path and a real TorchTrainer."""

import io
import json
import uuid
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import report_recorder

from facediff.data.stream.batch import finish_batch
from facediff.data.celebamask import DEFAULT_PART_GROUPS, NUM_ATTRIBUTES, PART_LABELS, group_parts
from facediff.data.stream.passes import ShardPasses, file_order
from facediff.data.shards import SCHEMA_VERSION, ShardWriter, shard_paths, write_manifest
from facediff.data.stream.dataset import build_dataset, decode_batch, flip_decisions, iter_train_batches

SIZE = 32
HAIR, L_EYE, NOSE = PART_LABELS["hair"], PART_LABELS["l_eye"], PART_LABELS["nose"]


def attributes_of(image_id):
    return np.random.default_rng(image_id).integers(0, 2, NUM_ATTRIBUTES).astype(np.int8)


def encode(array, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_record(image_id, split, size=SIZE, parts_size=None, fmt="PNG"):
    """Left half red, right half blue; hair labels the left half, with an eye and a nose patch in it."""
    image = np.zeros((size, size, 3), np.uint8)
    image[:, : size // 2, 0] = 255
    image[:, size // 2 :, 2] = 255
    p = parts_size or size
    parts = np.zeros((p, p), np.uint8)
    parts[:, : p // 2] = HAIR
    parts[p // 8 : p // 4, p // 8 : p // 4] = L_EYE
    parts[p // 2 : 3 * p // 4, p // 4 : p // 2] = NOSE
    return {
        "id": image_id,
        "image": encode(image, fmt, **({"quality": 95} if fmt == "JPEG" else {})),
        "parts": encode(parts, "PNG"),
        "attributes": attributes_of(image_id).tolist(),
        "split": split,
    }


def write_dataset(root, shards=None, **record_kw):
    """shards: split -> (files, rows per file); ids run on across splits."""
    shards = shards or {"train": (3, 16), "test": (1, 8)}
    manifest = {"schema_version": SCHEMA_VERSION, "shards": {}, "counts": {}}
    next_id = 0
    for split, (files, rows) in shards.items():
        with ShardWriter(root, split, rows_per_shard=rows, row_group_size=8) as writer:
            for image_id in range(next_id, next_id + files * rows):
                writer.write(make_record(image_id, split, **record_kw))
        manifest["shards"][split] = writer.files
        manifest["counts"][split] = files * rows
        next_id += files * rows
    write_manifest(root, manifest)
    return root


def arrow_batch(dataset, split="train"):
    """All rows of a split as the dict of numpy columns decode_batch takes (pyarrow's to_numpy flavour)."""
    table = pq.read_table(shard_paths(dataset, split))
    return {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}


def subset(batch, index):
    return {k: v[index] for k, v in batch.items()}


def decode(batch, part_groups=None, **kw):
    """decode_batch, then finished as a worker finishes it (float images, part masks), back as numpy."""
    kw = {"image_size": SIZE, "hflip": True, "seed": 0, "epoch": 0} | kw
    finished = finish_batch({k: torch.from_numpy(v) for k, v in decode_batch(batch, **kw).items()}, part_groups)
    return {k: v.numpy() for k, v in finished.items()}


def finished_numpy(batch):
    return {"id": batch["id"].numpy(), "image": batch["image"].numpy()}


def red_on_left(image):  # image: (3, S, S) in [-1, 1]
    half = image.shape[-1] // 2
    left, right = image[..., :half], image[..., half:]
    return bool(left[0].mean() > 0.9 and left[2].mean() < -0.9 and right[2].mean() > 0.9)


def hair_on_left(parts):
    half = parts.shape[-1] // 2
    return bool((np.isin(parts[:, :half], (HAIR, L_EYE, NOSE))).all() and (parts[:, half:] == 0).all())


def red_on_right(image):
    return red_on_left(image[..., ::-1])


def hair_on_right(parts):
    return hair_on_left(parts[..., ::-1])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def rows(dataset):
    return arrow_batch(dataset)  # 48 train rows, ids 0..47


# ---------------------------------------------------------------- decode_batch, no Ray


def test_rows_leave_the_decoder_compact(rows):
    """uint8 images and label maps through the object store; floats and part masks are made on the device."""
    raw = decode_batch(rows, image_size=SIZE, hflip=True, seed=0, epoch=0)
    n = len(rows["id"])
    assert set(raw) == {"id", "epoch", "flipped", "image", "parts", "attributes"}
    assert raw["image"].dtype == np.uint8 and raw["image"].shape == (n, 3, SIZE, SIZE)
    assert raw["image"].flags["C_CONTIGUOUS"] and raw["image"].min() == 0 and raw["image"].max() == 255
    finished = decode(rows, part_groups=DEFAULT_PART_GROUPS)
    np.testing.assert_array_equal(finished["image"], raw["image"].astype(np.float32) / 127.5 - 1.0)


def test_finished_on_a_device_with_bookkeeping_on_the_host(rows):
    """"meta" stands in for a GPU: every tensor column moves to the device and is finished there, while the
    columns read on the host (ids, epochs, flips, attributes: prompts and dropout are decided there) never leave
    the CPU."""
    raw = {k: torch.from_numpy(v) for k, v in decode_batch(rows, image_size=SIZE, hflip=True, seed=0, epoch=0).items()}
    out = finish_batch(raw, DEFAULT_PART_GROUPS, device="meta")
    assert {k for k, v in out.items() if v.device.type == "cpu"} == {"id", "epoch", "flipped", "attributes"}
    assert out["image"].device.type == "meta" and out["image"].dtype == torch.float32
    assert out["part_masks"].shape == (len(rows["id"]), len(DEFAULT_PART_GROUPS), SIZE, SIZE)


def test_shapes_dtypes_and_ranges(rows):
    out = decode(rows, part_groups=DEFAULT_PART_GROUPS)
    n, g = len(rows["id"]), len(DEFAULT_PART_GROUPS)
    assert set(out) == {"id", "epoch", "flipped", "image", "parts", "attributes", "part_masks"}
    assert out["id"].dtype == np.int64 and out["id"].tolist() == list(range(n))
    assert out["image"].dtype == np.float32 and out["image"].shape == (n, 3, SIZE, SIZE)
    assert out["image"].min() >= -1.0 and out["image"].max() <= 1.0
    assert out["image"].min() == -1.0 and out["image"].max() == 1.0  # PNG: exact 0 and 255
    assert out["parts"].dtype == np.uint8 and out["parts"].shape == (n, SIZE, SIZE)
    assert out["attributes"].dtype == np.float32 and out["attributes"].shape == (n, NUM_ATTRIBUTES)
    np.testing.assert_array_equal(out["attributes"], np.stack([attributes_of(i) for i in range(n)]))
    assert out["part_masks"].dtype == np.float32 and out["part_masks"].shape == (n, g, SIZE, SIZE)
    assert out["epoch"].tolist() == [0] * n  # decode() passes a fixed epoch 0


def _read_pass(source, execution):
    """(epoch, file, id) of every row the source's read tasks give in one execution, in task order (no Ray)."""
    context = SimpleNamespace(_execution_idx=execution)
    rows = []
    for task in source.get_read_tasks(1, data_context=context):
        for block in task():
            file = task.metadata.input_files[0]
            rows += [(e, file, i) for e, i in zip(block["epoch"].to_pylist(), block["id"].to_pylist())]
    return rows


def test_a_pass_reads_its_epochs_in_turn_and_a_resume_continues_it(dataset):
    """Execution x reads epochs first_epoch + 2x, + 2x + 1 one after the other, each file order seeded by the
    epoch alone; a resumed source (first_epoch=2) reads what the straight one reads on its second execution,
    minus the consumed records, which are skipped in their own epoch and in its first execution only."""
    paths = shard_paths(dataset, "train")  # 3 files of 16 rows, row groups of 8
    kw = dict(columns=["id"], rows_per_task=8, seed=5, shuffle=True, epochs_per_pass=2)
    straight = ShardPasses(paths, first_epoch=0, **kw)
    resumed = ShardPasses(paths, first_epoch=2, skip={2: {1, 2, 40}, 3: {7}}, **kw)
    assert straight.num_tasks() == 2 * 3 * 2
    first, second = _read_pass(straight, 0), _read_pass(straight, 1)
    assert [e for e, _, _ in first] == [0] * 48 + [1] * 48 and [e for e, _, _ in second] == [2] * 48 + [3] * 48
    for epoch in (0, 1):
        assert sorted(i for e, _, i in first if e == epoch) == list(range(48))  # every record once an epoch
        files = list(dict.fromkeys(f for e, f, _ in first if e == epoch))
        assert files == [paths[k] for k in file_order(3, 5, epoch)]
    assert file_order(3, 5, 0) != file_order(3, 5, 1) or file_order(3, 5, 1) != file_order(3, 5, 2)
    skipped = {(2, 1), (2, 2), (2, 40), (3, 7)}
    assert _read_pass(resumed, 0) == [(e, f, i) for e, f, i in second if (e, i) not in skipped]
    assert _read_pass(resumed, 1) == [(e, f, i) for e, f, i in _read_pass(straight, 2)]  # skips: first pass only
    fixed = ShardPasses(paths, first_epoch=4, advance=False, **(kw | {"epochs_per_pass": 1}))
    assert {e for e, _, _ in _read_pass(fixed, 0) + _read_pass(fixed, 3)} == {4}  # evaluation: one epoch always


def test_decode_takes_each_rows_epoch_from_its_epoch_column(rows):
    epochs = np.arange(len(rows["id"])) % 3 + 4
    out = decode_batch(rows | {"epoch": epochs}, image_size=SIZE, hflip=True, seed=5, epoch=None)
    assert out["epoch"].tolist() == epochs.tolist()
    np.testing.assert_array_equal(out["flipped"], flip_decisions(out["id"], seed=5, epoch=epochs))
    per_epoch = [flip_decisions(out["id"], seed=5, epoch=e) for e in (4, 5, 6)]
    assert any((per_epoch[0] != p).any() for p in per_epoch[1:])  # the epoch matters
    with pytest.raises(ValueError, match="epoch"):
        decode_batch(rows, image_size=SIZE, hflip=True, seed=5, epoch=None)


def test_flip_keeps_image_and_parts_aligned(rows):
    out = decode(rows, part_groups=DEFAULT_PART_GROUPS)
    flipped = flip_decisions(out["id"], seed=0, epoch=0)
    assert 0 < flipped.sum() < len(flipped)  # both kinds occur among 48 ids
    for image, parts, flip in zip(out["image"], out["parts"], flipped):
        if flip:
            assert red_on_right(image) and hair_on_right(parts)
        else:
            assert red_on_left(image) and hair_on_left(parts)
    np.testing.assert_array_equal(out["part_masks"], group_parts(out["parts"], DEFAULT_PART_GROUPS))


def test_no_flip_when_disabled(rows):
    out = decode(rows, hflip=False)
    assert all(red_on_left(im) and hair_on_left(p) for im, p in zip(out["image"], out["parts"]))


def observed_flips(out):
    return {int(i): red_on_right(im) for i, im in zip(out["id"], out["image"])}


def test_flips_depend_on_seed_epoch_id_not_on_batching(rows):
    whole = observed_flips(decode(rows, seed=7, epoch=3))
    assert whole == dict(zip(range(48), flip_decisions(np.arange(48), seed=7, epoch=3).tolist()))
    order = np.random.default_rng(0).permutation(48)
    pieces = {}
    for chunk in np.array_split(order, [1, 4, 13, 30]):  # uneven, shuffled batches
        pieces |= observed_flips(decode(subset(rows, chunk), seed=7, epoch=3))
    assert pieces == whole


def test_flip_decisions_are_fair_coins_independent_across_epochs():
    ids = np.arange(20_000)
    base = flip_decisions(ids, seed=3, epoch=0)
    assert 0.48 < base.mean() < 0.52
    for other in (flip_decisions(ids, seed=3, epoch=1), flip_decisions(ids, seed=4, epoch=0)):
        assert 0.48 < (other == base).mean() < 0.52  # no correlation with the neighbouring epoch or seed


def test_other_epoch_or_seed_changes_some_flips(rows):
    base = observed_flips(decode(rows, seed=7, epoch=3))
    for kw in ({"seed": 7, "epoch": 4}, {"seed": 8, "epoch": 3}):
        other = observed_flips(decode(rows, **kw))
        assert other != base and sum(other.values()) > 0


def test_resize_to_other_image_size(rows):
    for size in (16, 48):  # shrink (LANCZOS) and enlarge (bicubic)
        out = decode(rows, image_size=size, part_groups=DEFAULT_PART_GROUPS, hflip=False)
        assert out["image"].shape == (48, 3, size, size) and out["parts"].shape == (48, size, size)
        assert out["image"].min() >= -1.0 and out["image"].max() <= 1.0
        assert set(np.unique(out["parts"])) == {0, HAIR, L_EYE, NOSE}  # nearest: no invented labels
        assert all(hair_on_left(p) for p in out["parts"])
        half = size // 2  # away from the edge, where resampling blends red into blue
        assert (out["image"][:, 0, :, : half - 2] > 0.9).all() and (out["image"][:, 2, :, half + 2 :] > 0.9).all()
        assert out["part_masks"].shape == (48, len(DEFAULT_PART_GROUPS), size, size)


def test_parts_stored_smaller_than_image_and_jpeg(tmp_path):
    root = write_dataset(tmp_path, {"train": (1, 8)}, parts_size=SIZE // 2, fmt="JPEG")
    out = decode(arrow_batch(root), hflip=False)
    assert out["parts"].shape == (8, SIZE, SIZE) and all(hair_on_left(p) for p in out["parts"])
    half = SIZE // 2  # JPEG: approximate colours, and blurred near the red/blue edge
    assert (out["image"][:, 0, :, : half - 2] > 0.8).all() and (out["image"][:, 2, :, half + 2 :] > 0.8).all()


def test_rejects_bad_inputs(dataset, rows):
    with pytest.raises(ValueError, match="image_size"):
        build_dataset(dataset, "train", image_size=0)
    with pytest.raises(ValueError, match="no split 'val'"):
        build_dataset(dataset, "val", image_size=SIZE)
    with pytest.raises(FileNotFoundError, match="no manifest"):
        build_dataset(dataset / "train", "train", image_size=SIZE)
    with pytest.raises(ValueError, match="unknown part names"):
        iter_train_batches(None, 8, part_groups={"x": ("tail",)})  # checked before any Ray call
    bad = dict(rows, parts=np.array([encode(np.zeros((SIZE, SIZE, 3), np.uint8), "PNG")] * 48, dtype=object))
    kept = decode_batch(bad, image_size=SIZE, hflip=False, seed=0, epoch=0)  # RGB label maps: records skipped
    assert len(kept["id"]) == 0 and kept["parts"].shape == (0, SIZE, SIZE)
    with pytest.raises(ValueError, match="local_shuffle_buffer_size"):
        iter_train_batches(None, 8, local_shuffle_buffer_size=4)  # checked before any Ray call


# ---------------------------------------------------------------- Ray Data


@pytest.mark.ray
@pytest.mark.parametrize("shuffle", [False, True])
def test_ray_dataset_delivers_every_row_once(ray_session, dataset, shuffle):
    ds = build_dataset(dataset, "train", image_size=SIZE, seed=5, shuffle=shuffle)
    ids, flips = [], {}
    for batch in iter_train_batches(ds, 8, part_groups=DEFAULT_PART_GROUPS, drop_last=False):
        n = len(batch["id"])
        assert batch["id"].dtype == torch.int64
        assert batch["image"].dtype == torch.float32 and batch["image"].shape == (n, 3, SIZE, SIZE)
        assert batch["parts"].dtype == torch.uint8 and batch["parts"].shape == (n, SIZE, SIZE)
        assert batch["attributes"].dtype == torch.float32 and batch["attributes"].shape == (n, NUM_ATTRIBUTES)
        assert batch["part_masks"].shape == (n, len(DEFAULT_PART_GROUPS), SIZE, SIZE)
        assert "split" not in batch
        ids += batch["id"].tolist()
        flips |= observed_flips(finished_numpy(batch))
    assert sorted(ids) == list(range(48))
    assert flips == dict(zip(range(48), flip_decisions(np.arange(48), seed=5, epoch=0).tolist()))


@pytest.mark.ray
def test_each_pass_over_a_training_dataset_reads_its_epochs_and_flips_each_anew(ray_session, dataset):
    """epoch=None: iteration x of the Dataset is pass x, epochs 2x and 2x + 1, each record once in each, its
    flips those of its own epoch."""
    ds = build_dataset(dataset, "train", image_size=SIZE, seed=5, epoch=None, shuffle=True, epochs_per_pass=2)
    flips = {}
    for x in range(2):
        seen = []
        for batch in iter_train_batches(ds, 16, drop_last=False):
            rows = list(zip(batch["epoch"].tolist(), batch["id"].tolist()))
            seen += rows
            flips |= {row: red_on_right(image) for row, image in zip(rows, batch["image"].numpy())}
        assert sorted(seen) == [(e, i) for e in (2 * x, 2 * x + 1) for i in range(48)]
    for epoch in range(4):
        assert [flips[epoch, i] for i in range(48)] == flip_decisions(np.arange(48), seed=5, epoch=epoch).tolist()
    assert [flips[0, i] for i in range(48)] != [flips[1, i] for i in range(48)]


@pytest.mark.ray
def test_iter_train_batches_drops_split_column(ray_session):
    import ray

    ds = ray.data.from_items([{"id": i, "split": "train"} for i in range(10)])
    batches = list(iter_train_batches(ds, batch_size=4))  # drop_last: 2 full batches
    assert [sorted(b) for b in batches] == [["id"], ["id"]]
    ids = torch.cat([b["id"] for b in batches]).tolist()
    assert len(set(ids)) == 8 and set(ids) <= set(range(10))


# ---------------------------------------------------------------- Ray Train


def count_rows_loop():
    """The train loop, built inside a function so Ray pickles it by value (workers cannot import this module)."""

    def loop(config):
        import ray.train

        ids = []
        for batch in iter_train_batches(ray.train.get_dataset_shard("train"), batch_size=4):
            assert batch["image"].shape[1:] == (3, SIZE, SIZE)
            ids += batch["id"].tolist()
        ray.train.report({"rank": ray.train.get_context().get_world_rank(), "rows": len(ids), "ids": ids})

    return loop


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_torch_trainer_workers_share_the_dataset(ray_session, dataset, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    record = tmp_path / "worker_metrics.jsonl"
    trainer = TorchTrainer(
        count_rows_loop(),
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        datasets={"train": build_dataset(dataset, "train", image_size=SIZE, shuffle=True)},
        run_config=RunConfig(
            name=f"stream-{uuid.uuid4().hex[:8]}",
            storage_path=str(tmp_path),
            callbacks=[report_recorder(str(record))],
        ),
    )
    result = trainer.fit()
    assert result.error is None
    (reports,) = [json.loads(line) for line in record.read_text().splitlines()]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    assert all(r["rows"] > 0 and r["rows"] == len(r["ids"]) for r in reports)
    seen = [i for r in reports for i in r["ids"]]
    assert sorted(seen) == list(range(48))  # disjoint and complete (48 rows, 2 x 6 full batches of 4)
