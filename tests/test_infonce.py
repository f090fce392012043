"""facediff.losses.info_nce against a per-anchor loop written straight from the definition, and hand cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from facediff.losses import info_nce


def reference(emb, attrs, threshold, temperature, include_self):
    """The definition, one anchor at a time, in float64."""
    emb, attrs = emb.double(), attrs.double()
    n, losses = len(emb), []
    for i in range(n):
        def cos(u, v):
            nu, nv = u.norm(), v.norm()
            return 0.0 if nu == 0 or nv == 0 else float(u @ v / (nu * nv))
        logit = [cos(emb[i], emb[k]) / temperature for k in range(n)]
        others = [k for k in range(n) if include_self or k != i]
        positives = [j for j in others if (j == i and include_self) or cos(attrs[i], attrs[j]) >= threshold]
        if positives:
            num = sum(math.exp(logit[j]) for j in positives)
            den = sum(math.exp(logit[k]) for k in others)
            losses.append(-math.log(num / den))
    return sum(losses) / len(losses) if losses else 0.0


@pytest.mark.parametrize("include_self", [False, True])
@pytest.mark.parametrize("threshold, temperature", [(0.8, 0.07), (0.6, 0.5), (0.9, 1.0)])
def test_matches_the_definition(include_self, threshold, temperature):
    g = torch.Generator().manual_seed(0)
    attrs = (torch.rand(12, 40, generator=g) < 0.3).float()
    attrs[6:] = attrs[:6]  # guaranteed positives (identical vectors)
    attrs[5, 0] = 1 - attrs[5, 0]  # a near copy: similarity just below 1
    emb = torch.randn(12, 16, generator=g)
    got = info_nce(emb, attrs, threshold, temperature, include_self)
    assert float(got) == pytest.approx(reference(emb, attrs, threshold, temperature, include_self), rel=1e-5, abs=1e-6)


def test_anchor_is_not_its_own_positive_nor_in_its_denominator():
    # faces 0 and 1 share attributes, face 2 differs: anchor 0's only positive is 1, its denominator {1, 2}
    attrs = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]])
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    t = 0.5
    l01, l02, l12 = 0.6 / t, 0.0 / t, 0.8 / t
    anchor0 = -math.log(math.exp(l01) / (math.exp(l01) + math.exp(l02)))
    anchor1 = -math.log(math.exp(l01) / (math.exp(l01) + math.exp(l12)))  # anchor 2 has no positive
    assert float(info_nce(emb, attrs, 0.8, t)) == pytest.approx((anchor0 + anchor1) / 2, rel=1e-6)
    # the reference code's variant keeps the diagonal (exp(1/t)) in both sums: a different, smaller value
    with_self = float(info_nce(emb, attrs, 0.8, t, include_self=True))
    assert with_self < (anchor0 + anchor1) / 2


def test_no_positive_gives_zero_that_still_backpropagates():
    emb = torch.randn(3, 4, requires_grad=True)
    loss = info_nce(emb, torch.eye(3), threshold=0.8)  # orthogonal attributes: nobody has a positive
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert emb.grad is not None and float(emb.grad.abs().sum()) == 0.0


def test_threshold_is_inclusive_and_zero_vectors_match_nothing():
    attrs = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0, 0, 0, 0.0]])
    sim = float(F.normalize(attrs[:1], dim=1) @ F.normalize(attrs[1:2], dim=1).T)  # 1/sqrt(2)
    emb = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    assert float(info_nce(emb, attrs, threshold=sim)) > 0  # 0 and 1 are positives at exactly the threshold
    assert float(info_nce(emb, attrs, threshold=sim + 1e-4)) == 0.0  # above it nobody is (zero rows never)


def test_descent_pulls_positives_together():
    g = torch.Generator().manual_seed(2)
    attrs = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0]])
    emb = torch.randn(4, 8, generator=g, requires_grad=True)
    before = F.cosine_similarity(emb[0], emb[1], dim=0).item()
    opt = torch.optim.SGD([emb], lr=0.1)
    losses = []
    for _ in range(50):
        loss = info_nce(emb, attrs, temperature=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert F.cosine_similarity(emb[0], emb[1], dim=0).item() > before
    assert F.cosine_similarity(emb[0], emb[2], dim=0).item() < F.cosine_similarity(emb[0], emb[1], dim=0).item()


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="expected"):
        info_nce(torch.randn(4, 3), torch.randn(5, 40))
