"""Mask adherence (`facediff evaluate --segmenter`): a mask model's samples segmented and scored against the masks
they were conditioned on, beside the segmenter's score on the real faces. No Ray: the segmenter is a tiny SegFormer
fitted in-process on synthetic faces (train-segformer's own Ray run is test_train_segformer's), saved in the layout
of a train-segformer run folder."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from facediff.cli.main import app
from facediff.config import load_config
from facediff.config.schema import PretrainedRef
from facediff.data.stream.local_batches import local_test_batches
from facediff.models.segformer import masks_to_labels
from facediff.runs.evaluate import evaluate_run
from facediff.tasks import build_task
from facediff.tasks.latent import LatentConditionalDiffusion
from facediff.train.segmentation import build_segmenter, normalize_images

from conftest import REPO

SEG_MODEL = REPO / "configs" / "experiments" / "tiny" / "tiny_lc_unet_seg.yaml"
# Groups whose layout differs from face to face in the synthetic set (long or short hair, bald; a hat on a quarter
# of them, glasses on a third), so a face drawn for other masks is scored down; skin or clothes would sit in
# almost the same place whatever the mask.
GROUPS = {"hair": ["hair"], "hat": ["hat"], "eyeglasses": ["eye_g"]}
GROUPS_KEY = "data.part_groups={hair: [hair], hat: [hat], eyeglasses: [eye_g]}"
STEPS = 250  # fitting steps of the tiny segmenter: real-face mIoU 0.40 (0.20 at 200 on 12 test faces); 5 s on 1 core


@pytest.fixture(scope="module")
def shards(synthetic_celebamask, tmp_path_factory):
    """160 synthetic faces at 32 px: 144 to fit the segmenter on, 16 test faces (one evaluation batch)."""
    from facediff.data.prepare.celebamask import prepare_celebamask

    out = tmp_path_factory.mktemp("mask_adherence") / "shards"
    prepare_celebamask(synthetic_celebamask(n=160), out, image_size=32, mask_size=32, rows_per_shard=32,
                       test_size=16, workers=2, progress=False)
    return out


def seg_config(shards, *more):
    return load_config(SEG_MODEL, [f"data.path={shards}", GROUPS_KEY, "eval.steps=2", "eval.batch_size=16",
                                   "eval.bootstrap=0", "eval.attribute_accuracy=false", *more])


@pytest.fixture(scope="module")
def segmenter_run(shards, tmp_path_factory):
    """A train-segformer run folder as the command leaves it (`segformer/`, metrics.json with the groups), holding
    a tiny SegFormer fitted on the train split's faces against their part-group labels."""
    cfg = seg_config(shards)
    groups = cfg.data.resolved_part_groups()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a loaded 2-core machine ran 50x slower (measured)
    try:
        torch.manual_seed(0)
        model = build_segmenter(PretrainedRef(preset="tiny_segformer"), groups, load_weights=True).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        batches, step = list(local_test_batches(cfg, "train")()), 0
        while step < STEPS:
            for batch in batches[: STEPS - step]:
                loss = model(pixel_values=normalize_images(batch["image"]),
                             labels=masks_to_labels(batch["part_masks"])).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
    finally:
        torch.set_num_threads(threads)
    run = tmp_path_factory.mktemp("segformer_run") / "tiny"
    model.save_pretrained(run / "segformer")
    (run / "metrics.json").write_text(json.dumps({"miou": 0.5, "groups": GROUPS}))
    return run


@pytest.fixture(scope="module")
def export(shards, tmp_path_factory):
    """The tiny mask model, untrained, exported as training exports it."""
    out = tmp_path_factory.mktemp("mask_model") / "model"
    build_task(seg_config(shards)).export(out)
    return out


def evaluate_with(export, segmenter_run, monkeypatch, draw):
    """`evaluate_run` with the model's sampler replaced by `draw(batch) -> images`, a stand-in model."""
    monkeypatch.setattr(LatentConditionalDiffusion, "sample",
                        lambda self, n, generator, sampler, steps, batch: draw(batch)[:n])
    return evaluate_run(export, overrides=[f"eval.mask_segmenter={segmenter_run}"], device="cpu")["results"]


def test_a_model_that_ignores_its_masks_scores_clearly_lower(export, segmenter_run, monkeypatch, tmp_path):
    # a model that follows its masks perfectly draws the very face they were cut from; one that ignores them draws
    # a face as real, but another record's (the batch rolled by one: all 16 test faces are one batch)
    adherent = evaluate_with(export, segmenter_run, monkeypatch, lambda batch: batch["image"])
    ignoring = evaluate_with(export, segmenter_run, monkeypatch, lambda batch: batch["image"].roll(1, 0))
    print(f"mask mIoU: adherent {adherent['mask_miou']:.3f}, ignoring {ignoring['mask_miou']:.3f}, "
          f"real faces {adherent['mask_miou_real']:.3f}")
    assert 0.2 < adherent["mask_miou_real"] <= 1
    # the same images on both sides: the generated path counts exactly what the real one does
    assert adherent["mask_miou"] == pytest.approx(adherent["mask_miou_real"], abs=1e-9)
    assert ignoring["mask_miou_real"] == adherent["mask_miou_real"]
    assert ignoring["mask_miou"] < adherent["mask_miou"] - 0.15
    assert ignoring["mask_iou/hat"] < adherent["mask_iou/hat"]  # hats drawn where the masks have none

    # through the command line, sampling for real: an untrained model's noise ignores its masks too
    monkeypatch.undo()
    exported = shutil.copytree(export, tmp_path / "model")
    result = CliRunner().invoke(app, ["evaluate", str(exported), "--segmenter", str(segmenter_run)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    saved = json.loads((exported / "evaluation.json").read_text())
    untrained = saved["results"]
    assert json.loads(lines[-1]) == untrained
    assert untrained["mask_miou"] < adherent["mask_miou"] - 0.15
    assert untrained["mask_miou_real"] == pytest.approx(adherent["mask_miou_real"])
    assert f"mask_miou {untrained['mask_miou']:.4g} (real faces: {untrained['mask_miou_real']:.4g})" in lines
    assert saved["protocol"]["mask_segmenter"] == {"path": str(segmenter_run / "segformer"), "groups": GROUPS,
                                                   "test_miou": 0.5}
    assert saved["overrides"] == [f"eval.mask_segmenter={segmenter_run}"]
    protocol_line = next(line for line in lines if line.startswith("mask adherence: "))
    assert lines.index(protocol_line) < lines.index(next(line for line in lines if line.startswith("mask_miou ")))


def user_error(result, *names):
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: eval.mask_segmenter: ") and all(str(n) in line for n in names), line


def test_a_missing_or_mismatched_segmenter_is_refused_before_the_model_loads(export, segmenter_run, tiny_export,
                                                                              tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("facediff.runs.load.build_task", refuse)
    runner = CliRunner()
    missing = tmp_path / "nowhere"
    user_error(runner.invoke(app, ["evaluate", str(export), "--segmenter", str(missing)]), missing,
               "facediff train-segformer")
    user_error(runner.invoke(app, ["evaluate", str(export), "--segmenter", str(tmp_path)]), tmp_path,
               "segformer/config.json")
    # a segmenter of other groups than the model's masks
    other = shutil.copytree(segmenter_run, tmp_path / "other")
    (other / "metrics.json").write_text(json.dumps({"groups": {**GROUPS, "hat": ["hat", "cloth"]}}))
    user_error(runner.invoke(app, ["evaluate", str(export), "--segmenter", str(other)]), "data.part_groups",
               "facediff train-segformer")
    user_error(runner.invoke(app, ["evaluate", str(export), "--segmenter", str(segmenter_run),
                                   "--set", "data.part_groups=default"]), "data.part_groups")
    # a model without masks has nothing to adhere to
    user_error(runner.invoke(app, ["evaluate", str(tiny_export), "--segmenter", str(segmenter_run)]),
               "model.mask_encoder")
