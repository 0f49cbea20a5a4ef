"""Heatmaps on photos: colour a [0,1] map with an OpenCV colormap and blend it over the image.

The PNG and .npy writers go through a temporary file and a rename, so a file under its final
name is always complete.
"""

from __future__ import annotations

import difflib
import io

import numpy as np

from ..errors import OutputError, UsageError
from .files import atomic_write_bytes

DEFAULT_COLORMAP = "jet"
DEFAULT_ALPHA = 0.5


def colormap_names() -> list:
    import cv2

    return sorted(name[len("COLORMAP_"):].lower() for name in dir(cv2) if name.startswith("COLORMAP_"))


def colormap_id(name: str) -> int:
    """OpenCV's colormap constant for a name such as "jet", "turbo", "inferno"."""
    import cv2

    value = getattr(cv2, "COLORMAP_" + str(name).upper(), None)
    if value is None:
        names = colormap_names()
        close = difflib.get_close_matches(str(name).lower(), names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"unknown colormap {name!r}{hint} (OpenCV has {', '.join(names)})")
    return int(value)


def colorize(heat: np.ndarray, colormap: str = DEFAULT_COLORMAP) -> np.ndarray:
    """uint8 RGB [H, W, 3] for a [H, W] map with values in [0, 1] (clipped; NaN counts as 0)."""
    import cv2

    heat = np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    levels = np.round(np.clip(heat, 0.0, 1.0) * 255).astype(np.uint8)
    return cv2.applyColorMap(levels, colormap_id(colormap))[:, :, ::-1]


def blend(image: np.ndarray, heat: np.ndarray, alpha: float = DEFAULT_ALPHA,
            colormap: str = DEFAULT_COLORMAP) -> np.ndarray:
    """Blend the coloured map over the uint8 RGB image: (1 - alpha) * image + alpha * colour."""
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"--alpha must be between 0 and 1, got {alpha}")
    image = np.asarray(image)
    if image.shape[:2] != np.shape(heat):
        raise ValueError(f"map {np.shape(heat)} and image {image.shape[:2]} differ in size")
    colour = colorize(heat, colormap).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colour
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def write_png(path, rgb: np.ndarray):
    """Write a uint8 RGB (or gray) image as PNG, atomically."""
    import cv2

    rgb = np.asarray(rgb)
    bgr = rgb[:, :, ::-1] if rgb.ndim == 3 else rgb
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(bgr))
    if not ok:
        raise OutputError(f"{path}: OpenCV could not encode the PNG")
    return atomic_write_bytes(path, encoded.tobytes())


def write_npy(path, array: np.ndarray):
    """Write a float32 array as .npy, atomically."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, dtype=np.float32), allow_pickle=False)
    return atomic_write_bytes(path, buffer.getvalue())
