"""Bringing target activations to [N, C, h, w] for the CAM methods.

CNN activations already are (NCHW), or are channels-last (NHWC models from Keras/TF converters,
Swin-style [N, h, w, C]); transformer token activations [N, T, C] carry class/distillation
tokens first and an h x w grid after them, as pytorch-grad-cam's reshape_transform assumes.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

from ..errors import UnsupportedModelError


def token_grid(tokens: int, height: int, width: int, max_extra: int = 8) -> Optional[Tuple[int, int, int]]:
    """(extra tokens, h, w) such that tokens = extra + h*w with h/w = height/width and an integer
    patch size; None if no such split exists."""
    for extra in range(0, max_extra + 1):
        t = tokens - extra
        if t <= 0:
            break
        h = round(math.sqrt(t * height / width))
        if h > 0 and t % h == 0:
            w = t // h
            if height % h == 0 and width % w == 0 and height // h == width // w:
                return extra, h, w
    return None


# Ops that only exist in channels-first form: a 4-D tensor they produce is NCHW.
_CHANNELS_FIRST_OPS = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
                       "LpPool", "BatchNormalization", "InstanceNormalization", "Resize", "DepthToSpace",
                       "SpaceToDepth", "GroupNormalization"}


def activation_layout(emit, tensor: str, image, layout: str = "auto", producers=None) -> str:
    """"NCHW", "NHWC" or "tokens" for a target tensor.

    A 4-D tensor's layout is read from the ops that made it: walking up through elementwise and
    other shape-keeping ops, a channels-first op (Conv, pooling, BatchNormalization...) or a
    Transpose to NCHW means NCHW, a Transpose to NHWC means NHWC; only a tensor that comes straight
    from the input has the input's layout. (NHWC models from Keras/TF converters transpose their
    input to NCHW before the first Conv: their feature maps are NCHW.)"""
    if layout != "auto":
        return layout
    rank = emit.rank(tensor)
    if rank == 3:
        return "tokens"
    if rank == 4:
        return _layout_from_producers(emit, tensor, image, producers or {})
    raise UnsupportedModelError(f"target {tensor!r} has rank {rank}; CAM targets must be 4-D feature maps "
                                "or 3-D token sequences [N, tokens, channels]")


def _layout_from_producers(emit, tensor, image, producers) -> str:
    seen = set()
    while tensor in producers and tensor not in seen:
        seen.add(tensor)
        node = producers[tensor]
        if node.op_type in _CHANNELS_FIRST_OPS:
            return "NCHW"
        if node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            if perm == [0, 3, 1, 2]:
                return "NCHW"
            if perm == [0, 2, 3, 1]:
                return "NHWC"
        tensor = next((i for i in node.input if i and emit.info(i).rank == 4), None)
        if tensor is None:
            break
    return image.layout


def to_nchw(emit, tensor: str, image, layout: str, grid: Optional[Tuple[int, int, int]] = None) -> str:
    """`tensor` as [N, C, h, w]."""
    if layout == "NCHW":
        return tensor
    if layout == "NHWC":
        return emit.op("Transpose", tensor, perm=[0, 3, 1, 2])
    if layout != "tokens":
        raise UnsupportedModelError(f"unknown activation layout {layout!r}; use NCHW, NHWC or tokens")
    extra, h, w = grid or infer_grid(emit, tensor, image)
    dims = emit.dims(tensor)
    kept = emit.slice(tensor, [extra], [extra + h * w], [1]) if extra else tensor
    grid_shape = emit.shape_of([dims[0], h, w, dims[2]])
    return emit.op("Transpose", emit.op("Reshape", kept, grid_shape), perm=[0, 3, 1, 2])


def infer_grid(emit, tensor: str, image) -> Tuple[int, int, int]:
    tokens = emit.info(tensor).shape[1]
    h_axis, w_axis = image.spatial_axes
    height, width = image.shape[h_axis], image.shape[w_axis]
    if not all(isinstance(v, int) for v in (tokens, height, width)):
        raise UnsupportedModelError(
            f"target {tensor!r}: the token grid cannot be inferred with a dynamic token count or input size; "
            "give it explicitly (token_grid=(extra_tokens, h, w) / --token-grid)")
    grid = token_grid(tokens, height, width)
    if grid is None:
        raise UnsupportedModelError(f"target {tensor!r}: {tokens} tokens do not form a grid for a "
                                    f"{height}x{width} input; give token_grid=(extra_tokens, h, w)")
    return grid
