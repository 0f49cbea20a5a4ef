"""Methods that weigh channels by what happens to the score when something is masked, re-running
(part of) the model inside the graph (cam/reruns.py: variants folded into the batch, in chunks).

Score-CAM and Ablation-CAM are channel weightings of one layer (the shared CAM pipeline does the
rest, as pytorch-grad-cam's BaseCAM); Group-CAM produces its map at the input's resolution.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ...errors import UsageError
from .gradient_cams import SPATIAL, weighted_sum
from .registry import Needs, layer_method, map_method

GROUPCAM_EPS = 1e-30  # the authors divide by (max - min) and return nothing for a flat map: zeros here
SCORECAM_EPS = 1e-8  # pytorch-grad-cam's (maxs - mins + 1e-8)
ABLATION_OFFSET = 1e7  # pytorch-grad-cam's AblationLayer: min - 1e7 when the layer's minimum is not 0
SCORECAM_RECIPES = ("pytorch-grad-cam", "torchcam")
SCORECAM_SAME_RANGE = 1e-2  # channels of a smaller range are never merged (see _same_scaled_maps)
RERUN_NEEDS = Needs(activation=True, reruns=True)


@layer_method("scorecam", needs=RERUN_NEEDS, with_context=True)
def scorecam(ctx, layer, A, G, chunk_size=None, recipe="pytorch-grad-cam"):
    """Score-CAM (Wang et al. 2020), pytorch-grad-cam's recipe: each channel map upsampled to the
    input (bilinear, corners aligned), min-max normalised, multiplied into the input; the weights
    are the softmax over channels of the masked inputs' scores. recipe="torchcam": torchcam's
    order (min-max at the layer's resolution, then bilinear with half-pixel centres)."""
    if recipe not in SCORECAM_RECIPES:
        raise UsageError(f"scorecam recipe must be one of {', '.join(SCORECAM_RECIPES)}; got {recipe!r}")
    e, reruns = ctx.emit, ctx.rerun()
    channels = ctx.known_shape(layer, A)[0]
    image = ctx.input()
    h_axis, w_axis = ctx.image.spatial_axes
    image_dims = e.dims(ctx.image.name)

    def minmax(m):
        low = e.reduce("ReduceMin", m, SPATIAL, keepdims=True)
        high = e.reduce("ReduceMax", m, SPATIAL, keepdims=True)
        return e.op("Div", e.op("Sub", m, low), e.op("Add", e.op("Sub", high, low), e.scalar(SCORECAM_EPS, m)))

    def masked_inputs(variants, images):
        picked = e.unsqueeze(pick(e, A, variants, images), [1])  # [R, 1, h, w]
        sizes = e.shape_of([e.op("Shape", variants), 1, image_dims[h_axis], image_dims[w_axis]])
        if recipe == "torchcam":
            masks = e.resize(minmax(picked), sizes, mode="linear", coordinate_transformation_mode="half_pixel")
        else:
            masks = minmax(e.resize(picked, sizes, mode="linear", coordinate_transformation_mode="align_corners"))
        return reruns.as_input(e.op("Mul", masks, e.op("Gather", image, images, axis=0)))  # [R, C, H, W]

    def zero_inputs(variants, images):  # what every all-zero channel's mask leaves of the input
        return reruns.as_input(e.op("Mul", e.op("Gather", image, images, axis=0), e.scalar(0.0, image)))

    # An all-zero channel's mask is 0 everywhere: its masked input is the zero image, run once.
    # Channels with the same min-max scaled map make the same mask: one run for all of them.
    empty = _empty_channels(e, A, 1)  # [C, N]
    zero = e.reshape(reruns.scores(ctx.image.name, 1, zero_inputs, chunk_size, tag="scorecam_zero"), [-1])
    same = _same_scaled_maps(e, A, channels) if e.opset >= 11 else None  # (Unique: opset 11)
    scores = reruns.scores(ctx.image.name, channels, masked_inputs, chunk_size, skip=empty, skip_score=zero,
                           same_as=same, tag="scorecam")  # [C, N]
    weights = e.op("Softmax", e.op("Transpose", scores, perm=[1, 0]), axis=1)  # over channels
    return weighted_sum(e, e.unsqueeze(weights, [2, 3]), A)


@layer_method("ablationcam", needs=RERUN_NEEDS, with_context=True)
def ablationcam(ctx, layer, A, G, chunk_size=None):
    """Ablation-CAM (Desai & Ramaswamy 2020), as pytorch-grad-cam: each channel of the layer set to
    0 (to min - 1e7 when the layer's minimum is not 0), only the part of the network after the
    layer re-run; w_k = (score - score without channel k) / score."""
    e, reruns = ctx.emit, ctx.rerun()
    channels = ctx.known_shape(layer, A)[0]
    axis = reruns.channel_axis(layer)
    rank = e.rank(layer)
    value = _ablation_value(e, layer, rank)  # [N, 1...]
    shape = [1] * rank
    shape[axis] = channels  # [row, ...layer axes] with the channels at their axis
    channel_ids = e.const(np.arange(channels, dtype=np.int64).reshape(shape), TensorProto.INT64)

    def ablated(variants, images):
        dropped = e.op("Equal", e.reshape(variants, [-1] + [1] * (rank - 1)), channel_ids)
        rows = e.op("Gather", layer, images, axis=0)
        return e.op("Where", dropped, e.op("Gather", value, images, axis=0), rows)

    # Ablating an all-zero channel by 0 changes nothing: its score is the un-ablated one, no run.
    unchanged = e.op("And", _empty_channels(e, layer, axis),
                     e.unsqueeze(e.op("Equal", e.reshape(value, [-1]), e.scalar(0.0, value)), [0]))
    score = e.unsqueeze(reruns.score, [0])  # [1, N]: the un-ablated run's
    scores = reruns.scores(layer, channels, ablated, chunk_size, skip=unchanged, skip_score=reruns.score,
                           tag="ablationcam")  # [C, N]
    weights = e.op("Div", e.op("Sub", score, scores), score)
    return weighted_sum(e, e.unsqueeze(e.op("Transpose", weights, perm=[1, 0]), [2, 3]), A)


@map_method("groupcam", Needs(activation=True, gradient=True, reruns=True))
def groupcam(ctx, groups=32, threshold=70.0, chunk_size=None, blur_kernel=51, blur_sigma=50.0):
    """Group-CAM (Zhang et al. 2021), the authors' code: channels weighted by their mean gradient,
    split into `groups` groups (torch.chunk), each group's summed map kept above its 70th
    percentile, upsampled and normalised into a mask; the input blended with its Gaussian blur
    (51 x 51, sigma 50, reflected border) through each mask; w_g = p(masked) - p(blurred) of the
    class; map = relu(sum_g w_g mask_g), min-max. One map per layer, their mean for several."""
    e, reruns = ctx.emit, ctx.rerun()
    image = ctx.input()
    h_axis, w_axis = ctx.image.spatial_axes
    blurred = gaussian_blur(e, image, ctx.image.channels, int(blur_kernel), float(blur_sigma),
                            (ctx.image.shape[h_axis], ctx.image.shape[w_axis]))
    maps = []
    for layer in ctx.layers:
        A, G = ctx.activation(layer), ctx.gradient(layer)
        maps.append(_group_map(ctx, reruns, layer, A, G, image, blurred, int(groups), float(threshold), chunk_size))
    fused = maps[0] if len(maps) == 1 else e.reduce("ReduceMean", e.op("Concat", *maps, axis=1), [1], keepdims=True)
    return _minmax(e, fused)


# ---------------------------------------------------------------------- pieces
def pick(e, x, variants, images):
    """x[images[r], variants[r]] for each row r: [R, ...] from x [N, K, ...]."""
    return e.op("GatherND", x, e.op("Concat", e.unsqueeze(images, [1]), e.unsqueeze(variants, [1]), axis=1))


def _empty_channels(e, x, axis):
    """bool [C, N]: channel c of image n is zero everywhere (x [N, ...] with channels at `axis`)."""
    rank = e.rank(x) if e.info(x).shape else 4
    others = [a for a in range(1, rank) if a != axis]
    peak = e.reduce("ReduceMax", e.op("Abs", x), others, keepdims=False)  # [N, C]
    return e.op("Transpose", e.op("Equal", peak, e.scalar(0.0, peak)), perm=[1, 0])


def _same_scaled_maps(e, A, channels):
    """int64 [C, N]: per channel of each image, the first channel whose min-max scaled map is the
    same (itself when none). Upsampling is linear, so such channels (a = s * b + t, s > 0: e.g.
    the ones that are non-zero at one pixel only) give the same Score-CAM mask. Only channels
    whose range is at least SCORECAM_SAME_RANGE are merged: there the 1e-8 of the min-max
    denominator moves a mask by at most ~1e-6 of itself (float32 rounding does as much).
    Candidates are found by a key (the scaled map's dot product with fixed weights) and kept only
    where the maps are exactly equal, so a collision of keys costs a run, never a wrong score."""
    flat = e.reshape(A, [0, channels, -1])  # [N, C, hw]
    low = e.reduce("ReduceMin", flat, [2], keepdims=True)
    spread = e.op("Sub", e.reduce("ReduceMax", flat, [2], keepdims=True), low)
    wide = e.op("Not", e.op("Less", spread, e.scalar(SCORECAM_SAME_RANGE, spread)))  # [N, C, 1]
    scaled = e.op("Div", e.op("Sub", flat, low), e.op("Where", wide, spread, e.scalar(1.0, spread)))
    pixels = e.squeeze(e.slice(e.op("Shape", flat), [2], [3], [0]), [0])
    weights = e.op("Sqrt", e.op("Add", e.cast(e.op("Range", _i64(e, 0), pixels, _i64(e, 1)), TensorProto.FLOAT),
                                e.scalar(2.0, spread)))  # [hw]: sqrt(2), sqrt(3), ...
    key = e.op("MatMul", scaled, e.unsqueeze(weights, [1]))  # [N, C, 1]
    index = e.const(np.arange(channels, dtype=np.float32).reshape(1, channels, 1), TensorProto.FLOAT)
    key = e.op("Where", wide, key, e.op("Sub", e.scalar(-1.0, key), index))  # too narrow: a key of its own
    images = e.squeeze(e.slice(e.op("Shape", flat), [0], [1], [0]), [0])
    image = e.cast(e.unsqueeze(e.op("Range", _i64(e, 0), images, _i64(e, 1)), [1, 2]), TensorProto.FLOAT)
    pairs = e.reshape(e.op("Concat", e.op("Expand", image, e.op("Shape", key)), key, axis=2), [-1, 2])
    _, first, inverse, _ = e.op("Unique", pairs, outputs=4, axis=0, sorted=0)  # rows (image, key): images apart
    candidate = e.reshape(e.op("Mod", e.op("Gather", first, inverse, axis=0), _i64(e, channels)), [-1, channels])
    theirs = e.op("GatherElements", scaled, e.op("Expand", e.unsqueeze(candidate, [2]), e.op("Shape", scaled)), axis=1)
    equal = e.op("Equal", e.reduce("ReduceMax", e.op("Abs", e.op("Sub", scaled, theirs)), [2], keepdims=False),
                 e.scalar(0.0, scaled))  # [N, C]
    own = e.op("Expand", e.const(np.arange(channels, dtype=np.int64).reshape(1, channels), TensorProto.INT64),
               e.op("Shape", candidate))
    return e.op("Transpose", e.op("Where", equal, candidate, own), perm=[1, 0])


def _i64(e, value):
    return e.const(np.array(value, np.int64), TensorProto.INT64)


def _ablation_value(e, layer, rank):
    """0 where the image's activations at the layer have minimum 0 (after a ReLU), else min - 1e7."""
    low = e.reduce("ReduceMin", layer, list(range(1, rank)), keepdims=True)
    zero = e.scalar(0.0, layer)
    return e.op("Where", e.op("Equal", low, zero), zero, e.op("Sub", low, e.scalar(ABLATION_OFFSET, layer)))


def _group_map(ctx, reruns, layer, A, G, image, blurred, groups, threshold, chunk_size):
    e = ctx.emit
    channels, h, w = ctx.known_shape(layer, A)
    n = e.dims(A)[0]
    size = -(-channels // groups)  # torch.chunk: groups of ceil(C / groups), maybe fewer groups
    count = -(-channels // size)
    weighted = e.op("Mul", e.reduce("ReduceMean", G, SPATIAL, keepdims=True), A)
    pad = count * size - channels
    if pad:
        weighted = e.op("Concat", weighted, e.zeros([n, pad, h, w], TensorProto.FLOAT), axis=1)
    grouped = e.reduce("ReduceSum", e.reshape(weighted, [n, count, size, h, w]), [2], keepdims=False)
    grouped = e.op("Relu", grouped)  # [N, G, h, w]
    cut = _percentile(e, e.reshape(grouped, [n, count, h * w]), threshold, h * w)  # [N, G, 1]
    kept = e.op("Where", e.op("Greater", grouped, e.unsqueeze(cut, [3])), grouped, e.scalar(0.0, grouped))
    h_axis, w_axis = ctx.image.spatial_axes
    image_dims = e.dims(ctx.image.name)
    up = e.resize(kept, e.shape_of([n, count, image_dims[h_axis], image_dims[w_axis]]), mode="linear",
                  coordinate_transformation_mode="half_pixel")  # F.interpolate(align_corners=False)
    low = e.reduce("ReduceMin", up, SPATIAL, keepdims=True)
    high = e.reduce("ReduceMax", up, SPATIAL, keepdims=True)
    spread = e.op("Sub", high, low)
    flat = e.op("Equal", spread, e.scalar(0.0, spread))  # the authors skip such groups
    one = e.scalar(1.0, spread)
    masks = e.op("Where", flat, e.scalar(0.0, up), e.op("Div", e.op("Sub", up, low), e.op("Where", flat, one, spread)))

    def blended(variants, images):
        m = e.unsqueeze(pick(e, masks, variants, images), [1])  # [R, 1, H, W]
        x, b = e.op("Gather", image, images, axis=0), e.op("Gather", blurred, images, axis=0)
        return reruns.as_input(e.op("Add", e.op("Mul", x, m), e.op("Mul", b, e.op("Sub", e.scalar(1.0, m), m))))

    def baseline(variants, images):
        return reruns.as_input(e.op("Gather", blurred, images, axis=0))

    base = reruns.scores(ctx.image.name, 1, baseline, chunk_size, probabilities=True, tag="groupcam_base")  # [1, N]
    skipped = e.op("Transpose", e.squeeze(flat, [2, 3]), perm=[1, 0])  # the authors skip flat groups: weight 0
    probs = reruns.scores(ctx.image.name, count, blended, chunk_size, probabilities=True, skip=skipped,
                          skip_score=e.reshape(base, [-1]), tag="groupcam")  # [G, N]
    weights = e.op("Transpose", e.op("Sub", probs, base), perm=[1, 0])  # [N, G]
    cam = weighted_sum(e, e.unsqueeze(weights, [2, 3]), masks)
    return e.op("Relu", cam)


def _percentile(e, x, q, count):
    """numpy's default (linear) percentile over the last axis of length `count` (an int): [..., 1]."""
    ordered, _ = e.op("TopK", x, e.ints([count]), outputs=2, axis=-1, largest=0, sorted=1)
    position = q / 100.0 * (count - 1)
    lo, hi = int(np.floor(position)), int(np.ceil(position))
    a = e.slice(ordered, [lo], [lo + 1], [-1])
    if hi == lo:
        return a
    b = e.slice(ordered, [hi], [hi + 1], [-1])
    return e.op("Add", a, e.op("Mul", e.op("Sub", b, a), e.scalar(position - lo, a)))


def _minmax(e, m):
    low = e.reduce("ReduceMin", m, [1, 2, 3], keepdims=True)
    spread = e.op("Sub", e.reduce("ReduceMax", m, [1, 2, 3], keepdims=True), low)
    return e.op("Div", e.op("Sub", m, low), e.op("Add", spread, e.scalar(GROUPCAM_EPS, m)))


def gaussian_blur(e, image, channels, kernel, sigma, size=(None, None)):
    """kornia's gaussian_blur2d (odd kernel, reflected border) on float32 NCHW: separable, depthwise.
    A reflected border cannot be wider than the image less one pixel: on an input of known size
    smaller than the kernel, the kernel is cut to the widest that fits (the same sigma,
    renormalised), where kornia would fail too."""
    if not isinstance(channels, int) or kernel % 2 == 0:
        raise UsageError("groupcam's blur needs a known channel count and an odd kernel size")
    known = [d for d in size if isinstance(d, int) and d > 0]
    if known and kernel // 2 >= min(known):
        kernel = 2 * (min(known) - 1) + 1
    x = np.arange(kernel, dtype=np.float64) - kernel // 2
    g = np.exp(-(x ** 2) / (2.0 * sigma ** 2))
    g = (g / g.sum()).astype(np.float32)
    half = kernel // 2
    padded = e.op("Pad", image, e.ints([0, 0, half, half, 0, 0, half, half]), mode="reflect")
    rows = e.const(np.tile(g.reshape(1, 1, kernel, 1), (channels, 1, 1, 1)), TensorProto.FLOAT)
    cols = e.const(np.tile(g.reshape(1, 1, 1, kernel), (channels, 1, 1, 1)), TensorProto.FLOAT)
    out = e.op("Conv", padded, rows, group=channels, kernel_shape=[kernel, 1])
    return e.op("Conv", out, cols, group=channels, kernel_shape=[1, kernel])
