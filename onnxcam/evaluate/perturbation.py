"""Deletion and insertion (Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of
Black-box Models", BMVC 2018, section 4.1).

Pixels are ranked by the map, most salient first (ties broken by position, a stable sort). Deletion
starts from the image and replaces ceil(H*W / steps) pixels per step by a baseline; insertion starts
from the baseline and puts the image's pixels back in the same order. The score of the explained
class is recorded after every step, and the metric is the area under that curve over the fraction
of pixels changed (trapezoids, as RISE's `auc`): low for deletion and high for insertion mean the
map found the pixels the model relies on. Baselines act on the model's input tensor, as RISE does:
"zeros" (RISE's deletion), "blur" (RISE's insertion: Gaussian, kernel 11, sigma 5) or "mean" (each
channel's mean over the image).

All the perturbed images of all curves are built batch by batch and scored through one ONNX
Runtime session; memory holds one batch of images, never a whole curve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..errors import UsageError

BASELINES = ("zeros", "blur", "mean")
BLUR_KERNEL, BLUR_SIGMA = 11, 5.0


@dataclass
class CurveResult:
    auc: np.ndarray  # [N]
    curves: np.ndarray  # [N, steps + 1]: the score after 0, 1, ... steps
    fractions: np.ndarray  # [steps + 1]: the fraction of pixels changed at each point
    baseline: str


def auc(curve: np.ndarray) -> np.ndarray:
    """Area under curve(s) sampled evenly on [0, 1] by the trapezoidal rule (RISE's `auc`)."""
    curve = np.asarray(curve, dtype=np.float64)
    n = curve.shape[-1]
    return (curve.sum(axis=-1) - curve[..., 0] / 2 - curve[..., -1] / 2) / (n - 1)


def baseline_images(scorer, x: np.ndarray, baseline: str) -> np.ndarray:
    """The image every pixel is moved towards (deletion) or from (insertion), in the model's layout."""
    if baseline == "zeros":
        return np.zeros_like(x)
    axes = scorer.spatial_axes
    if baseline == "mean":
        return np.broadcast_to(x.mean(axis=axes, keepdims=True), x.shape).copy()
    if baseline == "blur":
        import cv2

        hw_last = np.moveaxis(x, axes, (-2, -1))  # [N, C, H, W] whatever the layout
        blurred = np.empty_like(hw_last)
        for index in np.ndindex(hw_last.shape[:-2]):
            blurred[index] = cv2.GaussianBlur(np.ascontiguousarray(hw_last[index], dtype=np.float32),
                                              (BLUR_KERNEL, BLUR_KERNEL), BLUR_SIGMA,
                                              borderType=cv2.BORDER_REFLECT_101)
        return np.moveaxis(blurred, (-2, -1), axes)
    raise UsageError(f"unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)}")


def salience_rank(maps: np.ndarray) -> np.ndarray:
    """[N, H, W] int: each pixel's position in the order most salient first (0 = the most salient)."""
    n = maps.shape[0]
    flat = maps.reshape(n, -1)
    order = np.argsort(-flat, axis=1, kind="stable")
    rank = np.empty_like(order)
    rank[np.arange(n)[:, None], order] = np.arange(flat.shape[1])[None, :]
    return rank.reshape(maps.shape)


def _step_plan(n_pixels: int, steps: int):
    if steps < 1:
        raise UsageError(f"steps must be at least 1, got {steps}")
    per_step = -(-n_pixels // min(steps, n_pixels))
    n_steps = -(-n_pixels // per_step)
    return per_step, n_steps


def deletion(scorer, x, maps, classes, steps: int = 50, baseline: str = "zeros") -> CurveResult:
    """Deletion AUC: the score as the most salient pixels are replaced by `baseline` (lower is better)."""
    return _causal_curve(scorer, x, maps, classes, steps, baseline, insert=False)


def insertion(scorer, x, maps, classes, steps: int = 50, baseline: str = "blur") -> CurveResult:
    """Insertion AUC: the score as the most salient pixels are put back on `baseline` (higher is better)."""
    return _causal_curve(scorer, x, maps, classes, steps, baseline, insert=True)


def _causal_curve(scorer, x, maps, classes, steps, baseline, insert: bool) -> CurveResult:
    x = np.asarray(x, dtype=np.float32)
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    n = x.shape[0]
    h, w = scorer.spatial_size(x)
    per_step, n_steps = _step_plan(h * w, steps)
    base = baseline_images(scorer, x, baseline)
    start, finish = (base, x) if insert else (x, base)
    rank = salience_rank(np.asarray(maps))

    def perturbed() -> Iterator:
        jobs = [(i, k) for i in range(n) for k in range(n_steps + 1)]
        for j in range(0, len(jobs), scorer.batch_size):
            chunk = jobs[j:j + scorer.batch_size]
            idx = np.array([i for i, _ in chunk])
            changed = np.stack([rank[i] < k * per_step for i, k in chunk])  # [B, H, W]
            mask = scorer.pixel_mask(changed)
            yield np.where(mask, finish[idx], start[idx]), classes[idx]

    curves = scorer.scores_of(perturbed()).reshape(n, n_steps + 1)
    fractions = np.minimum(np.arange(n_steps + 1) * per_step, h * w) / (h * w)
    return CurveResult(auc=auc(curves), curves=curves, fractions=fractions, baseline=baseline)
