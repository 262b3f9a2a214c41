"""Diversity and distribution-alignment figures for a synthetic set, in the teacher's feature space.

D2CIP defines diversity as expected pairwise separability (Eq. 8) and measures alignment with real data by
FID, JS divergence and MMD (appendix A.5.1, Eq. 23-25). Inception weights cannot be fetched offline and an
ImageNet embedding says little about Fashion-MNIST anyway, so the embedding here is the teacher's own
penultimate layer: the space in which the teacher separates the classes.

Choices where A.5.1 is silent:

* separability: mean cosine distance 1 - cos(f_i, f_j) over distinct pairs (Eq. 8 with d = cosine
  distance, the similarity of Eq. 9 without a learned head, so the figure is comparable across methods);
* JS divergence: between 2-D histograms (20 x 20 bins) of both sets projected on the first two principal
  axes of their union - the 2-D mapping D2CIP's Fig. 3 draws - with log base 2, so it lies in [0, 1] as
  A.5.1 states;
* MMD: the biased estimate of Eq. 25 with a Gaussian kernel whose bandwidth is the median pairwise distance
  of the union (the usual median heuristic).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg

import zoo


@torch.no_grad()
def teacher_features(teacher: zoo.Classifier, images_uint8: np.ndarray, device: torch.device,
                     batch_size: int = 512) -> np.ndarray:
    """Penultimate features of uint8 N x H x W x C images, as float64 N x D."""
    teacher.eval()
    out = []
    for start in range(0, len(images_uint8), batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(images_uint8[start:start + batch_size])).to(device)
        x = chunk.permute(0, 3, 1, 2).float().div_(255)
        out.append(teacher.features(x).double().cpu())
    return torch.cat(out).numpy()


def pairwise_separability(features: np.ndarray) -> float:
    """Mean cosine distance over all distinct pairs (D2CIP Eq. 8): 0 = all identical, 1 = orthogonal."""
    if len(features) < 2:
        return float("nan")
    f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    n = len(f)
    # sum_{i != j} cos = ||sum f||^2 - n, so the mean needs no n x n matrix.
    total = f.sum(axis=0)
    mean_cos = (total @ total - n) / (n * (n - 1))
    return float(1.0 - mean_cos)


def frechet_distance(real: np.ndarray, synthetic: np.ndarray) -> float:
    """FID's formula (D2CIP Eq. 23) on the given features."""
    mu1, mu2 = real.mean(axis=0), synthetic.mean(axis=0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(synthetic, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def js_divergence(real: np.ndarray, synthetic: np.ndarray, bins: int = 20) -> float:
    """JS divergence (D2CIP Eq. 24, base 2) between 2-D PCA histograms of the two sets."""
    union = np.concatenate([real, synthetic])
    centred = union - union.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2].T
    p2, q2 = (real - union.mean(axis=0)) @ axes, (synthetic - union.mean(axis=0)) @ axes
    lo, hi = np.minimum(p2.min(0), q2.min(0)), np.maximum(p2.max(0), q2.max(0))
    edges = [np.linspace(lo[d], hi[d] + 1e-9, bins + 1) for d in range(2)]
    p, _, _ = np.histogram2d(p2[:, 0], p2[:, 1], bins=edges)
    q, _, _ = np.histogram2d(q2[:, 0], q2[:, 1], bins=edges)
    p, q = p.ravel() / p.sum(), q.ravel() / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        mask = a > 0
        return float((a[mask] * np.log2(a[mask] / b[mask])).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def mmd_squared(real: np.ndarray, synthetic: np.ndarray) -> float:
    """Biased MMD^2 (D2CIP Eq. 25) with a Gaussian kernel, median-heuristic bandwidth."""
    union = np.concatenate([real, synthetic])
    sq = (union**2).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * union @ union.T, 0)
    bandwidth2 = np.median(d2[np.triu_indices(len(union), 1)])
    k = np.exp(-d2 / max(bandwidth2, 1e-12))
    n = len(real)
    return float(k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean())


def subsample(n: int, limit: int, seed: int = 0) -> np.ndarray:
    """A fixed random subset of indices (all of them when ``n <= limit``), for bounded cost."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def diversity_report(synthetic: np.ndarray, reference: np.ndarray | None = None) -> dict[str, float]:
    """All figures for feature sets; the alignment figures only when real ``reference`` features are given."""
    report = {"pairwise_separability": pairwise_separability(synthetic), "feature_samples": int(len(synthetic))}
    if reference is not None:
        report.update({
            "fid_teacher_features": frechet_distance(reference, synthetic),
            "js_divergence": js_divergence(reference, synthetic),
            "mmd2": mmd_squared(reference, synthetic),
            "reference_samples": int(len(reference)),
        })
    return report
