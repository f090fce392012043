"""Bootstrap 95% intervals of FID and KID over the generated set, from features (no image is resampled).

Each resample draws the generated features with replacement (seeded); the real features stay fixed. FID per
resample is exact but cheap: with n generated vectors of width d, the nonzero eigenvalues of S_real S_b are those
of the n x n matrix C K[idx][:, idx] C / (n - 1), with K = F S_real F^T computed once and C the centring matrix,
so a resample costs one n x n symmetric eigendecomposition (d x d when n > d). KID per resample is the unbiased
MMD^2 on whole sets (torch-fidelity's estimator when the subset is the whole set, as at n <= 1000), pairs of one
generated vector with its own duplicate left out. The interval is the 2.5th and 97.5th percentile.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _poly_kernel(x: Tensor, y: Tensor) -> Tensor:
    return (x @ y.T / x.shape[1] + 1) ** 3  # torch-fidelity's KID kernel: degree 3, gamma 1/d, coef0 1


def _centred_cov(x: Tensor) -> Tensor:
    centred = x - x.mean(0)
    return centred.T @ centred / (len(x) - 1)


def _fid_resample(fake: Tensor, idx: Tensor, real_mean: Tensor, real_trace: Tensor, k_fake: Tensor | None,
                  sqrt_real: Tensor | None) -> float:
    sample = fake[idx]
    mean = sample.mean(0)
    n = len(idx)
    trace = ((sample - mean) ** 2).sum() / (n - 1)
    if k_fake is not None:
        centre = torch.eye(n, dtype=fake.dtype, device=fake.device) - 1.0 / n
        product = centre @ k_fake[idx][:, idx] @ centre / (n - 1)
    else:
        product = sqrt_real @ _centred_cov(sample) @ sqrt_real
    eig = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0)
    return float(((real_mean - mean) ** 2).sum() + real_trace + trace - 2 * eig.sqrt().sum())


def _kid_resample(idx: Tensor, rr_term: Tensor, k_ff: Tensor, k_rf: Tensor) -> float:
    distinct = idx[:, None] != idx[None, :]  # a vector and its own duplicate are not a pair
    if not distinct.any():  # a small set resampled as one vector n times has no pair: no estimate (left out)
        return float("nan")
    return float(rr_term + k_ff[idx][:, idx][distinct].mean() - 2 * k_rf[:, idx].mean())


def bootstrap_intervals(fake: Tensor, real: Tensor, resamples: int, seed: int) -> dict[str, tuple[float, float]]:
    """{"fd": (lo, hi), "kd": (lo, hi)}: 95% percentile intervals over `resamples` resamples of `fake`."""
    fake, real = fake.double(), real.double()
    n, m, d = len(fake), len(real), fake.shape[1]
    real_mean, cov_real = real.mean(0), _centred_cov(real)
    real_trace = torch.trace(cov_real)
    if n <= d:
        k_fake, sqrt_real = fake @ cov_real @ fake.T, None
    else:
        values, vectors = torch.linalg.eigh(cov_real)
        k_fake, sqrt_real = None, vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    k_rr = _poly_kernel(real, real)
    rr_term = (k_rr.sum() - torch.trace(k_rr)) / (m * (m - 1))
    k_ff, k_rf = _poly_kernel(fake, fake), _poly_kernel(real, fake)
    generator = torch.Generator().manual_seed(seed)
    fds, kds = [], []
    for _ in range(resamples):
        idx = torch.randint(n, (n,), generator=generator).to(fake.device)
        fds.append(_fid_resample(fake, idx, real_mean, real_trace, k_fake, sqrt_real))
        kds.append(_kid_resample(idx, rr_term, k_ff, k_rf))
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    return {name: tuple(float(v) for v in torch.nanquantile(torch.tensor(values, dtype=torch.float64), q))
            for name, values in (("fd", fds), ("kd", kds))}
