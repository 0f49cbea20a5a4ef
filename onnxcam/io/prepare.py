"""`onnxcam.preprocess`: a photo in, the batch a model expects out, as `onnxcam explain` builds it.

The API user should not have to guess the preset, the layout (NCHW/NHWC), the channel count or the
input size: they are read from the model (its input and its `onnxcam.preset` metadata) exactly as
the CLI reads them. The Geometry that comes back maps a map at the model's input resolution onto
the photo (`geometry.to_original(result.cam[0])`).
"""

from __future__ import annotations

import os
import warnings
from typing import List, Optional, Tuple, Union

import numpy as np

from ..errors import ImageError
from .images import DEFAULT_MAX_PIXELS, read_image
from .preprocess import PRESET_METADATA_KEY, PRESETS, Geometry, Preprocessor, input_size


class PresetWarning(UserWarning):
    """The model names no preset and none was given: imagenet is assumed."""


def preprocess(image, model, preset: Optional[str] = None, size=None, resize: str = "direct",
               bgr: Optional[bool] = None, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
               ) -> Tuple[np.ndarray, Union[Geometry, List[Geometry]]]:
    """(batch, geometry) for `image` (a path, or uint8 RGB [H, W, 3], or a list of them) fed to
    `model` (a path, an onnx.ModelProto, or an Explainer).

    batch: float32 [N, ...] in the model's layout and channel count, at its static input size
    (else `size`, else 224x224). The preset is `preset`, else the model's metadata
    (onnxcam.preset), else imagenet with a PresetWarning. geometry: one Geometry per image (a
    list when a list was given)."""
    info = _model_input(model)
    layout, channels, shape, metadata = info
    if preset is None:
        named = metadata.get(PRESET_METADATA_KEY)
        if named in PRESETS:
            preset = named
        else:
            warnings.warn("onnxcam.preprocess: the model names no preset (metadata onnxcam.preset) and none was "
                          "given; using imagenet (mean/std). Pass preset= if it was trained otherwise",
                          PresetWarning, stacklevel=2)
            preset = "imagenet"
    pre = Preprocessor(size=input_size(shape, layout, size), preset=preset, resize=resize, bgr=bgr, layout=layout,
                       channels=channels)
    many = isinstance(image, (list, tuple))
    photos = [_photo(item, max_pixels) for item in (image if many else [image])]
    batch, geometries = pre.batch(photos)
    return batch, (geometries if many else geometries[0])


def _model_input(model):
    """(layout, channels, input shape, metadata) of a path, ModelProto or Explainer."""
    if hasattr(model, "input_shape") and hasattr(model, "layout"):  # an Explainer
        return model.layout, model.channels, model.input_shape, dict(getattr(model, "metadata", {}))
    from ..cam.inputs import image_input
    from ..modelio import load_model

    proto = load_model(model, load_external_data=False)  # the graph and metadata are enough
    label = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "model"
    image = image_input(proto, label)
    channels = image.channels if isinstance(image.channels, int) else 3
    return image.layout, channels, tuple(image.shape), {p.key: p.value for p in proto.metadata_props}


def _photo(item, max_pixels) -> np.ndarray:
    if isinstance(item, np.ndarray):
        photo = item if item.ndim == 3 else np.repeat(item[:, :, None], 3, axis=2) if item.ndim == 2 else item
        if photo.ndim != 3 or photo.shape[2] != 3 or photo.dtype != np.uint8:
            raise ImageError(f"expected uint8 RGB pixels [H, W, 3] (or a path); got {item.dtype} {item.shape}")
        return photo
    return read_image(item, max_pixels=max_pixels)
