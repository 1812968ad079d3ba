"""CCA Merge: map every model onto model 0 by canonical correlation analysis."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from graphmerge.matching_functions.common import Statistics, feature_width
from graphmerge.matching_functions.registry import register

PAPER = (
    "Horoi et al. 2024, Harmony in Diversity: Merging Neural Networks with Canonical "
    "Correlation Analysis, ICML"
)

# Relative to the largest: a canonical correlation below UNCORRELATED, or a variance
# below NO_VARIANCE, is float32 rounding of the features, not signal.
UNCORRELATED = 1e-6
NO_VARIANCE = 1e-7


@register("cca", paper=PAPER)
def cca(stats: Statistics, num_models: int, gamma: float = 1.0) -> tuple[Tensor, Tensor]:
    """Align every model to model 0 by the canonical directions of their features.

    S_xx = C_00 + gamma I, S_yy = C_ii + gamma I, S_xy = C_0i; SVD S_xx^-1/2 S_xy S_yy^-1/2 =
    U S V^T; M_i = S_xx^1/2 U V^T S_yy^-1/2 / N, U_i = S_yy^1/2 V U^T S_xx^-1/2 (model 0: I).
    Directions of zero canonical correlation (LayerNorm outputs: their channels sum to
    a constant) are paired by the whitened means rather than arbitrarily.

    Args:
        gamma: >= 0, the absolute ridge added to both covariances (default 1.0, best of
            1e-4..10 on digits ResNet-20 x4; large gamma tends to the orthogonal Procrustes
            map U V^T of the cross-covariance); directions of zero variance are dropped
            (pseudo-inverse) when gamma = 0.

    LayerNorm over channels is not equivariant to maps that mix channels: on LayerNorm
    models prefer permute or zip.
    """
    width = feature_width(stats, num_models)
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"cca needs a finite ridge gamma >= 0, got {gamma!r}")
    covariance = stats.covariance.detach().cpu().double()
    mean = stats.mean.detach().cpu().double()
    blocks = [slice(i * width, (i + 1) * width) for i in range(num_models)]
    eye = torch.eye(width, dtype=torch.float64)
    ridge = gamma * eye
    root_x, inverse_root_x = _roots(covariance[blocks[0], blocks[0]] + ridge)
    merges, unmerges = [eye], [eye]
    for block in blocks[1:]:
        root_y, inverse_root_y = _roots(covariance[block, block] + ridge)
        cross = inverse_root_x @ covariance[blocks[0], block] @ inverse_root_y
        whitened_means = (inverse_root_x @ mean[blocks[0]], inverse_root_y @ mean[block])
        rotation = _rotation(cross, *whitened_means)
        merges.append(root_x @ rotation @ inverse_root_y)
        unmerges.append(root_y @ rotation.T @ inverse_root_x)
    return torch.cat(merges, dim=1) / num_models, torch.cat(unmerges, dim=0)


def _rotation(cross: Tensor, mean_x: Tensor, mean_y: Tensor) -> Tensor:
    """U V^T of the SVD of ``cross``, its directions without correlation paired by the means.

    Singular vectors of zero singular values are arbitrary (for instance the one
    direction LayerNorm outputs do not vary in); there the map is the reflection
    that carries the projected mean of y onto that of x, the only signal left.
    """
    left, singular, right_t = torch.linalg.svd(cross)
    rank = int((singular > UNCORRELATED * singular.max().clamp(min=1e-300)).sum())
    rotation = left[:, :rank] @ right_t[:rank]
    if rank < cross.shape[0]:
        null_left, null_right = left[:, rank:], right_t[rank:].T
        target, source = null_left.T @ mean_x, null_right.T @ mean_y
        reflection = torch.eye(cross.shape[0] - rank, dtype=cross.dtype)
        if target.norm() > 1e-12 and source.norm() > 1e-12:
            normal = source / source.norm() - target / target.norm()
            if normal.norm() > 1e-12:
                reflection -= 2 * torch.outer(normal, normal) / normal.dot(normal)
        rotation = rotation + null_left @ reflection @ null_right.T
    return rotation


def _roots(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """S^1/2 and the pseudo-inverse S^-1/2 of a symmetric PSD matrix, by eigh.

    Directions of (relatively) no variance are dropped from S^-1/2, so that rounding
    noise is never amplified.
    """
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    tolerance = values.max().clamp(min=0) * NO_VARIANCE
    kept = values > tolerance
    root = values.clamp(min=0).sqrt()
    inverse_root = torch.where(kept, 1.0 / root.where(kept, torch.ones_like(root)), 0.0)
    return (vectors * root) @ vectors.T, (vectors * inverse_root) @ vectors.T
