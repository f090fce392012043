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
    if not has_positive.any():
        return embeddings.sum() * 0.0
    return (log_denominator - log_numerator)[has_positive].mean()
