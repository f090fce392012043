"""The SegFormer part-mask encoder: shapes, freezing, both input modes, presets and loading saved weights."""

import numpy as np
import pytest
import torch
from transformers import SegformerForSemanticSegmentation, SegformerModel

from facediff.config.schema import MaskEncoderConfig
from facediff.data.celebamask import DEFAULT_PART_GROUPS, group_parts, paint_label_map
from facediff.data.synthetic.celebamask import render_face
from facediff.models.pretrained import WeightsNotFound, from_config, preset_config
from facediff.models.segformer import PartMaskEncoder, masks_to_labels

G = len(DEFAULT_PART_GROUPS)


@pytest.fixture(scope="module")
def masks():
    """(4, 10, 32, 32) grouped masks of synthetic faces."""
    maps = []
    for i in range(4):
        face = render_face(i, size=64, seed=0)
        maps.append(paint_label_map(face.part_masks, (32, 32)))
    return torch.from_numpy(group_parts(np.stack(maps), DEFAULT_PART_GROUPS))


def encoder(input="channels", frozen=True, preset="tiny_segformer", **kw):
    torch.manual_seed(0)
    cfg = MaskEncoderConfig(preset=preset, input=input, frozen=frozen, **kw)
    return PartMaskEncoder(cfg, num_groups=G, load_weights=True)


@pytest.mark.parametrize("mode", ["channels", "labels"])
def test_output_shape_and_mask_sensitivity(masks, mode):
    enc = encoder(mode, proj_dim=24).eval()
    out = enc(masks)
    assert out.shape == (4, 24) and torch.isfinite(out).all()
    changed = masks.clone()
    changed[:, G - 1] = 0  # earrings removed
    changed[:, 1, :8] = 1  # a hat band painted over the top rows
    assert not torch.allclose(enc(changed), out, atol=1e-6)
    # each face is encoded on its own: changing face 0 leaves face 1's vector alone
    one = masks.clone()
    one[0, 0] = 1 - one[0, 0]
    moved = enc(one)
    assert not torch.allclose(moved[0], out[0], atol=1e-6)
    assert torch.allclose(moved[1:], out[1:], atol=1e-6)


def test_wrong_number_of_groups_is_an_error(masks):
    with pytest.raises(ValueError, match=r"\(B, 10, H, W\)"):
        encoder()(masks[:, :3])


@pytest.mark.parametrize("mode", ["channels", "labels"])
def test_frozen_backbone_gets_no_grad_but_projection_does(masks, mode):
    enc = encoder(mode, frozen=True)
    assert not any(p.requires_grad for p in enc.backbone.parameters())
    enc.train()  # a parent switching to training must not wake the frozen backbone
    assert not enc.backbone.training and enc.proj.training
    enc(masks).square().sum().backward()
    assert all(p.grad is None for p in enc.backbone.parameters())
    assert enc.proj.weight.grad is not None and enc.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["channels", "labels"])
def test_trainable_backbone_gets_grads(masks, mode):
    enc = encoder(mode, frozen=False).train()
    assert enc.backbone.training
    enc(masks).square().sum().backward()
    first = enc.backbone.stages[0].patch_embeddings.proj.weight
    last = enc.backbone.stages[-1].layer_norm.weight
    for p in (first, last, enc.proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_channels_init_matches_label_rendering(masks):
    """The adapted G-channel patch embedding computes what the RGB one computes on the palette image (interior)."""
    labels_enc, channels_enc = encoder("labels"), encoder("channels")
    rgb_conv = labels_enc.backbone.stages[0].patch_embeddings.proj
    g_conv = channels_enc.backbone.stages[0].patch_embeddings.proj
    assert g_conv.in_channels == G and channels_enc.backbone.config.num_channels == G
    with torch.no_grad():
        a = rgb_conv(labels_enc.backbone_input(masks))
        b = g_conv(channels_enc.backbone_input(masks))
    assert torch.allclose(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1], atol=1e-5)


def test_masks_to_labels_later_group_wins():
    m = torch.zeros(1, 3, 2, 2)
    m[0, 0, 0, 0] = m[0, 2, 0, 0] = 1  # overlap: group 3 wins
    m[0, 1, 1, 1] = 1
    assert masks_to_labels(m).tolist() == [[[3, 0], [0, 2]]]


def test_b0_preset_parameter_count():
    with torch.device("meta"):
        backbone = from_config(SegformerModel, preset_config("segformer_b0_ade512"))
        full = from_config(SegformerForSemanticSegmentation, preset_config("segformer_b0_ade512"))
    assert sum(p.numel() for p in backbone.parameters()) == 3_319_392  # MiT-b0 encoder (the "3.4M" of the paper)
    assert sum(p.numel() for p in full.parameters()) == 3_752_694  # + ADE20k decode head, 150 classes
    assert full.config.num_labels == 150
    with torch.device("meta"):
        tiny = from_config(SegformerModel, preset_config("tiny_segformer"))
    assert 10_000 < sum(p.numel() for p in tiny.parameters()) < 100_000


def test_loads_a_train_segformer_folder(tmp_path, masks):
    """A `SegformerForSemanticSegmentation.save_pretrained` folder (train-segformer's output) restores exactly its
    encoder weights; the decode head is dropped."""
    torch.manual_seed(1)
    config = preset_config("tiny_segformer") | {"num_labels": G + 1}
    trained = from_config(SegformerForSemanticSegmentation, config)
    trained.save_pretrained(tmp_path / "segformer")
    want = trained.segformer.state_dict()
    for mode in ("labels", "channels"):
        enc = encoder(mode, pretrained=str(tmp_path / "segformer"))
        got = enc.backbone.state_dict()
        assert got.keys() == want.keys()
        adapted = {"stages.0.patch_embeddings.proj.weight", "stages.0.patch_embeddings.proj.bias"}
        for key in want:
            if mode == "channels" and key in adapted:
                continue
            assert torch.equal(got[key], want[key]), key
    # load_weights=False is a random init of the preset, not the saved weights
    cfg = MaskEncoderConfig(preset="tiny_segformer", pretrained=str(tmp_path / "segformer"), input="labels")
    fresh = PartMaskEncoder(cfg, G, load_weights=False).backbone.state_dict()
    assert not torch.equal(fresh["stages.3.blocks.0.attention.q_proj.weight"],
                           want["stages.3.blocks.0.attention.q_proj.weight"])


def test_missing_weights_raise_weights_not_found(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(WeightsNotFound, match="no-such-checkpoint") as err:
        encoder(pretrained=str(missing))
    assert "missing" in str(err.value)
    with pytest.raises(WeightsNotFound, match="HF_HUB_OFFLINE") as err:
        encoder(preset="segformer_b0_ade512", pretrained="nvidia/segformer-b0-finetuned-ade-512-512")
    assert "Hugging Face cache" in str(err.value)
