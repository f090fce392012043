"""FID and KID from two feature matrices, computed by torch-fidelity's own functions.

The paper computed its FIDs with torch-fidelity's command line; facediff takes the features the same way
(uint8 images, torch-fidelity's TensorFlow-1.x-compatible bilinear resize to 299, its InceptionV3) and hands
them to torch-fidelity's statistics (mean in float32, covariance in float64, `np.linalg.eigvals` of the
product) and KID (`kid_subsets` random subsets of `kid_subset_size` drawn by a NumPy RandomState seeded 2020,
polynomial kernel of degree 3), so a facediff value equals the reference's on the same images. Argument order
follows `fidelity --input1 GENERATED --input2 REAL`: the generated features first.
"""

from __future__ import annotations

from torch import Tensor
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

KID_SUBSETS = 100  # torch-fidelity's defaults
KID_SUBSET_SIZE = 1000
KID_SEED = 2020


def kid_subset_size(n_fake: int, n_real: int) -> int:
    """torch-fidelity's 1000, or the smaller set's size at small n (the reference refuses a larger subset)."""
    return min(KID_SUBSET_SIZE, n_fake, n_real)


def _check(fake: Tensor, real: Tensor) -> None:
    if len(fake) < 2 or len(real) < 2:  # RuntimeError: what callers catch for "too few samples" (people.py)
        raise RuntimeError(f"FID/KID need at least 2 feature vectors a side, got {len(fake)} generated and "
                           f"{len(real)} real")


def frechet_distance(fake: Tensor, real: Tensor) -> float:
    _check(fake, real)
    stats = [fid_features_to_statistics(f.detach().float().cpu()) for f in (fake, real)]
    return float(fid_statistics_to_metric(stats[0], stats[1], verbose=False)[KEY_METRIC_FID])


def kernel_distance(fake: Tensor, real: Tensor) -> float:
    _check(fake, real)
    out = kid_features_to_metric(fake.detach().float().cpu(), real.detach().float().cpu(), verbose=False,
                                 kid_subsets=KID_SUBSETS, kid_subset_size=kid_subset_size(len(fake), len(real)),
                                 rng_seed=KID_SEED)
    return float(out[KEY_METRIC_KID_MEAN])
