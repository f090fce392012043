"""Auxiliary losses as small functions, separate from networks and from the training loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(
    embeddings: torch.Tensor,
    attributes: torch.Tensor,
    threshold: float = 0.8,
    temperature: float = 0.07,
    include_self: bool = False,
) -> torch.Tensor:
    """Supervised InfoNCE that pulls together embeddings of faces with similar attribute vectors.

    embeddings (B, D): the attribute embedder's outputs; attributes (B, A): the multi-hot vectors they embed.
    Faces i != j are positives when the cosine similarity of their attribute vectors is >= `threshold` (an
    all-zero vector has similarity 0 with everything). Logits are the embeddings' cosine similarities divided by
    `temperature`. Per anchor i with at least one positive:

        -log( sum_{j in pos(i)} exp(l_ij) / sum_{k != i} exp(l_ik) )

    averaged over those anchors; 0 (still connected to the graph) when no anchor has a positive. An anchor is
    never its own positive and is not in its own denominator: including it adds a constant exp(1/temperature)
    to both sums, which swamps the signal at low temperatures. `include_self=True` reproduces that variant of the
    reference code (diagonal kept in numerator and denominator, so every anchor counts).
    """
    if embeddings.ndim != 2 or attributes.ndim != 2 or len(embeddings) != len(attributes):
        raise ValueError(f"expected (B, D) embeddings and (B, A) attributes, got {tuple(embeddings.shape)} "
                         f"and {tuple(attributes.shape)}")
    n = len(embeddings)
    logits = F.normalize(embeddings.float(), dim=1) @ F.normalize(embeddings.float(), dim=1).T / temperature
    attrs = F.normalize(attributes.float(), dim=1)  # zero vectors stay zero
    positive = attrs @ attrs.T >= threshold
    eye = torch.eye(n, dtype=torch.bool, device=embeddings.device)
    if include_self:
        positive = positive | eye
        candidates = torch.ones_like(eye)
    else:
        positive = positive & ~eye
        candidates = ~eye
    neg_inf = torch.finfo(logits.dtype).min
    log_denominator = logits.masked_fill(~candidates, neg_inf).logsumexp(dim=1)
    log_numerator = logits.masked_fill(~positive, neg_inf).logsumexp(dim=1)
    has_positive = positive.any(dim=1)
    # the mean over anchors with a positive, without asking the host whether there is one (a sync per step);
    # with none it is 0, still connected to the graph
    per_anchor = torch.where(has_positive, log_denominator - log_numerator, torch.zeros_like(log_numerator))
    return per_anchor.sum() / has_positive.sum().clamp_min(1)


# ------------------------------------------------------------------------------- mask-aware perceptual loss
def masked_lpips(lpips_net, x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Masked LPIPS (paper 2, Eq. 2): LPIPS's spatial distance map between `x` and `y`, averaged over each
    person's mask and summed over persons. Returns (B,).

    lpips_net: an `lpips.LPIPS` module; x, y (B, 3, H, W) in [-1, 1]; masks (B, K, H, W) in {0, 1}, one channel
    per person (an absent person is an all-zero mask and adds nothing). The spatial map is LPIPS's own: every
    layer's weighted feature distance brought to image size (bilinear) and summed over layers, so with one
    all-ones mask this equals `lpips_net(x, y)` up to that interpolation.
    """
    if x.shape != y.shape or x.ndim != 4 or masks.ndim != 4 or masks.shape[0] != x.shape[0]:
        raise ValueError(f"expected x, y (B, 3, H, W) and masks (B, K, H, W), got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}, {tuple(masks.shape)}")
    spatial = lpips_net.spatial
    lpips_net.spatial = True  # its forward reads the flag: the per-pixel map instead of the spatial mean
    try:
        distance = lpips_net(x, y).float()  # (B, 1, H, W)
    finally:
        lpips_net.spatial = spatial
    if masks.shape[-2:] != distance.shape[-2:]:
        masks = F.interpolate(masks.float(), size=distance.shape[-2:], mode="nearest")
    masks = masks.float()
    area = masks.sum(dim=(2, 3))
    per_person = (distance * masks).sum(dim=(2, 3)) / area.clamp_min(1.0)
    return per_person.masked_fill(area == 0, 0.0).sum(dim=1)


def person_masks(persons: torch.Tensor, max_persons: int | None = None) -> torch.Tensor:
    """Per-person binary masks (B, K, H, W) from label maps (B, H, W) (0 background, k person k, 255 crowd),
    built on the maps' device in one comparison. K is `max_persons` when given (the shards' fixed person count:
    no host sync; absent persons are all-zero masks), else the largest person label in the batch (read back)."""
    labels = persons.long()
    valid = labels.masked_fill(labels == 255, 0)
    if max_persons:
        k = max_persons
    else:
        k = int(valid.max().item()) if valid.numel() else 0
    ids = torch.arange(1, k + 1, device=persons.device).view(1, -1, 1, 1)
    return (valid.unsqueeze(1) == ids).float()


def _face_rows(valid: torch.Tensor) -> torch.Tensor:
    """The sample index of each valid face (N,), on `valid`'s device (the host in training: no sync)."""
    return torch.arange(len(valid), device=valid.device).unsqueeze(1).expand(valid.shape)[valid]


def face_crops(images: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor, size: int) -> torch.Tensor:
    """Differentiable crops (N, 3, size, size) of the valid boxes (B, F, 4) [x0, y0, x1, y1] in pixels. The
    selection happens where `boxes` and `valid` are (host-side columns select without a sync), then the regions
    go to the images' device."""
    from torchvision.ops import roi_align

    valid = valid.to(boxes.device)
    rois = torch.cat([_face_rows(valid).unsqueeze(1).to(boxes.dtype), boxes[valid]], dim=1)
    rois = rois.to(device=images.device, dtype=images.dtype, non_blocking=True)
    return roi_align(images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)


def face_feature_loss(face_features, x: torch.Tensor, y: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor,
                      layer_weights: dict[str, float], size: int) -> torch.Tensor:
    """Face loss (paper 2, Eq. 1): for every face k and layer l of the face-embedding network,
    α_l · ||FE_l(crop_k(x)) − FE_l(crop_k(y))||, summed over layers and over the faces of a sample. Returns (B,).

    face_features(crops) -> {layer: (N, ...)} (`models.perceptual.FaceFeatures`); boxes (B, F, 4) in pixels of
    x, y (B, 3, H, W) in [-1, 1]; valid (B, F) bool marks real faces (padding and absent faces add nothing).
    The norm is the root-mean-square of the feature difference (the L2 norm over sqrt(#elements)), so layers of
    different sizes are on one scale and α stays a plain weight."""
    out = x.new_zeros(len(x), dtype=torch.float32)
    valid = valid.bool()
    if not valid.any():  # a host-side column in training: no sync
        return out + 0.0 * x.sum()  # keeps the graph connected when no sample has a face
    fake = face_features(face_crops(x, boxes, valid, size))
    with torch.no_grad():
        real = face_features(face_crops(y, boxes, valid, size))
    per_face = sum(weight * (fake[name].float() - real[name].float()).pow(2).flatten(1).mean(1).add(1e-12).sqrt()
                   for name, weight in layer_weights.items())
    return out.index_add(0, _face_rows(valid).to(x.device, non_blocking=True), per_face)


def mask_aware_loss(ldm: torch.Tensor, lpips_term: torch.Tensor, face_term: torch.Tensor, below: torch.Tensor,
                    lpips_weight: float, face_weight: float) -> torch.Tensor:
    """Per-sample total (paper 2, Eq. 3): λ1·L_lpips + λ2·L_face + (1 − λ1 − λ2)·L_LDM where t < T (`below`),
    plain L_LDM elsewhere (λ1 = λ2 = 0 there). All inputs (B,); the perceptual terms of samples at t ≥ T are
    ignored (they are not computed)."""
    perceptual = lpips_weight * lpips_term + face_weight * face_term + (1 - lpips_weight - face_weight) * ldm
    return torch.where(below, perceptual, ldm)
