"""`facediff train-segformer`: a tiny fine-tuning run on synthetic faces, its resume (in S3), and the IoU
bookkeeping."""

import json

import pytest
import torch

from facediff.config.schema import MaskEncoderConfig
from facediff.data.celebamask import PART_LABELS
from facediff.train.run_log import read_metrics
from facediff.train.segformer import train_segformer
from facediff.train.segformer_config import load_segformer_config
from facediff.train.segmentation import IoUCounter, build_segmenter, evaluate_segmenter, group_lookup
from test_storage import BUCKET, _keys, s3  # noqa: F401  (s3: the fixture)

from conftest import REPO
from test_distributed import ReduceCalled, fake_process_group


def test_iou_counts_accumulate_over_batches_and_are_reduced_on_the_workers_device(monkeypatch):
    counter = IoUCounter(3)
    counter.update(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]))
    counter.update(torch.tensor([1, 1]), torch.tensor([1, 0]))
    # class 1: intersection 2 (pixels 1 and 4), union 4; class 2: 1 / 2; the mean of per-batch IoUs would differ
    result = counter.result(["background", "a", "b"])
    assert result["iou"]["a"] == pytest.approx(2 / 4) and result["iou"]["b"] == pytest.approx(1 / 2)
    assert result["miou"] == pytest.approx((0.5 + 0.5) / 2)
    assert IoUCounter(3).result(["background", "a", "b"])["iou"]["a"] is None  # absent everywhere: not a zero
    devices = []  # under NCCL the counts must travel on the worker's device ("meta" stands in for the GPU)
    fake_process_group(monkeypatch, devices)
    with pytest.raises(ReduceCalled):
        counter.all_reduce(torch.device("meta"))
    assert devices == ["meta"]


def test_group_lookup_later_group_wins_and_config_errors():
    lut = group_lookup({"eyes": ("l_eye", "r_eye"), "face": ("skin", "l_eye")})
    assert lut[PART_LABELS["r_eye"]] == 1 and lut[PART_LABELS["l_eye"]] == 2 and lut[PART_LABELS["hair"]] == 0
    with pytest.raises(ValueError, match="unknown key"):
        load_segformer_config(REPO / "configs" / "segformer" / "tiny.yaml", ["trainer.stepz=3"])
    with pytest.raises(ValueError, match="unknown key"):  # the flat keys of before are refused, not ignored
        load_segformer_config(REPO / "configs" / "segformer" / "tiny.yaml", ["num_workers=4"])
    with pytest.raises(ValueError, match="part_groups"):
        load_segformer_config(REPO / "configs" / "segformer" / "tiny.yaml", ["data.part_groups={x: [nosee]}"])
    b0 = load_segformer_config(REPO / "configs" / "segformer" / "b0_celebamask.yaml")
    assert b0.model.preset == "segformer_b0_ade512" and b0.model.pretrained.startswith("nvidia/segformer-b0")
    assert b0.trainer.num_workers == 2 and b0.optimizer.lr == 6e-5 and b0.data.path == "data/celebamask/shards"
    assert b0.run_name() == "b0_celebamask" and b0.trainer.storage_path == "runs/segformer"


def _test_miou(model, shards, groups):
    from facediff.data.stream.dataset import build_dataset, iter_train_batches

    batches = iter_train_batches(build_dataset(shards, "test", image_size=32, hflip=False), 16, drop_last=False)
    return evaluate_segmenter(model, batches, group_lookup(groups), ["background", *groups])[0]["miou"]


@pytest.mark.ray
def test_tiny_run_learns_and_saves_a_loadable_encoder(ray_session, synthetic_shards, tmp_path):
    from transformers import SegformerForSemanticSegmentation

    from facediff.models.segformer import PartMaskEncoder

    # At 32 px most of the 10 default groups are a few pixels wide (an eye is ~2 px): a few dozen steps of a
    # random-init tiny SegFormer learn the large regions first, so the test segments those.
    groups = "{hair: [hair], skin: [skin, nose], cloth: [cloth]}"
    cfg = load_segformer_config(REPO / "configs" / "segformer" / "tiny.yaml", [
        f"data.path={synthetic_shards}", f"trainer.storage_path={tmp_path}", "trainer.run_name=out",
        "trainer.steps=150", "trainer.batch_size=8", f"data.part_groups={groups}"])
    groups = cfg.data.groups()
    torch.manual_seed(cfg.trainer.seed)  # the run's own initial weights
    untrained = _test_miou(build_segmenter(cfg.model, groups, load_weights=True), synthetic_shards, groups)

    out = train_segformer(cfg)
    assert out == tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"test mIoU: untrained {untrained:.3f}, after {cfg.trainer.steps} steps {metrics['miou']:.3f}")
    assert metrics["steps"] == 150
    assert metrics["miou"] > untrained + 0.1
    assert metrics["iou"]["skin"] > 0.3
    assert (out / "preview.png").stat().st_size > 0 and (out / "config.yaml").is_file()
    rows = read_metrics(out)  # the run log of `facediff train`: a row every log_every_steps, the last with IoU
    assert [r["step"] for r in rows] == list(range(10, 151, 10))
    assert rows[-1]["miou"] == metrics["miou"] and rows[-1]["kimg"] == pytest.approx(150 * 8 * 2 / 1000)

    # the saved model reproduces the reported number (counts summed over 2 ranks == one process over all). Not to
    # the last digit: each rank predicts only the records dealt to it, and another batch composition changes the
    # kernels' float rounding, which flips a few argmax ties (measured: 0.5253 vs 0.5257)
    saved = SegformerForSemanticSegmentation.from_pretrained(out / "segformer")
    assert saved.config.num_labels == 4 and saved.config.id2label[1] == "hair"
    assert _test_miou(saved, synthetic_shards, groups) == pytest.approx(metrics["miou"], abs=2e-3)

    # ... and conditional configs can name it as their mask encoder
    ref = MaskEncoderConfig(preset="tiny_segformer", pretrained=str(out / "segformer"), input="labels")
    encoder = PartMaskEncoder(ref, num_groups=len(groups), load_weights=True)
    want = saved.segformer.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in encoder.backbone.state_dict().items())


@pytest.mark.ray
def test_interrupted_run_in_s3_resumes_from_its_checkpoint_and_a_finished_one_is_left_as_it_is(
        ray_session, synthetic_shards, tmp_path, s3, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)  # nothing of the run may land in a local folder named after the bucket
    args = [f"data.path={synthetic_shards}", f"trainer.storage_path=s3://{BUCKET}/seg", "trainer.run_name=run",
            "trainer.steps=20", "trainer.checkpoint_every_steps=8", "trainer.log_every_steps=4", "eval.num_preview=2"]
    cfg = load_segformer_config(REPO / "configs" / "segformer" / "tiny.yaml", args)
    fault = {"crash_at_step": 13, "marker": str(tmp_path / "crashed")}
    with pytest.raises(Exception, match="injected worker crash at step 13"):
        train_segformer(cfg, fault=fault)
    stored = _keys(s3, "seg/run/")
    assert "checkpoint_000000008/progress.safetensors" in stored and "config.yaml" in stored
    assert "metrics.json" not in stored and not any(k.startswith("segformer/") for k in stored)  # did not finish
    longer = load_segformer_config(REPO / "configs" / "segformer" / "tiny.yaml", [*args, "trainer.steps=30"])
    with pytest.raises(ValueError, match="run of another config .trainer.steps 20 -> 30"):
        train_segformer(longer)

    out = train_segformer(cfg, fault=fault)  # the same config again: resumes from the checkpoint in S3
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 8 and metrics["steps"] == 20
    stored = _keys(s3, "seg/run/")
    assert {"segformer/config.json", "segformer/model.safetensors", "metrics.json", "preview.png"} <= set(stored)
    logged = s3.get_object(Bucket=BUCKET, Key="seg/run/metrics.jsonl")["Body"].read()
    rows = [json.loads(line) for line in logged.splitlines()]
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20] and "miou" in rows[-1]  # 12 logged again, once
    rank0_log = s3.get_object(Bucket=BUCKET, Key="seg/run/logs/rank0.log")["Body"].read().decode()
    assert "resumed from the checkpoint of step 8" in rank0_log

    again = train_segformer(cfg)  # finished: nothing to train, the outputs are the run's
    assert json.loads((again / "metrics.json").read_text()) == metrics
    assert s3.get_object(Bucket=BUCKET, Key="seg/run/metrics.jsonl")["Body"].read() == logged
