"""Ops that move data without arithmetic: Reshape, Flatten, Transpose, Concat, Slice, Gather...

Every op here is linear and only moves (or copies) elements, so its VJP puts each element of the
output gradient back where it came from and adds up copies. All recipes are scatter-free: they use
Reshape/Transpose/Pad/Slice/Concat/Split and one-hot contractions (Equal + Cast + MatMul or
ReduceSum), which every runtime supports. Sizes are "dims" (ints where known, run-time [1] int64
tensors elsewhere), so batch, sequence and spatial sizes may be symbolic.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ..emitter import Dim
from ..registry import vjp
from .common import normalize_axis, reshape_like, unbroadcast
from .conv_adjoint import crop_by_pads

INT64_MIN = int(np.iinfo(np.int64).min)


# ---------------------------------------------------------------------- small dim helpers
def _dim(emit, x: str, axis: int) -> Dim:
    """The size of one axis of `x` (an int when known; only that axis is read at run time)."""
    d = emit.info(x).shape[axis]
    if isinstance(d, int) and d >= 0:
        return int(d)
    return emit.op("Gather", emit.shape(x), emit.ints([axis]), axis=0)


def _length(ctx, name: str) -> int:
    """Number of elements of a 1-D parameter tensor (starts, pads, repeats...)."""
    value = ctx.value(name)
    if value is not None:
        return int(value.size)
    shape = ctx.emit.info(name).shape
    if shape is None or len(shape) != 1 or not isinstance(shape[0], int):
        raise NotImplementedError(f"the length of parameter tensor {name!r} is unknown")
    return int(shape[0])


def _as_int64(emit, name: str) -> str:
    return name if emit.info(name).dtype == TensorProto.INT64 else emit.cast(name, TensorProto.INT64)


def _elements(ctx, name: str, count: int):
    """The entries of a 1-D integer tensor as dims: ints if constant, else one [1] tensor each."""
    value = ctx.value(name)
    if value is not None:
        return [int(v) for v in np.asarray(value).reshape(-1)]
    t = _as_int64(ctx.emit, name)
    return [ctx.emit.op("Gather", t, ctx.emit.ints([j]), axis=0) for j in range(count)]


def _clamp(emit, v: Dim, lo: Dim, hi: Dim) -> Dim:
    """max(lo, min(v, hi)); the bounds used here satisfy lo <= hi and lo = 0."""
    if isinstance(v, int) and lo == 0 and v >= 0:
        return 0 if v == 0 else emit.d_min(v, hi)
    return emit.d_max(lo, emit.d_min(v, hi))


def _reverse(emit, x: str, axis: int) -> str:
    return emit.slice(x, [-1], [INT64_MIN], [axis], [-1])


def _scalar_dim(emit, d: Dim) -> str:
    """A dim as a 0-d int64 tensor (for Range)."""
    if isinstance(d, int):
        return emit.const(np.int64(d), TensorProto.INT64)
    return emit.op("Reshape", d, emit.ints([]))


def _one_hot(ctx, idx: str, depth: Dim, insert_axis: int, dtype: int, flatten: bool = False) -> str:
    """hot[.., j, ..] = (idx[..] == j) as `dtype`, the new axis of length `depth` inserted at
    `insert_axis` (after flattening idx if asked). Negative indices count from the back as in
    Gather. Built from Equal + Range, not OneHot (whose ORT kernels lack float64), never scatter;
    a constant when idx and depth are."""
    emit = ctx.emit
    value = ctx.value(idx)
    if value is not None and isinstance(depth, int):
        norm = np.where(value < 0, value + depth, value).astype(np.int64)
        norm = norm.reshape(-1) if flatten else norm
        rng = np.arange(depth).reshape([depth] + [1] * (norm.ndim - insert_axis))
        return emit.const(np.expand_dims(norm, insert_axis) == rng, dtype)
    t = _as_int64(emit, idx)
    d = emit.ints([depth]) if isinstance(depth, int) else depth
    t = emit.op("Where", emit.op("Less", t, emit.ints([0])), emit.op("Add", t, d), t)
    if flatten:
        t = emit.op("Reshape", t, emit.ints([-1]))
    q = 1 if flatten else emit.rank(idx)
    t = emit.unsqueeze(t, [insert_axis])
    rng = emit.op("Range", emit.const(np.int64(0), TensorProto.INT64), _scalar_dim(emit, depth),
                  emit.const(np.int64(1), TensorProto.INT64))
    rng = emit.op("Reshape", rng, emit.ints([-1] + [1] * (q - insert_axis)))
    return emit.cast(emit.op("Equal", t, rng), dtype)


# ---------------------------------------------------------------------- reshapes and permutations
@vjp("Reshape", "Flatten", "Squeeze", "Unsqueeze", differentiable=(0,))
def reshape(ctx, node, grads):
    """Reshapes keep the element order: reshape g back to X's shape."""
    return [reshape_like(ctx, grads[0], node.input(0))]


@vjp("Transpose")
def transpose(ctx, node, grads):
    """Y = permute(X, perm) so dX = permute(g, perm⁻¹); the default perm reverses the axes."""
    rank = ctx.emit.rank(node.input(0))
    perm = node.attr("perm") or list(reversed(range(rank)))
    inverse = [int(i) for i in np.argsort(perm)]
    return [ctx.emit.op("Transpose", grads[0], perm=inverse)]


@vjp("DepthToSpace", "SpaceToDepth")
def depth_space(ctx, node, grads):
    """Both ops permute elements, so the VJP is the inverse permutation: SpaceToDepth undoes
    DepthToSpace in DCR mode and vice versa. CRD has no inverse op: undo its Reshape/Transpose."""
    emit, g, x = ctx.emit, grads[0], node.input(0)
    b = int(node.attr("blocksize"))
    if node.op == "SpaceToDepth":
        return [emit.op("DepthToSpace", g, blocksize=b, mode="DCR")]
    if node.attr("mode", "DCR") == "DCR":
        return [emit.op("SpaceToDepth", g, blocksize=b)]
    # CRD forward: [N, C', b, b, H, W] -> transpose (0,1,4,2,5,3) -> [N, C', H·b, W·b]
    n, c_out = _dim(emit, x, 0), _dim(emit, node.outputs[0], 1)
    h, w = _dim(emit, x, 2), _dim(emit, x, 3)
    t = emit.op("Reshape", g, emit.shape_of([n, c_out, h, b, w, b]))
    t = emit.op("Transpose", t, perm=[0, 1, 3, 5, 2, 4])
    return [reshape_like(ctx, t, x)]


# ---------------------------------------------------------------------- broadcasting copies
@vjp("Expand", differentiable=(0,))
def expand(ctx, node, grads):
    """Expand broadcasts X: sum the copies back (unbroadcast)."""
    return [unbroadcast(ctx, grads[0], node.input(0), node.outputs[0])]


@vjp("Tile", differentiable=(0,))
def tile(ctx, node, grads):
    """Y[k·d + i] = X[i] along every axis, k < r: view g as [r0, d0, r1, d1, ...] and sum the
    repeat axes. Repeats may be constant or run-time."""
    emit, x, g = ctx.emit, node.input(0), grads[0]
    rank = emit.rank(x)
    dims = emit.dims(x)
    repeats = _elements(ctx, node.input(1), rank)
    view, summed = [], []
    for r, d in zip(repeats, dims):
        if r != 1:
            summed.append(len(view))
            view.append(r)
        view.append(d)
    if not summed:
        return [emit.op("Identity", g)]
    t = emit.op("Reshape", g, emit.shape_of(view))
    return [emit.reduce("ReduceSum", t, summed, keepdims=False)]


# ---------------------------------------------------------------------- joining and splitting
@vjp("Concat")
def concat(ctx, node, grads):
    """Split g at the inputs' (possibly run-time) sizes along the axis."""
    emit, g = ctx.emit, grads[0]
    axis = normalize_axis(int(node.attr("axis")), emit.rank(node.outputs[0]))
    sizes = [_dim(emit, name, axis) for name in node.inputs]
    pieces = emit.split(g, axis, sizes)
    return [p if ctx.needs(node, i) else None for i, p in enumerate(pieces)]


@vjp("Split", differentiable=(0,))
def split(ctx, node, grads):
    """Concat of the output gradients, zeros for outputs that do not reach the score. Reading the
    outputs' shapes covers every form (split attribute, split input, num_outputs, equal split)."""
    emit = ctx.emit
    axis = normalize_axis(int(node.attr("axis", 0)), emit.rank(node.input(0)))
    parts = [g if g is not None else emit.zeros_like(out) for g, out in zip(grads, node.outputs)]
    if len(parts) == 1:
        return [emit.op("Identity", parts[0])]
    return [emit.op("Concat", *parts, axis=axis)]


# ---------------------------------------------------------------------- Slice
@vjp("Slice", differentiable=(0,))
def slice_(ctx, node, grads):
    """Put g back at positions start, start+step, ... of each sliced axis, zeros elsewhere,
    without scatter: interleave step-1 zeros after each element (Unsqueeze + Pad + Reshape),
    reverse first for negative steps, then Pad to the input size. Starts are clamped like the
    ONNX spec; the number of elements is read from Y's shape, so ends need no handling."""
    emit, x, y = ctx.emit, node.input(0), node.outputs[0]
    g = grads[0]
    rank = emit.rank(x)
    cur = _LazyDims(emit, y, rank)  # g's dims: Y's, then X's along the axes already put back
    for axis, start, step in _slice_params(ctx, node, rank):
        size, n = _dim(emit, x, axis), _dim(emit, y, axis)
        if start == 0 and step == 1 and isinstance(size, int) and size == n:
            continue  # whole axis kept
        g = _unslice_axis(emit, g, cur, axis, start, step, n, size)
        cur[axis] = size
    return [g]


class _LazyDims:
    """The dims of a tensor, read (Shape + Gather) only for the axes that are asked for."""

    def __init__(self, emit, x, rank):
        self.emit, self.x, self.known = emit, x, {}
        self.rank = rank

    def __len__(self):
        return self.rank

    def __getitem__(self, i):
        if i not in self.known:
            self.known[i] = _dim(self.emit, self.x, i)
        return self.known[i]

    def __setitem__(self, i, d):
        self.known[i] = d


def _slice_params(ctx, node, rank):
    """[(axis, raw start, step)] with ints where constant and [1] tensors where run-time."""
    emit = ctx.emit
    starts, axes, steps = node.input(1), node.input(3), node.input(4)
    axes_value = None if axes is None else ctx.value(axes)
    if axes is not None and axes_value is None:
        return _slice_params_runtime_axes(ctx, starts, axes, steps, rank)
    count = len(axes_value.reshape(-1)) if axes_value is not None else _length(ctx, starts)
    axis_list = (list(range(count)) if axes_value is None
                 else [normalize_axis(int(a), rank) for a in axes_value.reshape(-1)])
    start_list = _elements(ctx, starts, count)
    step_list = [1] * count if steps is None else _elements(ctx, steps, count)
    return list(zip(axis_list, start_list, step_list))


def _slice_params_runtime_axes(ctx, starts, axes, steps, rank):
    """Run-time axes: for every axis i, start_i = Σ where(axes == i, starts, 0) and
    step_i = 1 + Σ where(axes == i, steps - 1, 0) (start 0, step 1 for axes not sliced)."""
    emit = ctx.emit
    a = _as_int64(emit, axes)
    a = emit.op("Where", emit.op("Less", a, emit.ints([0])), emit.op("Add", a, emit.ints([rank])), a)
    s = _as_int64(emit, starts)
    t = emit.op("Sub", _as_int64(emit, steps), emit.ints([1])) if steps is not None else None
    out = []
    for i in range(rank):
        match = emit.op("Equal", a, emit.ints([i]))
        start = emit.reduce("ReduceSum", emit.op("Where", match, s, emit.ints([0])), [0], keepdims=True)
        step = 1
        if t is not None:
            step = emit.op("Add", emit.reduce("ReduceSum", emit.op("Where", match, t, emit.ints([0])), [0],
                                               keepdims=True), emit.ints([1]))
        out.append((i, start, step))
    return out


def _start_index(emit, start: Dim, hi: Dim, size: Dim) -> Dim:
    """ONNX clamping: negative starts count from the back, then clamp to [0, hi]."""
    if isinstance(start, int):
        adj = start if start >= 0 else emit.d_add(size, start)
    else:
        adj = emit.op("Where", emit.op("Less", start, emit.ints([0])), emit.d_add(start, size), start)
    return _clamp(emit, adj, 0, hi)


def _unslice_axis(emit, g, cur, axis, start, step, n, size):
    """The gradient of one sliced axis: g has n elements there, the result has `size`."""
    if isinstance(step, int):
        if step > 0:
            before = _start_index(emit, start, size, size)
            return _place(emit, g, cur, axis, before, step, n, size)
        s = _start_index(emit, start, emit.d_sub(size, 1), size)
        first = emit.d_sub(s, emit.d_mul(emit.d_sub(n, 1), -step))  # lowest position taken
        before = _clamp(emit, first, 0, size)
        return _place(emit, _reverse(emit, g, axis), cur, axis, before, -step, n, size)
    # Run-time step of unknown sign: build both placements (same shape) and choose with Where.
    negative = emit.op("Less", step, emit.ints([0]))
    magnitude = emit.op("Abs", step)
    hi = emit.d_sub(size, emit.cast(negative, TensorProto.INT64))
    s = _start_index(emit, start, hi, size)
    forward = _place(emit, g, cur, axis, s, magnitude, n, size)
    first = _clamp(emit, emit.d_sub(s, emit.d_mul(emit.d_sub(n, 1), magnitude)), 0, size)
    backward = _place(emit, _reverse(emit, g, axis), cur, axis, first, magnitude, n, size)
    return emit.op("Where", negative, backward, forward)


def _place(emit, g, cur, axis, before, step, n, size):
    """Spread g's n elements along `axis` to positions before + k·step, zeros elsewhere, total
    `size`: [.., n, ..] -> Unsqueeze -> Pad step-1 zeros -> [.., n·step, ..] -> crop -> Pad.
    `cur` gives g's current dims (read only when the Reshape needs them)."""
    rank = len(cur)
    length = n
    if step != 1:
        cur = [cur[i] for i in range(rank)]
        u = emit.unsqueeze(g, [axis + 1])
        pads = [0] * (2 * (rank + 1))
        pads[rank + 1 + axis + 1] = emit.d_sub(step, 1)
        u = emit.pad(u, pads)
        merged = emit.d_mul(n, step)
        g = emit.reshape(u, cur[:axis] + [merged] + cur[axis + 1:])
        # The trailing step-1 zeros may run past the input's end: crop them.
        length = emit.d_min(merged, emit.d_sub(size, before))
        if not (isinstance(length, int) and isinstance(merged, int) and length == merged):
            g = emit.slice(g, [0], [length], [axis])
    pads = [0] * (2 * rank)
    pads[axis] = before
    pads[rank + axis] = emit.d_sub(emit.d_sub(size, before), length)
    return emit.pad(g, pads)


# ---------------------------------------------------------------------- Gather
@vjp("Gather", differentiable=(0,))
def gather(ctx, node, grads):
    """dX[.., j, ..] = Σ_{p: idx[p] = j} g[.., p, ..]: contract g with onehot(idx) (duplicates
    add up, no scatter). A constant scalar index (ViT's class token) is just a Pad."""
    emit, x, idx, g = ctx.emit, node.input(0), node.input(1), grads[0]
    rank = emit.rank(x)
    axis = normalize_axis(int(node.attr("axis", 0)), rank)
    size = _dim(emit, x, axis)
    value = ctx.value(idx)
    if value is not None and value.ndim == 0:
        j = int(value)
        before = j if j >= 0 else emit.d_add(size, j)
        pads = [0] * (2 * rank)
        pads[axis] = before
        pads[rank + axis] = emit.d_sub(emit.d_sub(size, before), 1)
        return [emit.pad(emit.unsqueeze(g, [axis]), pads)]
    outer = emit.d_prod([_dim(emit, x, i) for i in range(axis)])
    inner = emit.d_prod([_dim(emit, x, i) for i in range(axis + 1, rank)])
    count = int(value.size) if value is not None else -1  # -1: Reshape infers the index count
    # hot[j, p] = (idx[p] == j), shape [size, count]
    hot = _one_hot(ctx, idx, size, 0, emit.dtype(node.outputs[0]), flatten=True)
    g3 = emit.op("Reshape", g, emit.shape_of([outer, count, inner]))
    dx3 = emit.op("MatMul", hot, g3)  # [before, size, after]
    return [reshape_like(ctx, dx3, x)]


@vjp("GatherElements", differentiable=(0,))
def gather_elements(ctx, node, grads):
    """Y[.., k, ..] = X[.., idx[.., k, ..], ..] along `axis`: dX[.., j, ..] = Σ_k g[.., k, ..]·
    [idx[.., k, ..] = j] — a one-hot product summed over k (scatter-free), then zero-padded where
    idx is smaller than X on the other axes."""
    emit, x, idx, g = ctx.emit, node.input(0), node.input(1), grads[0]
    rank = emit.rank(x)
    axis = normalize_axis(int(node.attr("axis", 0)), rank)
    size = _dim(emit, x, axis)
    # hot[.., k, j, ..] = (idx[.., k, ..] == j): idx gets a new axis after `axis`.
    hot = _one_hot(ctx, idx, size, axis + 1, emit.dtype(node.outputs[0]))
    prod = emit.op("Mul", emit.unsqueeze(g, [axis + 1]), hot)
    out = emit.reduce("ReduceSum", prod, [axis], keepdims=False)
    pads = [0] * (2 * rank)
    x_shape, idx_shape = emit.info(x).shape, emit.info(idx).shape
    for i in range(rank):
        if i != axis and (x_shape[i] != idx_shape[i] or x_shape[i] is None):
            pads[rank + i] = emit.d_sub(_dim(emit, x, i), _dim(emit, idx, i))
    return [emit.pad(out, pads)]


# ---------------------------------------------------------------------- Pad
@vjp("Pad", differentiable=(0,))
def pad(ctx, node, grads):
    """constant: Slice g back to the data region (negative pads, which crop, become zero pads).
    reflect / edge / wrap: the centre of g plus each border strip added back where it was copied
    from — mirrored (reflect), summed onto the edge element (edge), or shifted (wrap)."""
    emit, x, y, g = ctx.emit, node.input(0), node.outputs[0], grads[0]
    mode = node.attr("mode", "constant")
    rank = emit.rank(x)
    pads_name, axes_name = node.input(1), node.input(3)
    if axes_name is not None:
        axes_value = ctx.value(axes_name)
        if axes_value is None:
            raise NotImplementedError("Pad with run-time axes")
        axes = [normalize_axis(int(a), rank) for a in axes_value.reshape(-1)]
    else:
        axes = list(range(rank))
    values = _elements(ctx, pads_name, 2 * len(axes))
    pairs = [(a, values[i], values[len(axes) + i]) for i, a in enumerate(axes)
             if not (values[i] == 0 and values[len(axes) + i] == 0)]
    if mode == "constant":
        if pairs and all(isinstance(b, int) and isinstance(e, int) and b >= 0 and e >= 0 for _, b, e in pairs):
            cropped = crop_by_pads(ctx, g, [a for a, _, _ in pairs], [b for _, b, _ in pairs], [e for _, _, e in pairs])
            if cropped is not None:  # the convolution's gradient, already cut to the data region
                return [cropped]
        starts = [emit.d_max(b, 0) if not isinstance(b, int) else max(b, 0) for _, b, _ in pairs]
        ends = [emit.d_sub(_dim(emit, y, a), emit.d_max(e, 0) if not isinstance(e, int) else max(e, 0))
                for a, _, e in pairs]
        if pairs:
            g = emit.slice(g, starts, ends, [a for a, _, _ in pairs])
        zero_pads = [0] * (2 * rank)
        for a, b, e in pairs:  # negative pads cropped X: those elements get zero gradient
            zero_pads[a] = emit.d_max(emit.d_sub(0, b), 0) if not isinstance(b, int) else max(-b, 0)
            zero_pads[rank + a] = emit.d_max(emit.d_sub(0, e), 0) if not isinstance(e, int) else max(-e, 0)
        return [emit.pad(g, zero_pads)]
    for a, b, e in pairs:
        if (isinstance(b, int) and b < 0) or (isinstance(e, int) and e < 0):
            raise NotImplementedError(f"Pad mode {mode!r} with negative pads")
        g = _unpad_axis(emit, g, a, b, e, _dim(emit, x, a), _dim(emit, y, a), mode, rank)
    return [g]


def _unpad_axis(emit, g, axis, before, after, size, padded, mode, rank):
    def pad_axis(t, lo, hi):
        pads = [0] * (2 * rank)
        pads[axis], pads[rank + axis] = lo, hi
        return emit.pad(t, pads)

    end = emit.d_add(before, size)
    out = emit.slice(g, [before], [end], [axis])
    if before != 0:  # Y[k] = X[before - k] (reflect), X[0] (edge), X[size - before + k] (wrap)
        strip = emit.slice(g, [0], [before], [axis])
        if mode == "reflect":
            back = pad_axis(_reverse(emit, strip, axis), 1, emit.d_sub(emit.d_sub(size, 1), before))
        elif mode == "edge":
            back = pad_axis(emit.reduce("ReduceSum", strip, [axis]), 0, emit.d_sub(size, 1))
        elif mode == "wrap":
            back = pad_axis(strip, emit.d_sub(size, before), 0)
        else:
            raise NotImplementedError(f"Pad mode {mode!r}")
        out = emit.op("Add", out, back)
    if after != 0:  # Y[end + k] = X[size - 2 - k] (reflect), X[size - 1] (edge), X[k] (wrap)
        strip = emit.slice(g, [end], [padded], [axis])
        if mode == "reflect":
            back = pad_axis(_reverse(emit, strip, axis), emit.d_sub(emit.d_sub(size, 1), after), 1)
        elif mode == "edge":
            back = pad_axis(emit.reduce("ReduceSum", strip, [axis]), emit.d_sub(size, 1), 0)
        elif mode == "wrap":
            back = pad_axis(strip, 0, emit.d_sub(size, after))
        else:
            raise NotImplementedError(f"Pad mode {mode!r}")
        out = emit.op("Add", out, back)
    return out
