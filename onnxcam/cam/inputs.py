"""Finding the image input of a model and its layout (NCHW or NHWC)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import onnx

from ..autodiff.shapes import TensorInfo, _info_from_value_info
from ..errors import UnsupportedModelError


@dataclass(frozen=True)
class ImageInput:
    name: str
    layout: str  # "NCHW" or "NHWC"
    shape: Tuple[object, ...]  # ints, symbols or None
    dtype: int

    @property
    def spatial_axes(self) -> Tuple[int, int]:
        return (2, 3) if self.layout == "NCHW" else (1, 2)

    @property
    def channels(self):
        return self.shape[1] if self.layout == "NCHW" else self.shape[3]


def image_input(model: onnx.ModelProto, label: str = "model") -> ImageInput:
    """The first 4-D floating-point graph input (models with several inputs pass others through)."""
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        info = _info_from_value_info(vi)
        if info.rank == 4 and info.is_float:
            return ImageInput(vi.name, _layout(info), info.shape, info.dtype)
    raise UnsupportedModelError(f"{label}: the model has no 4-D floating-point input (an image batch); "
                                "onnxcam explains image models")


def _layout(info: TensorInfo) -> str:
    c1, c3 = info.shape[1], info.shape[3]
    if c1 in (1, 3, 4):
        return "NCHW"
    if c3 in (1, 3, 4):
        return "NHWC"
    return "NCHW"
