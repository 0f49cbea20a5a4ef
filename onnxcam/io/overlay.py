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


# A diverging colormap for signed maps in [-1, 1] (Moreland's cool-warm ends): blue below zero,
# white at zero, red above. OpenCV's colormaps are all sequential or cyclic.
_NEGATIVE, _ZERO, _POSITIVE = np.array([59, 76, 192.0]), np.array([242, 242, 242.0]), np.array([180, 4, 38.0])


def colorize_signed(heat: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] for a [H, W] signed map in [-1, 1] (clipped; NaN counts as 0)."""
    heat = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    t = np.abs(heat)[..., None]
    end = np.where(heat[..., None] < 0, _NEGATIVE, _POSITIVE)
    return np.round(_ZERO + t * (end - _ZERO)).astype(np.uint8)


def blend(image: np.ndarray, heat: np.ndarray, alpha: float = DEFAULT_ALPHA,
          colormap: str = DEFAULT_COLORMAP, signed: bool = False) -> np.ndarray:
    """Blend the coloured map over the uint8 RGB image: (1 - alpha) * image + alpha * colour.
    Signed maps ([-1, 1]: gradients, Integrated Gradients...) use the diverging colormap."""
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"--alpha must be between 0 and 1, got {alpha}")
    image = np.asarray(image)
    if image.shape[:2] != np.shape(heat):
        raise ValueError(f"map {np.shape(heat)} and image {image.shape[:2]} differ in size")
    colour = (colorize_signed(heat) if signed else colorize(heat, colormap)).astype(np.float32)
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
