"""`facediff train-segformer`: a tiny fine-tuning run on synthetic faces, and the IoU bookkeeping."""

import json

import pytest
import torch

from facediff.config.schema import MaskEncoderConfig
from facediff.data.celebamask import PART_LABELS
from facediff.train.segformer import (
    IoUCounter, build_segmenter, evaluate_segmenter, group_lookup, load_segformer_config, train_segformer,
)

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
        load_segformer_config(REPO / "configs" / "segformer" / "tiny.yaml", ["stepz=3"])
    with pytest.raises(ValueError, match="part_groups"):
        load_segformer_config(REPO / "configs" / "segformer" / "tiny.yaml", ["part_groups={x: [nosee]}"])
    b0 = load_segformer_config(REPO / "configs" / "segformer" / "b0_celebamask.yaml")
    assert b0.model.preset == "segformer_b0_ade512" and b0.model.pretrained.startswith("nvidia/segformer-b0")


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
        f"data={synthetic_shards}", f"output_dir={tmp_path / 'out'}", "steps=150", "batch_size=8",
        f"part_groups={groups}"])
    groups = cfg.groups()
    torch.manual_seed(cfg.seed)  # the run's own initial weights
    untrained = _test_miou(build_segmenter(cfg.model, groups, load_weights=True), synthetic_shards, groups)

    out = train_segformer(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"test mIoU: untrained {untrained:.3f}, after {cfg.steps} steps {metrics['miou']:.3f}")
    assert metrics["steps"] == 150
    assert metrics["miou"] > untrained + 0.1
    assert metrics["iou"]["skin"] > 0.3
    assert (out / "preview.png").stat().st_size > 0 and (out / "config.yaml").is_file()

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
def test_interrupted_run_resumes_from_its_checkpoint_and_a_finished_one_starts_afresh(ray_session, synthetic_shards,
                                                                                      tmp_path):
    args = [f"data={synthetic_shards}", f"output_dir={tmp_path / 'out'}", "steps=20", "checkpoint_every_steps=8",
            "log_every_steps=4", "num_preview=2"]
    cfg = load_segformer_config(REPO / "configs" / "segformer" / "tiny.yaml", args)
    fault = {"crash_at_step": 13, "marker": str(tmp_path / "crashed")}
    with pytest.raises(Exception, match="injected worker crash at step 13"):
        train_segformer(cfg, fault=fault)
    assert not (tmp_path / "out").exists()  # no output from a run that did not finish
    longer = load_segformer_config(REPO / "configs" / "segformer" / "tiny.yaml", [*args, "steps=30"])
    with pytest.raises(ValueError, match="interrupted train-segformer run of another config"):
        train_segformer(longer)

    out = train_segformer(cfg, fault=fault)  # the same config again: resumes
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 8 and metrics["steps"] == 20
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.json", "preview.png", "segformer"]
    assert not (tmp_path / ".out-ray" / cfg.name).exists()  # finished: the next run starts afresh
    again = json.loads((train_segformer(cfg) / "metrics.json").read_text())
    assert again["resumed_from_step"] is None and again["steps"] == 20
