"""The controlnet family: masked LPIPS, the face loss, the total of paper 2's Eq. 3 against an independent
computation, ControlNet-only gradients, `facediff info` counts, loading errors of the perceptual weights."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from facediff.config import ConfigError, load_config
from facediff.data.stream.coco import MAX_FACES, decode_captions, encode_captions
from facediff.losses import face_feature_loss, mask_aware_loss, masked_lpips, person_masks
from facediff.models.info import describe
from facediff.models.perceptual import FaceFeatures, PerceptualLPIPS
from facediff.models.pretrained import WeightsNotFound
from facediff.tasks import build_task

from conftest import REPO

EXPERIMENTS = REPO / "configs" / "experiments"
TINY = EXPERIMENTS / "tiny" / "tiny_controlnet.yaml"


@pytest.fixture(scope="module")
def lpips_net():
    return PerceptualLPIPS("vgg", "random")


def images(n, size=64, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_masked_lpips_with_one_full_mask_is_lpips_and_sums_persons(lpips_net):
    x, y = images(2), images(2, seed=1)
    plain = lpips_net(x, y).flatten()
    full = masked_lpips(lpips_net, x, y, torch.ones(2, 1, 64, 64))
    assert torch.allclose(full, plain, rtol=0.03)  # the spatial map is the layers' maps upsampled
    assert lpips_net.spatial is False  # the flag is restored

    left, right = torch.zeros(2, 2, 64, 64), torch.zeros(2, 2, 64, 64)
    left[:, 0, :, :32] = 1
    right[:, 1, :, 32:] = 1
    with_absent = torch.cat([left[:, :1], right[:, 1:], torch.zeros(2, 1, 64, 64)], dim=1)
    got = masked_lpips(lpips_net, x, y, with_absent)
    lpips_net.spatial = True
    try:
        spatial = lpips_net(x, y)[:, 0]
    finally:
        lpips_net.spatial = False
    expected = spatial[:, :, :32].mean(dim=(1, 2)) + spatial[:, :, 32:].mean(dim=(1, 2))  # absent adds nothing
    assert torch.allclose(got, expected, rtol=1e-5)
    assert torch.equal(masked_lpips(lpips_net, x, y, torch.zeros(2, 3, 64, 64)), torch.zeros(2))


def test_person_masks_are_one_channel_per_person_crowd_excluded():
    persons = torch.zeros(2, 8, 8, dtype=torch.uint8)
    persons[0, :2] = 1
    persons[0, 2:4] = 3
    persons[1, 4:] = 255
    masks = person_masks(persons)
    assert masks.shape == (2, 3, 8, 8)
    assert masks[0, 0].sum() == 16 and masks[0, 1].sum() == 0 and masks[0, 2].sum() == 16
    assert masks[1].sum() == 0  # crowd is nobody's mask


def test_face_loss_is_the_weighted_rms_distance_summed_over_faces():
    net = FaceFeatures("random", ["repeat_1", "mixed_6a"])
    x, y = images(2, 96), images(2, 96, seed=1)
    x.requires_grad_(True)
    boxes = torch.zeros(2, MAX_FACES, 4)
    valid = torch.zeros(2, MAX_FACES, dtype=torch.bool)
    boxes[0, 0], boxes[0, 1], boxes[1, 0] = torch.tensor([10., 10, 50, 60]), torch.tensor([40., 5, 90, 50]), \
        torch.tensor([0., 0, 96, 96])
    valid[0, :2] = True
    weights = {"repeat_1": 0.5, "mixed_6a": 2.0}
    got = face_feature_loss(net, x, y, boxes, valid, weights, 80)
    from torchvision.ops import roi_align

    def crop(image, box):  # one face at a time, no batching: an independent computation
        return roi_align(image[None], [box[None]], output_size=(80, 80), sampling_ratio=2, aligned=True)

    expected = torch.zeros(2)
    for b, k in ((0, 0), (0, 1)):
        fx, fy = net(crop(x[b], boxes[b, k])), net(crop(y[b], boxes[b, k]))
        expected[b] += sum(w * torch.linalg.vector_norm(fx[n] - fy[n]) / fx[n].numel() ** 0.5 for n, w in weights.items())
    assert torch.allclose(got, expected, rtol=1e-4) and got[1] == 0  # sample 1's box is padding (not valid)
    got.sum().backward()
    assert x.grad.abs().sum() > 0  # differentiable through the crops


def test_total_follows_eq3_below_and_above_the_threshold():
    ldm, lp, face = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.7, 9.0]), torch.tensor([0.2, 0.0, 9.0])
    below = torch.tensor([True, True, False])
    got = mask_aware_loss(ldm, lp, face, below, 0.1, 0.5)
    assert torch.allclose(got, torch.tensor([0.1 * 0.5 + 0.5 * 0.2 + 0.4 * 1.0, 0.1 * 0.7 + 0.4 * 2.0, 3.0]))


def tiny_batch(n=6, size=64):
    persons = torch.zeros(n, size, size, dtype=torch.uint8)
    persons[:, 8:40, 8:28] = 1
    persons[::2, 30:60, 30:60] = 2
    persons[1, :6, :6] = 255
    boxes = torch.zeros(n, MAX_FACES, 4)
    valid = torch.zeros(n, MAX_FACES, dtype=torch.uint8)
    boxes[:, 0] = torch.tensor([8.0, 8, 28, 28])
    valid[:4, 0] = 1  # the last two samples have no face
    captions = ["a man standing", "two people", "a woman in a park", "a child", "people on a street", "a person"]
    return {"image": images(n, size), "caption": torch.from_numpy(encode_captions(captions[:n])), "persons": persons,
            "face_boxes": boxes, "face_valid": valid}


def test_controlnet_loss_matches_an_independent_computation():
    cfg = load_config(TINY, ["model.prompt_dropout=0", "loss.perceptual_timestep_threshold=500"])
    task = build_task(cfg)
    batch = tiny_batch()
    loss = task(batch, torch.Generator().manual_seed(4))

    # independently: the same draws, the pieces composed by hand, one sample at a time
    with torch.no_grad():
        images_ = batch["image"]
        z0 = task.backbone.encode_images(images_).float()
        x_t, t, noise = task.loss_fn.noise(z0, torch.Generator().manual_seed(4))
        assert (t < 500).any() and (t >= 500).any()  # both branches of Eq. 3 are exercised
        context = task.backbone.encode_prompts(decode_captions(batch["caption"]))
        cond = torch.zeros(len(t), 3, 64, 64)
        eps = task.denoise(x_t, t, context, cond)
        ab = task.scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        x0 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
        p, lam1, lam2 = cfg.model.perceptual, cfg.loss.masked_lpips_weight, cfg.loss.face_feature_weight
        totals = []
        for b in range(len(t)):
            ldm = F.mse_loss(eps[b], noise[b])
            if t[b] >= 500:
                totals.append(ldm)
                continue
            fake = task.backbone.decode_latents(x0[b:b + 1], clamp=False)
            real = images_[b:b + 1]
            task.lpips.spatial = True
            distance = task.lpips(fake, real)[0, 0]
            task.lpips.spatial = False
            lp = sum(distance[batch["persons"][b] == k].mean() for k in (1, 2) if (batch["persons"][b] == k).any())
            face = torch.tensor(0.0)
            if batch["face_valid"][b, 0]:
                face = face_feature_loss(task.face_features, fake, real, batch["face_boxes"][b:b + 1],
                                         batch["face_valid"][b:b + 1].bool(), p.face_layers, p.face_size)[0]
            totals.append(lam1 * lp + lam2 * face + (1 - lam1 - lam2) * ldm)
    assert loss.item() == pytest.approx(torch.stack(totals).mean().item(), rel=1e-4)
    assert task.loss_terms["below_threshold"].item() == pytest.approx((t < 500).float().mean().item())


def test_gradients_reach_only_the_controlnet_and_the_perceptual_terms_add_to_them():
    def grads(overrides):
        cfg = load_config(TINY, ["model.prompt_dropout=0", "loss.perceptual_timestep_threshold=1000", *overrides])
        task = build_task(cfg)
        task(tiny_batch(4), torch.Generator().manual_seed(0)).backward()
        for name, p in task.named_parameters():
            assert (p.grad is not None) == name.startswith("controlnet."), name
            assert p.requires_grad == name.startswith("controlnet."), name
        return torch.cat([p.grad.flatten() for p in task.controlnet.parameters()])

    plain = grads(["loss.masked_lpips_weight=0", "loss.face_feature_weight=0"])
    perceptual = grads([])
    assert plain.abs().sum() > 0 and not torch.allclose(plain, perceptual, rtol=1e-3)


def deepspeed_cast(task, dtype=torch.bfloat16):
    """What DeepSpeed 0.19's bf16 engine does to its module: parameters cast in place, buffers kept, then .to()."""
    for p in task.parameters():
        p.data = p.data.to(dtype)
    return task.to("cpu")


def test_controlnet_trains_in_bf16_with_its_frozen_networks_in_their_chosen_precision():
    cfg = load_config(TINY, ["loss.perceptual_timestep_threshold=1000", "trainer.precision=bf16"])
    task = deepspeed_cast(build_task(cfg))
    assert {name.split(".")[0] for name, _ in task.named_parameters()} == {"controlnet"}  # only what trains
    loss = task(tiny_batch(4), torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and task.loss_terms["loss_lpips"] > 0 and task.loss_terms["loss_face"] > 0
    assert task.backbone.unet.dtype == task.backbone.vae.dtype == torch.bfloat16  # the ControlNet's precision
    assert next(task.lpips.parameters()).dtype == next(task.face_features.parameters()).dtype == torch.float32
    assert all(p.grad is not None for p in task.controlnet.parameters() if p.requires_grad)


def test_info_counts_for_the_full_size_configs():
    rows = {r["name"]: r for r in describe(load_config(EXPERIMENTS / "mask_aware" / "mask_ldm_t100.yaml"))}
    assert rows["unet"]["frozen"] == 859_520_964 and rows["text_encoder"]["frozen"] == 123_060_480
    assert rows["vae"]["frozen"] == 83_653_863
    # = ControlNetModel(cross_attention_dim=768): diffusers' own SD1.5-shaped ControlNet, built independently
    assert rows["controlnet"]["trainable"] == 361_279_120 and rows["controlnet"]["frozen"] == 0
    assert rows["lpips"]["trainable"] == 0 and rows["face_net"]["trainable"] == 0
    baseline = {r["name"] for r in describe(load_config(EXPERIMENTS / "mask_aware" / "controlnet_baseline.yaml"))}
    assert "lpips" not in baseline and "face_net" not in baseline  # λ = 0: the networks are not even built


def test_missing_perceptual_weights_name_where_they_were_looked_for(tmp_path):
    with pytest.raises(WeightsNotFound, match=r"LPIPS vgg trunk: weights not found: looked at .*vgg16-397923af\.pth"):
        PerceptualLPIPS("vgg", "imagenet") if not (Path(torch.hub.get_dir()) / "checkpoints/vgg16-397923af.pth").exists() \
            else PerceptualLPIPS("vgg", str(tmp_path / "vgg16-397923af.pth"))
    with pytest.raises(WeightsNotFound, match=rf"looked at {tmp_path}/face\.pt"):
        FaceFeatures(str(tmp_path / "face.pt"), ["repeat_1"])
    with pytest.raises(ValueError, match=r"face_layers: \['nope'\] are not modules"):
        FaceFeatures("random", ["nope"])


def test_config_refusals():
    with pytest.raises(ConfigError, match=r"masked_lpips_weight \(.*\) \+ loss\.face_feature_weight \(.*\) = 1\.2 exceeds 1"):
        load_config(TINY, ["loss.masked_lpips_weight=0.7"])
    assert load_config(TINY, ["data.use_latents=true"]).data.use_latents  # SD-VAE latents (test_latents.py)
    with pytest.raises(ConfigError, match=r"command line: data\.use_latents: needs a family that trains on cached "
                                          r"latents \(lc_unet, sd_lora, controlnet\), but model\.family .*is 'unet'"):
        load_config(EXPERIMENTS / "tiny" / "tiny_unet.yaml", ["data.use_latents=true"])


def test_training_steps_change_the_controlnet_and_leave_the_base_bit_identical():
    cfg = load_config(TINY, ["model.prompt_dropout=0", "loss.perceptual_timestep_threshold=1000"])
    task, fresh = build_task(cfg), build_task(cfg)
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        task(tiny_batch(4), generator).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after, before = task.state_dict(), fresh.state_dict()
    moved = [k for k in after if k.startswith("controlnet.") and not torch.equal(after[k], before[k])]
    assert moved and all(torch.equal(after[k], before[k]) for k in after if not k.startswith("controlnet."))


def test_an_untrained_config_is_plain_stable_diffusion():
    """`facediff evaluate CONFIG` builds the model untrained; a fresh ControlNet's zero convolutions add exactly
    nothing, so it is the plain SD pipeline (Table 1's "Stable Diffusion" row)."""
    from facediff.runs.load import load_model

    cfg, task = load_model(TINY)
    assert cfg.model.family == "controlnet" and not task.training
    z = torch.randn(2, *task.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    context = task.backbone.encode_prompts(["two people", "a man"])
    with torch.no_grad():
        with_branch = task.denoise(z, t, context, task.conditioning(None, 2))
        plain = task.unet(z, t, encoder_hidden_states=context).sample
    assert torch.equal(with_branch, plain)
