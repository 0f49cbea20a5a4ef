"""Bringing target activations to [N, C, h, w] for the CAM methods.

CNN activations already are (NCHW), or are channels-last (NHWC models from Keras/TF converters,
Swin-style [N, h, w, C]); transformer token activations [N, T, C] carry class/distillation
tokens first and an h x w grid after them, as pytorch-grad-cam's reshape_transform assumes.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

from onnx import TensorProto

from ..errors import UnsupportedModelError
from .axes import CHANNELS_FIRST_OPS, AxisTracker


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


GRID_HINT = "give it as token_grid=(extra_tokens, h, w) / --token-grid EXTRA H W"


def activation_layout(emit, tensor: str, image, layout: str = "auto", producers=None, analysis=None) -> str:
    """"NCHW", "NHWC" or "tokens" for a target tensor.

    A 4-D tensor's channel axis is found by following its axes up through the ops that made it
    (axes.AxisTracker: Transposes and Reshapes of any rank, down to a Conv, a norm, a Linear or
    the image). When that chain cannot be followed, the nearest channels-first op or 4-D Transpose
    decides, and a tensor that comes straight from the input has the input's layout."""
    if layout != "auto":
        return layout
    rank = emit.rank(tensor)
    if rank == 3:
        return "tokens"
    if rank == 4:
        if analysis is not None:
            found = AxisTracker(analysis, image).layout(tensor)
            if found is not None:
                return found
            producers = producers or analysis.producers
        return _layout_from_producers(emit, tensor, image, producers or {})
    raise UnsupportedModelError(f"target {tensor!r} has rank {rank}; CAM targets must be 4-D feature maps "
                                "or 3-D token sequences [N, tokens, channels]")


def _layout_from_producers(emit, tensor, image, producers) -> str:
    seen = set()
    while tensor in producers and tensor not in seen:
        seen.add(tensor)
        node = producers[tensor]
        if node.op_type in CHANNELS_FIRST_OPS:
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


def to_nchw(emit, tensor: str, image, layout: str, grid: Optional[Tuple[int, int, int]] = None,
            analysis=None, like: Optional[str] = None) -> str:
    """`tensor` as [N, C, h, w]. For tokens, the grid is `grid` if given, else found from the
    forward tensor `like` (the activation whose gradient `tensor` may be): see find_grid."""
    if layout == "NCHW":
        return tensor
    if layout == "NHWC":
        return emit.op("Transpose", tensor, perm=[0, 3, 1, 2])
    if layout != "tokens":
        raise UnsupportedModelError(f"unknown activation layout {layout!r}; use NCHW, NHWC or tokens")
    found = grid or find_grid(emit, like or tensor, image, analysis)
    dims = emit.dims(tensor)
    if isinstance(found, RunTimeGrid):
        h, w = _grid_from_count(emit, emit.d_sub(dims[1], found.extra), image, tensor)
        kept = emit.slice(tensor, [found.extra], [_INT64_MAX], [1]) if found.extra else tensor
    else:
        extra, h, w = found
        kept = emit.slice(tensor, [extra], [extra + h * w], [1]) if extra else tensor
    grid_shape = emit.shape_of([dims[0], h, w, dims[2]])
    return emit.op("Transpose", emit.op("Reshape", kept, grid_shape), perm=[0, 3, 1, 2])


# ---------------------------------------------------------------------- token grids
_INT64_MAX = 2 ** 63 - 1


class RunTimeGrid(NamedTuple):
    """A token count that changes with the input: `extra` leading tokens, the rest an h x w grid
    with the input's aspect, measured at run time (h = round(sqrt(T' * H / W)), w = T' / h)."""
    extra: int


def find_grid(emit, tensor: str, image, analysis=None):
    """The token grid of `tensor` [N, T, C]: (extra, h, w) when the token count and the input size
    are fixed; a RunTimeGrid when they change together, its extra tokens measured by probing the
    model at two input sizes, or, when the model cannot be probed, counted from the Concats that
    put class tokens before the patch tokens (the grid itself then follows from the run-time token
    count and the input's aspect ratio: convolution strides alone would miss token subsampling
    by Slice, as in LeViT)."""
    tokens = emit.info(tensor).shape[1]
    if not isinstance(tokens, int) and analysis is not None and not _probed(tokens):
        analysis.probe([tensor])
        tokens = analysis.infos.get(tensor, emit.info(tensor)).shape[1]
    height, width = (image.shape[a] for a in image.spatial_axes)
    if isinstance(tokens, int) and isinstance(height, int) and isinstance(width, int):
        grid = token_grid(tokens, height, width)
        if grid is None:
            raise UnsupportedModelError(f"target {tensor!r}: {tokens} tokens do not form a grid for a "
                                        f"{height}x{width} input; {GRID_HINT}")
        return grid
    if _probed(tokens) and analysis is not None:
        counts = [int(v) for v in (tokens.split("_")[1], tokens.split("_")[-1])]
        found = _extra_from_probes(counts, _probe_sizes(analysis, image))
        if found is not None:
            return found
    extra = concatenated_tokens(analysis, tensor, image) if analysis is not None else None
    if extra is not None:
        return RunTimeGrid(extra)
    raise UnsupportedModelError(f"target {tensor!r}: the token grid cannot be inferred (the token count is "
                                f"{tokens!r} and the model could not be probed); {GRID_HINT}")


def _probed(dim) -> bool:
    return isinstance(dim, str) and dim.startswith("probe_")


def _probe_sizes(analysis, image):
    """The image's (H, W) at the two probe runs (as shapes.probe_infos feeds them)."""
    from ..autodiff.shapes import _probe_array

    vi = next(i for i in analysis.model.graph.input if i.name == image.name)
    h_axis, w_axis = image.spatial_axes
    return [(s[h_axis], s[w_axis]) for s in (_probe_array(vi, v).shape for v in (0, 1))]


def _extra_from_probes(counts, sizes) -> Optional[RunTimeGrid]:
    """The number of extra tokens for which both probed token counts form grids of their inputs."""
    for extra in range(0, 9):
        if all(_grid_with_extra(t, extra, h, w) for t, (h, w) in zip(counts, sizes)):
            return RunTimeGrid(extra)
    return None


def _grid_with_extra(tokens, extra, height, width):
    t = tokens - extra
    if t <= 0:
        return None
    h = round(math.sqrt(t * height / width))
    if h > 0 and t % h == 0 and abs(height / h - width / (t // h)) <= 1:
        return h, t // h
    return None


def _grid_from_count(emit, count, image, like):
    """In-graph h, w of a grid of `count` tokens with the input's aspect ratio: h = the nearest of
    round(sqrt(count * H / W)) and its neighbours that divides count (patch grids floor or ceil
    H / stride and W / stride, which moves the ratio by up to a row), w = count / h."""
    height, width = _image_hw(emit, image)
    ratio = emit.op("Div", emit.d_to_float(height, like), emit.d_to_float(width, like))
    rows = emit.op("Round", emit.op("Sqrt", emit.op("Mul", emit.d_to_float(count, like), ratio)))
    guess = emit.op("Reshape", emit.cast(rows, TensorProto.INT64), emit.ints([1]))
    one = emit.ints([1])
    counts = emit.op("Reshape", emit.shape_of([count]), emit.ints([1]))
    h = emit.op("Add", guess, one)
    for offset in (-1, 0):  # the last assignment wins: round first, then one row less, then one more
        candidate = emit.op("Max", emit.op("Add", guess, emit.ints([offset])), one)
        divides = emit.op("Equal", emit.op("Mod", counts, candidate), emit.ints([0]))
        h = emit.op("Where", divides, candidate, h)
    return h, emit.d_div(count, h)


def _image_hw(emit, image):
    dims = emit.dims(image.name)
    return [dims[a] for a in image.spatial_axes]


def _rank(analysis, name) -> int:
    info = analysis.infos.get(name)
    return -1 if info is None or info.shape is None else len(info.shape)


def _maybe_float(analysis, name) -> bool:
    info = analysis.infos.get(name)
    return info is None or info.dtype is None or info.is_float


def concatenated_tokens(analysis, tensor: str, image) -> Optional[int]:
    """How many tokens Concats along the token axis put before the patch tokens on the way from
    the image to `tensor` (class and distillation tokens), walking up its main chain (the
    highest-rank, most recently computed activation input of each op); None if the chain does
    not reach the image or an added token count is not static."""
    constants = analysis.constant_names()
    extra, seen = 0, set()
    while tensor != image.name:
        node = analysis.producers.get(tensor)
        if node is None or tensor in seen:
            return None
        seen.add(tensor)
        inputs = [i for i in node.input if i == image.name or (i and i not in constants and _maybe_float(analysis, i))]
        if not inputs:
            return None
        if node.op_type == "Concat" and _rank(analysis, tensor) == 3 and next(
                (a.i for a in node.attribute if a.name == "axis"), 0) in (1, -2):
            sizes = [analysis.infos[i].shape[1] if _rank(analysis, i) == 3 else None for i in node.input]
            main = max(range(len(sizes)), key=lambda k: (not isinstance(sizes[k], int), sizes[k] or 0))
            if any(not isinstance(v, int) for k, v in enumerate(sizes) if k != main):
                return None
            extra += sum(v for k, v in enumerate(sizes) if k != main)
            tensor = node.input[main]
            continue
        tensor = max(inputs, key=lambda i: (_rank(analysis, i), analysis.order.get(i, -1)))
    return extra
