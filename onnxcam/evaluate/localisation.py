"""Does the map point at the object? Metrics against a ground-truth region (a box or a mask).

- Pointing game (Zhang, Bargal, Lin, Brandt, Shen & Sclaroff, "Top-down Neural Attention by
  Excitation Backprop", ECCV 2016): a hit when the map's maximum lies in the region (or within
  `tolerance` pixels of it; the paper uses 15, Quantus's PointingGame 0, our default).
- Energy-based pointing game (Wang et al., "Score-CAM: Score-Weighted Visual Explanations for
  Convolutional Neural Networks", CVPR workshops 2020, section 5.2): the share of the map's mass
  that falls in the region — on BlockMNIST, the attribution share of the digit block.
- Top-k precision: the share of the k highest-ranked pixels that fall in the region.
- Weakly-supervised localisation (Selvaraju et al., "Grad-CAM", ICCV 2017, section 4.1, after Zhou
  et al.'s CAM): keep the pixels above `fraction` (0.15) of the map's maximum, take the bounding box
  of the largest connected segment, and score it by IoU with the ground-truth box; a success when
  IoU >= 0.5.

Boxes are (x0, y0, x1, y1) in pixels, x1/y1 exclusive, in the frame of the map (the original
photo in `onnxcam evaluate`, whose maps are mapped back onto it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..errors import UsageError

WSOL_FRACTION = 0.15


def box_mask(boxes: Sequence[Sequence[float]], size: Tuple[int, int]) -> np.ndarray:
    """Boolean [H, W], True inside any of the boxes (clipped to the image)."""
    h, w = size
    mask = np.zeros((h, w), bool)
    for box in boxes:
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        mask[max(y0, 0):max(min(y1, h), 0), max(x0, 0):max(min(x1, w), 0)] = True
    return mask


def pointing_game(cam: np.ndarray, region: np.ndarray, tolerance: float = 0.0) -> bool:
    """Is the map's maximum (every pixel that attains it) in the region, or within `tolerance` px?"""
    cam = np.asarray(cam)
    region = _check_region(cam, region)
    if not region.any():
        raise UsageError("pointing game: the ground-truth region is empty")
    peaks = np.argwhere(cam == cam.max())
    if tolerance > 0:
        import cv2

        distance = cv2.distanceTransform((~region).astype(np.uint8), cv2.DIST_L2, 5)
        return bool((distance[peaks[:, 0], peaks[:, 1]] <= tolerance).any())
    return bool(region[peaks[:, 0], peaks[:, 1]].any())


def energy_pointing_game(cam: np.ndarray, region: np.ndarray) -> float:
    """Share of the (non-negative part of the) map's mass inside the region; 0 for an empty map."""
    cam = np.maximum(np.asarray(cam, dtype=np.float64), 0)
    region = _check_region(cam, region)
    total = cam.sum()
    return float(cam[region].sum() / total) if total > 0 else 0.0


def top_k_precision(cam: np.ndarray, region: np.ndarray, k: int) -> float:
    """Share of the map's k highest pixels that lie in the region (ties broken by position), as
    BlockMNIST's attribution-ranking measure (Shah et al. 2021): a map that knows where the signal
    is ranks the signal block's pixels first."""
    cam = np.asarray(cam, dtype=np.float64)
    region = _check_region(cam, region)
    if not 0 < k <= cam.size:
        raise UsageError(f"top-k precision: k must be in 1..{cam.size}, got {k}")
    top = np.argsort(-cam.reshape(-1), kind="stable")[:k]
    return float(region.reshape(-1)[top].mean())


def largest_segment_box(cam: np.ndarray, fraction: float = WSOL_FRACTION):
    """(x0, y0, x1, y1) of the largest 8-connected segment above fraction * max, or None."""
    import cv2

    cam = np.asarray(cam, dtype=np.float64)
    peak = cam.max()
    if not peak > 0:
        return None
    binary = (cam >= fraction * peak).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if count < 2:
        return None
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(stats[best, k]) for k in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH,
                                                 cv2.CC_STAT_HEIGHT))
    return (x, y, x + w, y + h)


def box_iou(a, b) -> float:
    ax0, ay0, ax1, ay1 = map(float, a)
    bx0, by0, bx1, by1 = map(float, b)
    iw, ih = max(0.0, min(ax1, bx1) - max(ax0, bx0)), max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def localisation_iou(cam: np.ndarray, boxes: Sequence[Sequence[float]], fraction: float = WSOL_FRACTION) -> float:
    """The best IoU between the map's box and any ground-truth box (0 when the map is empty)."""
    predicted = largest_segment_box(cam, fraction)
    if predicted is None or not boxes:
        return 0.0
    return max(box_iou(predicted, box) for box in boxes)


def _check_region(cam, region) -> np.ndarray:
    region = np.asarray(region).astype(bool)
    if region.shape != np.shape(cam):
        raise UsageError(f"the ground-truth region has shape {region.shape}, the map {np.shape(cam)}; "
                         "they must match (boxes and masks are in the photo's pixels)")
    return region


# ------------------------------------------------------------------------------ ground truth I/O

def load_boxes(path) -> Dict[str, List[List[float]]]:
    """A JSON file {"image name or stem": [[x0, y0, x1, y1], ...], ...} (a single box may be given flat)."""
    path = Path(os.fspath(path))
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the boxes file ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError(f'{path}: expected {{"image": [[x0, y0, x1, y1], ...]}}, got a {type(data).__name__}')
    boxes = {}
    for key, value in data.items():
        items = value if value and isinstance(value[0], (list, tuple)) else [value]
        for box in items:
            if len(box) != 4 or not all(isinstance(v, (int, float)) for v in box) or box[2] <= box[0] \
                    or box[3] <= box[1]:
                raise UsageError(f"{path}: image {key!r}: a box must be [x0, y0, x1, y1] with x1 > x0 and "
                                 f"y1 > y0; got {box}")
        boxes[str(key)] = [list(map(float, b)) for b in items]
    return boxes


def boxes_for(boxes: Dict[str, list], image_name: str):
    """The boxes recorded for an image, by its path, file name or stem; None when absent."""
    path = Path(image_name)
    for key in (image_name, path.name, path.stem):
        if key in boxes:
            return boxes[key]
    return None


def load_mask(folder, image_name: str, size: Tuple[int, int]):
    """The mask image for `image_name` in `folder` (same stem, any image format), True where > 0;
    None when there is none. A mask of another size than the photo is an error."""
    from ..io.images import IMAGE_EXTENSIONS, read_image

    stem = Path(image_name).stem
    for candidate in sorted(Path(os.fspath(folder)).glob(stem + ".*")):
        if candidate.suffix.lower() in IMAGE_EXTENSIONS:
            mask = read_image(candidate).max(axis=2) > 0
            if mask.shape != tuple(size):
                raise UsageError(f"{candidate}: mask is {mask.shape[1]}x{mask.shape[0]}, the photo "
                                 f"{size[1]}x{size[0]}; masks must have the photo's size")
            return mask
    return None
