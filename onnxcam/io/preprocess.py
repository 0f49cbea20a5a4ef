"""Turning a photo into the tensor a model expects, and the CAM back into the photo's frame.

A `Preprocessor` resizes (directly, or shorter side then centre crop), orders channels (RGB or
BGR), normalises (a preset), and lays the result out as the model wants (NCHW or NHWC, 3 or 1
channels). With every tensor it returns a `Geometry`: the exact affine map from model-input pixels
to original-image pixels, so `Geometry.to_original(cam)` undoes crop and resize.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError

DEFAULT_SIZE = 224
# torchvision's ImageNet evaluation: resize the shorter side to 256, centre-crop 224 (224/256).
CROP_FRACTION = 0.875
RESIZE_POLICIES = ("direct", "crop")
# A model may name its preset in its metadata (the demo export does); `onnxcam explain` honours it.
PRESET_METADATA_KEY = "onnxcam.preset"


@dataclass(frozen=True)
class Preset:
    """x = (pixel * scale - mean) / std, pixel in 0..255; mean and std are given in RGB order."""

    name: str
    scale: float
    mean: tuple
    std: tuple
    bgr: bool
    description: str


PRESETS = {
    p.name: p for p in (
        Preset("imagenet", 1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False,
               "RGB in [0,1], then ImageNet mean/std (torchvision, timm)"),
        Preset("unit", 1 / 255, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), False, "RGB scaled to [0,1]"),
        Preset("symmetric", 1 / 127.5, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), False,
               "RGB scaled to [-1,1] (Inception, MobileNet and EfficientNet-Lite from TensorFlow)"),
        Preset("caffe", 1.0, (123.68, 116.779, 103.939), (1.0, 1.0, 1.0), True,
               "BGR 0-255 minus the ImageNet mean pixel (Caffe, Keras ResNet50/VGG)"),
        Preset("raw", 1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), False, "RGB 0-255 unchanged"),
    )
}


def get_preset(name) -> Preset:
    if isinstance(name, Preset):
        return name
    try:
        return PRESETS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), PRESETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"unknown preset {name!r}{hint} (choose from {', '.join(PRESETS)})") from None


def input_size(input_shape, layout: str = "NCHW", size=None) -> tuple:
    """The (height, width) to feed: the model's static size, else `size`, else 224x224.

    A static model dimension wins; a `size` that contradicts it is a UsageError.
    """
    dims = tuple(input_shape) if input_shape is not None else ()
    if len(dims) != 4:
        static = (None, None)
    elif layout == "NHWC":
        static = (dims[1], dims[2])
    else:
        static = (dims[2], dims[3])
    static = tuple(d if isinstance(d, int) and d > 0 else None for d in static)
    if size is not None:
        size = tuple(int(s) for s in size)
        if len(size) != 2 or min(size) <= 0:
            raise UsageError(f"--size takes two positive integers, HEIGHT WIDTH; got {size}")
        for want, have, what in zip(size, static, ("height", "width")):
            if have is not None and want != have:
                raise UsageError(f"the model's input has a fixed {what} of {have}; --size {size[0]} {size[1]} "
                                 "does not fit (drop --size)")
    default = size if size is not None else (DEFAULT_SIZE, DEFAULT_SIZE)
    height, width = (s if s is not None else d for s, d in zip(static, default))
    if height * width > MAX_INPUT_PIXELS:  # refused before a tensor of that size is ever allocated
        where = f"--size {height} {width}" if size is not None else f"the model's fixed input {height}x{width}"
        raise UsageError(f"{where} is {height * width / 1e6:.0f} megapixels per image ({height * width * 12 / 2**30:.1f} "
                         f"GB as float32 RGB), over the limit of {MAX_INPUT_PIXELS / 1e6:.0f}; explain at a smaller size")
    return height, width


# An input of 100 megapixels is 1.2 GB per image as float32 RGB, before the model's own activations.
MAX_INPUT_PIXELS = 100_000_000


@dataclass(frozen=True)
class Geometry:
    """Where the model input came from: original (h, w), resized (h, w), crop offset (top, left), input (h, w)."""

    original: tuple
    resized: tuple
    offset: tuple
    size: tuple

    def to_original(self, cam: np.ndarray, outside: float = 0.0) -> np.ndarray:
        """Map a [h, w] map at model-input resolution onto the original image: float32 [H, W].

        Pixel centres are matched exactly (the inverse of the forward resize); parts of the
        original that a centre crop cut away get `outside` (0 by default; `onnxcam explain` writes
        NaN there, so "the model never saw this" cannot be read as "no evidence here").
        """
        import cv2

        cam = np.asarray(cam, dtype=np.float32)
        if cam.shape != tuple(self.size):
            raise ValueError(f"map of shape {cam.shape} does not match the model input {self.size}")
        (oh, ow), (rh, rw), (top, left) = self.original, self.resized, self.offset
        ax, ay = ow / rw, oh / rh
        # input pixel u -> resized u + left -> original (u + left + 0.5) * a - 0.5
        matrix = np.array([[ax, 0.0, (left + 0.5) * ax - 0.5],
                           [0.0, ay, (top + 0.5) * ay - 0.5]], dtype=np.float64)
        out = cv2.warpAffine(cam, matrix, (ow, oh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        if (rh, rw) != tuple(self.size):
            ys = (np.arange(oh) + 0.5) / ay
            xs = (np.arange(ow) + 0.5) / ax
            inside_y = (ys >= top) & (ys <= top + self.size[0])
            inside_x = (xs >= left) & (xs <= left + self.size[1])
            out[~inside_y, :] = outside
            out[:, ~inside_x] = outside
        return out

    def crop_box(self) -> tuple:
        """The region of the original image the model saw: (x0, y0, x1, y1) in original pixels."""
        (oh, ow), (rh, rw), (top, left) = self.original, self.resized, self.offset
        ax, ay = ow / rw, oh / rh
        return (left * ax, top * ay, (left + self.size[1]) * ax, (top + self.size[0]) * ay)


@dataclass
class Preprocessor:
    """Photo (uint8 RGB [H, W, 3]) -> model tensor (float32, one image, no batch axis) + Geometry."""

    size: tuple = (DEFAULT_SIZE, DEFAULT_SIZE)
    preset: object = "imagenet"
    resize: str = "direct"
    bgr: bool | None = None
    layout: str = "NCHW"
    channels: int = 3
    crop_fraction: float = CROP_FRACTION

    def __post_init__(self):
        self.preset = get_preset(self.preset)
        if self.resize not in RESIZE_POLICIES:
            raise UsageError(f"unknown resize policy {self.resize!r} (choose from {', '.join(RESIZE_POLICIES)})")
        if self.layout not in ("NCHW", "NHWC"):
            raise UsageError(f"unknown layout {self.layout!r}; expected NCHW or NHWC")
        if self.channels not in (1, 3):
            raise UsageError(f"the model takes {self.channels} input channels; onnxcam reads photos as "
                             "1-channel (grayscale) or 3-channel (colour) tensors only")
        if not 0 < self.crop_fraction <= 1:
            raise UsageError(f"crop fraction must be in (0, 1], got {self.crop_fraction}")
        self.size = tuple(int(s) for s in self.size)
        if self.bgr is None:
            self.bgr = self.preset.bgr

    def __call__(self, image: np.ndarray):
        import cv2

        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected uint8 RGB [H, W, 3], got {image.dtype} {image.shape}")
        oh, ow = image.shape[:2]
        th, tw = self.size
        if self.resize == "crop":
            scale = max(th / (self.crop_fraction * oh), tw / (self.crop_fraction * ow))
            rh, rw = max(th, round(oh * scale)), max(tw, round(ow * scale))
        else:
            rh, rw = th, tw
        shrink = rh * rw < oh * ow
        resized = cv2.resize(image, (rw, rh), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        top, left = round((rh - th) / 2), round((rw - tw) / 2)
        pixels = resized[top:top + th, left:left + tw]

        mean = np.asarray(self.preset.mean, np.float32)
        std = np.asarray(self.preset.std, np.float32)
        if self.channels == 1:
            # Grayscale models: luminance, with the preset's mean/std averaged over the channels.
            pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)[:, :, None]
            mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
        elif self.bgr:
            pixels, mean, std = pixels[:, :, ::-1], mean[::-1], std[::-1]
        x = (pixels.astype(np.float32) * np.float32(self.preset.scale) - mean) / std
        if self.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        return np.ascontiguousarray(x, dtype=np.float32), Geometry((oh, ow), (rh, rw), (top, left), (th, tw))

    def batch(self, images):
        """Stack several photos into one batch: (float32 [N, ...], [Geometry, ...])."""
        tensors, geometries = zip(*(self(img) for img in images))
        return np.stack(tensors), list(geometries)
