"""ROAD: RemOve And Debias (Rong, Leemann, Borisov, Kasneci & Kasneci, "A Consistent and Efficient
Evaluation Strategy for Attribution Methods", ICML 2022), as pytorch-grad-cam implements it
(`pytorch_grad_cam/metrics/road.py`, after the authors' `road_evaluation/imputations.py`).

For a percentile p, MoRF (most relevant first) removes the pixels whose map value is at least the
p-th percentile of the map (np.percentile), LeRF (least relevant first) those whose value is at
most the (100 - p)-th, i.e. the same rule on 1 - map. Removed pixels are not set to a constant,
which would leak the mask's shape: they are *imputed* by noisy linear imputation — each removed
pixel equals the weighted mean of its 8 neighbours (1/6 for edge neighbours, 1/12 for corners;
neighbours outside the image drop out of the sum and of the pixel's own weight), a sparse linear
system solved per channel, plus Gaussian noise of standard deviation `noise` (0.01). The metric is
the change of the class score, score(imputed) - score(original), averaged over the percentiles
(10, 20, ..., 90 by default). MoRF should fall fast (more negative is better), LeRF stay
(higher is better); pytorch-grad-cam's ROADCombined reports (LeRF - MoRF) / 2 (higher is better).

Imputation solves one sparse system per image and percentile (SciPy); the imputed images are then
scored in batches through one session. SciPy is imported only here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from ..errors import UsageError

PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
NOISE = 0.01
# (row offset, column offset) -> weight, the 8-neighbourhood of the ROAD paper.
NEIGHBOURS = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
              ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))


@dataclass
class RoadResult:
    score: np.ndarray  # [N]: the mean score change over the percentiles
    changes: np.ndarray  # [N, P]: the score change at each percentile
    percentiles: tuple
    order: str


def removal_mask(cam: np.ndarray, percentile: float, order: str) -> np.ndarray:
    """Boolean [H, W], True where the pixel is kept (pytorch-grad-cam's `binary_mask`)."""
    if order == "lerf":
        cam = 1 - cam
    elif order != "morf":
        raise UsageError(f"unknown ROAD order {order!r}; choose morf or lerf")
    return cam < np.percentile(cam, percentile)


def noisy_linear_impute(image: np.ndarray, keep: np.ndarray, noise: float = NOISE,
                        rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Fill the pixels where `keep` is False from their neighbours: image [C, H, W], keep [H, W].

    Every removed pixel i satisfies  w_i x_i - sum_{removed j ~ i} w_ij x_j = sum_{kept j ~ i} w_ij v_j,
    with w_i the sum of the weights of i's in-image neighbours; then noise * N(0, 1) is added.
    """
    try:
        from scipy.sparse import coo_matrix
        from scipy.sparse.linalg import spsolve
    except ImportError:
        raise UsageError('ROAD\'s imputation needs SciPy: pip install "onnxcam[evaluate]" (or leave out the '
                         "road metric: --metrics deletion,insertion,...)") from None
    c, h, w = image.shape
    keep = np.asarray(keep, bool)
    flat = image.reshape(c, -1).astype(np.float64)
    removed = np.flatnonzero(~keep.reshape(-1))
    out = flat.copy()
    if removed.size == 0:
        return out.reshape(image.shape).astype(image.dtype)
    variable = np.full(h * w, -1)
    variable[removed] = np.arange(removed.size)
    rows, cols = np.divmod(removed, w)
    diagonal = np.zeros(removed.size)
    right = np.zeros((removed.size, c))
    entries_r, entries_c, entries_v = [], [], []
    for (dr, dc), weight in NEIGHBOURS:
        r, cc = rows + dr, cols + dc
        inside = (r >= 0) & (r < h) & (cc >= 0) & (cc < w)
        diagonal[inside] += weight
        neighbour = r[inside] * w + cc[inside]
        eq = np.flatnonzero(inside)
        known = variable[neighbour] < 0
        right[eq[known]] += weight * flat[:, neighbour[known]].T
        entries_r.append(eq[~known])
        entries_c.append(variable[neighbour[~known]])
        entries_v.append(np.full((~known).sum(), -weight))
    entries_r.append(np.arange(removed.size))
    entries_c.append(np.arange(removed.size))
    entries_v.append(diagonal)
    system = coo_matrix((np.concatenate(entries_v), (np.concatenate(entries_r), np.concatenate(entries_c))),
                        shape=(removed.size, removed.size)).tocsc()
    solution = spsolve(system, right).reshape(removed.size, c)
    if noise:
        rng = rng if rng is not None else np.random.default_rng(0)
        solution = solution + noise * rng.standard_normal(solution.shape)
    out[:, removed] = solution.T
    return out.reshape(image.shape).astype(image.dtype)


def road(scorer, x, maps, classes, order: str = "morf", percentiles: Sequence[float] = PERCENTILES,
         noise: float = NOISE, seed: int = 0) -> RoadResult:
    """ROAD MoRF or LeRF: the mean score change after imputing the removed pixels, per image."""
    x = np.asarray(x, dtype=np.float32)
    maps = np.asarray(maps)  # float32 stays float32: the percentile thresholds match pytorch-grad-cam's
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    percentiles = tuple(percentiles)
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    channels_first = scorer.layout == "NCHW"

    def imputed() -> Iterator:
        jobs = [(i, p) for i in range(n) for p in percentiles]
        for j in range(0, len(jobs), scorer.batch_size):
            batch = []
            for i, p in jobs[j:j + scorer.batch_size]:
                image = x[i] if channels_first else np.moveaxis(x[i], -1, 0)
                filled = noisy_linear_impute(image, removal_mask(maps[i], p, order), noise, rng)
                batch.append(filled if channels_first else np.moveaxis(filled, 0, -1))
            chunk = jobs[j:j + scorer.batch_size]
            yield np.stack(batch), classes[[i for i, _ in chunk]]

    before = scorer.scores(x, classes)
    after = scorer.scores_of(imputed()).reshape(n, len(percentiles))
    changes = after - before[:, None]
    return RoadResult(score=changes.mean(axis=1), changes=changes, percentiles=percentiles, order=order)


def road_combined(morf: RoadResult, lerf: RoadResult) -> np.ndarray:
    """pytorch-grad-cam's ROADCombined: (LeRF - MoRF) / 2 per image (higher is better)."""
    return (lerf.score - morf.score) / 2
