"""Latent conditional UNets: exact Table VII counts, the condition encoder, guidance, the task end to end."""


import pytest
import torch
from diffusers import UNet2DConditionModel

from facediff.config import ConfigError, load_config
from facediff.models import build_network
from facediff.models.conditional import ConditionEncoder
from facediff.models.info import count_parameters
from facediff.tasks.latent import guidance_terms

from conftest import REPO

EXPERIMENTS = REPO / "configs" / "experiments"

# The seed paper's Table VII: UNet parameters of each conditional architecture.
TABLE_VII = {
    "lc_unet_base": 140_457_987,
    "lc_unet_3": 104_950_915,
    "lc_unet_5": 168_036_867,
    "lc_unet_6": 116_838_147,
}


@pytest.mark.parametrize("name", sorted(TABLE_VII))
def test_table_vii_unet_counts(name):
    cfg = load_config(EXPERIMENTS / "celebamask" / f"{name}.yaml")
    with torch.device("meta"):
        unet = build_network(cfg.model)
    assert isinstance(unet, UNet2DConditionModel)
    assert count_parameters(unet) == (TABLE_VII[name], 0)


def test_mask_encoder_needs_part_groups():
    with pytest.raises(ConfigError, match="part_groups"):
        load_config(EXPERIMENTS / "celebamask" / "lc_unet_3_seg.yaml", ["data.part_groups=none"])


def test_guidance_terms_combine_to_the_guidance_formula():
    # weights of eps(0,0), eps(a,0), eps(a,m): 1 - s_a, s_a - s_m, s_m
    assert guidance_terms(3.0, 1.5, has_masks=True) == [(False, False, -2.0), (True, False, 1.5), (True, True, 1.5)]
    assert guidance_terms(1.0, 1.0, has_masks=True) == [(True, True, 1.0)]  # no guidance: one forward
    assert guidance_terms(2.0, 2.0, has_masks=False) == [(False, False, -1.0), (True, False, 2.0)]
    assert guidance_terms(0.0, 0.0, has_masks=True) == [(False, False, 1.0)]  # unconditional
    for s_a, s_m in [(3.0, 1.5), (1.0, 4.0), (0.5, 0.0)]:
        assert sum(w for _, _, w in guidance_terms(s_a, s_m, True)) == pytest.approx(1.0)


def tiny_model_cfg(overrides=()):
    return load_config(EXPERIMENTS / "tiny" / "tiny_lc_unet.yaml", list(overrides))


def test_condition_encoder_attributes_only():
    cfg = tiny_model_cfg()
    torch.manual_seed(0)
    enc = ConditionEncoder(cfg.model, num_groups=0, load_weights=False)
    attrs = (torch.rand(4, 40) < 0.5).float()
    keep = torch.tensor([True, False, True, False])
    context, embedding = enc(attrs, keep_attributes=keep)
    assert context.shape == (4, 2, 64) and embedding.shape == (4, 2, 64)  # tokens=2, dim = cross-attention width
    assert torch.equal(context[1], enc.null_attributes.detach()) and torch.equal(context[3], context[1])
    assert torch.allclose(context[0], embedding[0])
    (context.sum() + embedding.sum()).backward()
    assert enc.attributes.mlp[0].weight.grad.abs().sum() > 0 and enc.null_attributes.grad.abs().sum() > 0
    other, _ = enc(1 - attrs)
    assert not torch.allclose(other, enc(attrs)[0])  # different attributes, different conditioning


def fake_batch(n=4, size=32, groups=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(n, 3, size, size, generator=g) * 2 - 1,
        "attributes": (torch.rand(n, 40, generator=g) < 0.4).float(),
        "part_masks": (torch.rand(n, groups, size, size, generator=g) < 0.2).float(),
    }


@pytest.mark.parametrize("name", ["tiny_lc_unet", "tiny_lc_unet_seg"])
def test_every_trained_part_gets_gradients(name):
    from facediff.tasks import build_task

    cfg = load_config(EXPERIMENTS / "tiny" / f"{name}.yaml", ["loss.infonce_weight=1.0", "model.attribute_dropout=0.5",
                                                      "model.mask_dropout=0.5"])
    task = build_task(cfg).train()
    loss = task(fake_batch(8), torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and set(task.loss_terms) == {"loss_mse", "loss_infonce"}
    loss.backward()
    trainable = {n: p for n, p in task.named_parameters() if p.requires_grad}
    without_grad = [n for n, p in trainable.items() if p.grad is None]
    assert without_grad == []  # every trainable parameter takes part, null conditions included
    assert all(not n.startswith("codec.") for n in trainable)  # the autoencoder is frozen
    assert task.conditions.attributes.mlp[0].weight.grad.abs().sum() > 0
    if task.has_masks:  # both projections and the embedder train
        assert task.conditions.fuse.weight.grad.abs().sum() > 0
        masks = task.conditions.masks
        assert masks.proj.weight.grad.abs().sum() > 0 and masks.proj.bias.grad.abs().sum() > 0
        # the fine-tuned backbone learns from the first layer on (its last stage sees one token at 32 px, where
        # attention's query/key gradients are exactly 0: softmax over a single key is constant)
        assert masks.backbone.stages[0].patch_embeddings.proj.weight.grad.abs().sum() > 0


def test_changing_the_mask_changes_the_conditioning():
    from facediff.tasks import build_task

    task = build_task(load_config(EXPERIMENTS / "tiny" / "tiny_lc_unet_seg.yaml")).eval()
    batch = fake_batch(2)
    with torch.no_grad():
        context, _ = task.conditions(batch["attributes"], batch["part_masks"])
        moved = batch["part_masks"].clone()
        moved[:, 0] = torch.roll(moved[:, 0], shifts=8, dims=-1)  # move the hair mask
        other, _ = task.conditions(batch["attributes"], moved)
        null, _ = task.conditions(batch["attributes"], None)
    assert not torch.allclose(context, other) and not torch.allclose(context, null)


def test_guided_sampling_export_round_trip(tmp_path):
    from facediff.runs.load import load_model
    from facediff.tasks import build_task

    cfg = load_config(EXPERIMENTS / "tiny" / "tiny_lc_unet_seg.yaml", ["eval.attribute_guidance=3", "eval.mask_guidance=2"])
    task = build_task(cfg).eval()
    with torch.no_grad():  # weights no fresh build has, so the round trip cannot pass by chance
        for p in task.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    batch = fake_batch(3)
    images = task.sample(3, torch.Generator().manual_seed(0), "ddim", 3, batch)
    assert images.shape == (3, 3, 32, 32) and images.abs().max() <= 1
    unguided = task.sample(3, torch.Generator().manual_seed(0), "ddim", 3, {"attributes": batch["attributes"]})
    assert not torch.allclose(images, unguided)  # masks (and their guidance) change the samples
    task.export(tmp_path / "export")
    _, loaded = load_model(tmp_path / "export")
    assert torch.allclose(loaded.sample(3, torch.Generator().manual_seed(0), "ddim", 3, batch), images, atol=1e-5)


def test_a_frozen_mask_backbone_is_held_outside_the_trained_module_and_exported_whole(tmp_path):
    """ZeRO-3 would partition (and gather every forward) a frozen SegFormer inside the engine's module: it is held
    frozen like the codec, follows the trained weights' precision, and the export still carries it."""
    from facediff.runs.load import load_model
    from facediff.tasks import build_task

    cfg = load_config(EXPERIMENTS / "tiny" / "tiny_lc_unet_seg.yaml", ["model.mask_encoder.frozen=true"])
    task = build_task(cfg).train()
    backbone = task.conditions.masks.backbone
    assert not any(k.startswith("conditions.masks.backbone.") for k in task.state_dict())  # not in checkpoints
    assert "conditions.masks.proj.weight" in task.state_dict() and not backbone.training
    with torch.no_grad():  # weights no fresh build has, so the export round trip cannot pass by chance
        for p in backbone.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    for p in task.parameters():  # what DeepSpeed's bf16 engine does to the module's own weights, in place
        p.data = p.data.to(torch.bfloat16)
    loss = task(fake_batch(2), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and next(backbone.parameters()).dtype == torch.bfloat16  # followed the weights
    task.float()
    task.export(tmp_path / "export")
    _, loaded = load_model(tmp_path / "export")
    for name, value in backbone.state_dict().items():
        assert torch.equal(loaded.conditions.masks.backbone.state_dict()[name], value), name
    from facediff.models.info import describe

    rows = {r["name"]: r for r in describe(cfg)}
    assert rows["mask_encoder"]["frozen"] == sum(p.numel() for p in backbone.parameters())  # counted, though held


def test_latent_shape_mismatch_is_explained():
    from facediff.tasks import build_task

    with pytest.raises(ValueError, match="model.sample_size=8"):
        build_task(load_config(EXPERIMENTS / "tiny" / "tiny_lc_unet.yaml", ["model.sample_size=16"]))


def test_segmentation_row_keeps_lc_unet_3s_unet_and_its_256d_context():
    # Table II prints 104.95 M for LC_UNet_3 with and without masks: the fused attribute ⊕ mask embedding is
    # projected to the same 256-d context, so the UNet is LC_UNet_3's to the parameter
    cfg = load_config(EXPERIMENTS / "celebamask" / "lc_unet_3_seg.yaml")
    with torch.device("meta"):
        unet = build_network(cfg.model)
        encoder = ConditionEncoder(cfg.model, num_groups=10, load_weights=False)
    assert count_parameters(unet) == (TABLE_VII["lc_unet_3"], 0)
    assert unet.config.cross_attention_dim == 256
    attributes = torch.zeros(2, 40, device="meta")
    masks = torch.zeros(2, 10, 256, 256, device="meta")
    for part_masks in (masks, None):  # with masks, and the null mask features of attribute-only sampling
        context, embedding = encoder(attributes, part_masks)
        assert context.shape == (2, 1, unet.config.cross_attention_dim) and embedding.shape == (2, 1, 128)
    assert isinstance(encoder.fuse, torch.nn.Linear) and encoder.fuse.in_features == 128 + 128


def test_masks_are_projected_even_when_the_widths_already_add_up():
    # 64 + 32 = 96 -> a Linear to 96 all the same: the paper projects the concatenation, it does not pass it on
    cfg = load_config(EXPERIMENTS / "tiny" / "tiny_lc_unet_seg.yaml", ["model.cross_attention_dim=96"])
    encoder = ConditionEncoder(cfg.model, num_groups=10, load_weights=False)
    assert isinstance(encoder.fuse, torch.nn.Linear) and (encoder.fuse.in_features, encoder.fuse.out_features) == (96, 96)
    attributes_only = ConditionEncoder(tiny_model_cfg().model, num_groups=0, load_weights=False)
    assert isinstance(attributes_only.fuse, torch.nn.Identity)  # dim == cross_attention_dim: tokens are the context


def test_info_lists_every_network():
    from facediff.models.info import describe

    rows = {r["name"]: r for r in describe(load_config(EXPERIMENTS / "celebamask" / "lc_unet_3_seg.yaml"))}
    assert rows["autoencoder"]["trainable"] == 0 and rows["autoencoder"]["frozen"] > 0
    assert rows["mask_encoder"]["frozen"] > 0 and rows["mask_encoder"]["trainable"] == 256 * 128 + 128
    assert rows["fusion"]["trainable"] == (128 + 128) * 256 + 256
    # + the learned null conditions of guidance (attributes 128, masks 128)
    assert rows["total"]["trainable"] == sum(r["trainable"] for n, r in rows.items() if n != "total") + 128 + 128


def test_evaluate_reports_attribute_accuracy_beside_the_distance(synthetic_shards, tmp_path):
    import json

    from typer.testing import CliRunner

    from facediff.cli.main import app
    from facediff.tasks import build_task

    cfg = load_config(EXPERIMENTS / "tiny" / "tiny_lc_unet.yaml", [f"data.path={synthetic_shards}", "eval.steps=2"])
    build_task(cfg).export(tmp_path / "export")
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "export"), "--set", "eval.num_samples=8"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    assert metrics["fd_mtcnn_onet"] > 0 and 0 <= metrics["attr_acc"] <= 1
    assert "attr_acc/Eyeglasses" in metrics
    saved = json.loads((tmp_path / "export" / "evaluation.json").read_text())  # attr_acc saved beside the distance
    assert json.dumps(saved["results"]) == json.dumps(metrics)  # as printed (rare attributes' accuracies are NaN)
    assert saved["protocol"]["guidance"] == {"attribute": cfg.eval.attribute_guidance, "mask": cfg.eval.mask_guidance}
    assert (synthetic_shards / "attribute_reader" / "32px" / "model.safetensors").is_file()  # cached for next time
