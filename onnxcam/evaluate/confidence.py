"""Average drop and increase in confidence (Chattopadhay, Sarkar, Howlader & Balasubramanian,
"Grad-CAM++: Generalized Gradient-based Visual Explanations for Deep Convolutional Networks", WACV
2018, section 5.1), and pytorch-grad-cam's per-image forms (`metrics/cam_mult_image.py`).

The explanation map image is the input multiplied by the map, pixel by pixel (on the model's input
tensor, as pytorch-grad-cam's `multiply_tensor_with_cam`). With Y the class score on the image and
O the score on the explanation map image:
- average drop  = 100 * mean_i max(0, Y_i - O_i) / Y_i   (lower is better; the paper);
- increase in confidence = 100 * mean_i [O_i > Y_i]       (higher is better; the paper);
- pytorch-grad-cam's DropInConfidence per image is max(0, Y - O) (not divided by Y) and its
  IncreaseInConfidence per image is float(O - Y > 0); both are returned too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ConfidenceResult:
    original: np.ndarray  # [N] Y
    explained: np.ndarray  # [N] O
    drop: np.ndarray  # [N] max(0, Y - O): pytorch-grad-cam's DropInConfidence
    relative_drop: np.ndarray  # [N] max(0, Y - O) / Y: the paper's term
    increase: np.ndarray  # [N] 1.0 where O > Y: IncreaseInConfidence

    @property
    def average_drop(self) -> float:
        """Percent, as in the Grad-CAM++ paper."""
        return float(100 * self.relative_drop.mean())

    @property
    def increase_in_confidence(self) -> float:
        return float(100 * self.increase.mean())


def explanation_images(scorer, x: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """x multiplied by its map, in the model's layout."""
    return (x * scorer.pixel_mask(np.asarray(maps, dtype=x.dtype))).astype(x.dtype)


def confidence_change(scorer, x, maps, classes) -> ConfidenceResult:
    x = np.asarray(x, dtype=np.float32)
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    y = scorer.scores(x, classes)
    o = scorer.scores(explanation_images(scorer, x, maps), classes)
    drop = np.maximum(y - o, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(y > 0, drop / np.where(y > 0, y, 1.0), 0.0)
    return ConfidenceResult(original=y, explained=o, drop=drop, relative_drop=relative,
                            increase=(o - y > 0).astype(np.float64))
