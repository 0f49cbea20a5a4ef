"""How alike are two maps: Pearson, Spearman rank correlation, SSIM (NumPy and OpenCV only).

Adebayo et al.'s sanity checks report Spearman rank correlation and SSIM between the original map
and the map of the randomised model; SSIM here is scikit-image's `structural_similarity` with its
defaults (Wang et al. 2004 with a 7x7 uniform window, sample covariance, K1 = 0.01, K2 = 0.03,
border of 3 pixels cropped), which is what Adebayo et al. and Quantus call.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError

SSIM_WINDOW = 7


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps; NaN when either is constant (an all-zero map has no ranking to
    agree or disagree with; callers skip NaN when averaging)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (scipy.stats.rankdata's 'average')."""
    values = np.asarray(values).reshape(-1)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    average = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(average, ends - starts)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (Pearson of their average ranks)."""
    return pearson(average_ranks(a), average_ranks(b))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Mean structural similarity of two [H, W] maps (scikit-image's defaults, see the module)."""
    import cv2

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise UsageError(f"SSIM compares two maps of one shape [H, W]; got {a.shape} and {b.shape}")
    if min(a.shape) < SSIM_WINDOW:
        raise UsageError(f"SSIM needs maps of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {a.shape}")
    window = (SSIM_WINDOW, SSIM_WINDOW)

    def mean(v):
        return cv2.blur(v, window, borderType=cv2.BORDER_REFLECT)

    n = SSIM_WINDOW * SSIM_WINDOW
    sample = n / (n - 1)
    ua, ub = mean(a), mean(b)
    va = sample * (mean(a * a) - ua * ua)
    vb = sample * (mean(b * b) - ub * ub)
    vab = sample * (mean(a * b) - ua * ub)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ua * ub + c1) * (2 * vab + c2)) / ((ua * ua + ub * ub + c1) * (va + vb + c2))
    pad = (SSIM_WINDOW - 1) // 2
    return float(s[pad:-pad, pad:-pad].mean())
