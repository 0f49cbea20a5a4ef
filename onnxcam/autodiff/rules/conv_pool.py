"""Conv, ConvTranspose and pooling.

Every windowed op reads, for output position o and kernel offset j, the (padded) input at
``o*s + j*d``. Its adjoint scatters back along the same map, which is exactly what a
ConvTranspose without pads computes; cropping its output by the begin pads then places the
result on X. Pools reuse that with channels folded into the batch axis ([N*C, 1, ...]), so one
small kernel serves every channel and the channel count may be dynamic.
"""

from __future__ import annotations

import itertools

import numpy as np
from onnx import TensorProto, helper

from ..registry import vjp
from .common import mask_grad
from .conv_adjoint import conv_as_conv


def spatial_pads(ctx, node, x, kernel, strides, dilations):
    """Explicit begin/end pads per spatial axis (dims), resolving auto_pad like ONNX Runtime."""
    e = ctx.emit
    n_sp = len(kernel)
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        pads = list(node.attr("pads", [0] * (2 * n_sp)))
        return pads[:n_sp], pads[n_sp:]
    if auto_pad == "VALID":
        return [0] * n_sp, [0] * n_sp
    sizes = e.dims(x)[2:]
    begins, ends = [], []
    for i in range(n_sp):
        if strides[i] == 1:  # out = H, so total = d(k-1) whatever H is: static even for dynamic sizes
            total = dilations[i] * (kernel[i] - 1)
            small, big = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else big)
            ends.append(big if auto_pad == "SAME_UPPER" else small)
            continue
        out = e.d_div(e.d_add(sizes[i], strides[i] - 1), strides[i])  # ceil(H / s)
        needed = e.d_add(e.d_mul(e.d_sub(out, 1), strides[i]), dilations[i] * (kernel[i] - 1) + 1)
        total = e.d_max(e.d_sub(needed, sizes[i]), 0)
        small = e.d_div(total, 2)
        big = e.d_sub(total, small)
        if auto_pad == "SAME_UPPER":
            begins.append(small)
            ends.append(big)
        else:
            begins.append(big)
            ends.append(small)
    return begins, ends


def transpose_conv_to(ctx, g, weight, x, y, kernel, strides, dilations, group, begins, ends):
    """dX for Y = Conv(X, W): ConvTranspose(g, W) placed back onto X's spatial extent."""
    e = ctx.emit
    n_sp = len(kernel)
    in_sizes = e.dims(x)[2:]
    out_sizes = e.dims(y)[2:]
    attrs = dict(strides=list(strides), dilations=list(dilations), group=group, kernel_shape=list(kernel))
    static = all(isinstance(v, int) for v in list(in_sizes) + list(out_sizes) + list(begins) + list(ends))
    if static:
        output_padding = [in_sizes[i] + begins[i] + ends[i]
                          - ((out_sizes[i] - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1)
                          for i in range(n_sp)]
        if all(0 <= p < max(strides[i], dilations[i]) for i, p in enumerate(output_padding)):
            return e.op("ConvTranspose", g, weight, pads=list(begins) + list(ends),
                        output_padding=output_padding, **attrs)
    # Dynamic sizes: transpose with no padding (covers every window), then cut the padded
    # border away and add zero rows that no window covered.
    full = e.op("ConvTranspose", g, weight, **attrs)
    axes = list(range(2, 2 + n_sp))
    cut = e.slice(full, begins, [e.d_add(begins[i], in_sizes[i]) for i in range(n_sp)], axes)
    have = e.dims(e.set_info(cut, e.dtype(g), [None] * (2 + n_sp)))[2:]
    missing = [e.d_sub(in_sizes[i], have[i]) for i in range(n_sp)]
    return e.pad(cut, [0] * (2 + n_sp) + [0, 0] + missing)


@vjp("Conv", differentiable=(0,))
def conv(ctx, node, grads):
    """dX = ConvTranspose(g, W) with the same strides, dilations, group and kernel; as a Conv
    with the transposed, flipped weight where ONNX Runtime computes that faster (conv_adjoint)."""
    x, w, y = node.input(0), node.input(1), node.outputs[0]
    w_shape = ctx.emit.info(w).shape
    kernel = list(node.attr("kernel_shape", w_shape[2:] if w_shape else []))
    if not kernel or any(not isinstance(k, int) for k in kernel):
        raise NotImplementedError(f"Conv {node.name!r}: kernel shape unknown")
    n_sp = len(kernel)
    strides = list(node.attr("strides", [1] * n_sp))
    dilations = list(node.attr("dilations", [1] * n_sp))
    begins, ends = spatial_pads(ctx, node, x, kernel, strides, dilations)
    group = node.attr("group", 1)
    dx = conv_as_conv(ctx, grads[0], w, x, y, kernel, strides, dilations, group, begins, ends)
    if dx is None:
        dx = transpose_conv_to(ctx, grads[0], w, x, y, kernel, strides, dilations, group, begins, ends)
    return [dx, None, None]


@vjp("GlobalAveragePool")
def global_average_pool(ctx, node, grads):
    e, x = ctx.emit, node.input(0)
    count = e.d_prod(e.dims(x)[2:])
    scaled = e.op("Div", grads[0], e.d_to_float(count, x))
    return [e.op("Expand", scaled, e.shape_of_tensor_or_dims(x))]


# ---------------------------------------------------------------------------------- helpers
def _kernel_geometry(node, kernel):
    n_sp = len(kernel)
    return list(node.attr("strides", [1] * n_sp)), list(node.attr("dilations", [1] * n_sp))


def _window_span(ctx, out_size, kernel, stride, dilation):
    """Padded extent touched by `out_size` windows: (Ho - 1)*s + d*(k - 1) + 1."""
    e = ctx.emit
    return e.d_add(e.d_mul(e.d_sub(out_size, 1), stride), dilation * (kernel - 1) + 1)


def _fold_channels(ctx, t, n_sp):
    """[N, C, *sp] -> [N*C, 1, *sp] (Reshape's 0 copies the spatial sizes)."""
    return ctx.emit.op("Reshape", t, ctx.emit.ints([-1, 1] + [0] * n_sp))


def _crop(ctx, t, sizes, begins, targets):
    """t[:, :, b:b+target] per spatial axis, zero-padded at the end where t is too short.

    `sizes` are t's spatial sizes; windows that stop early (floor mode) leave X's last rows
    uncovered, which get a zero gradient."""
    e = ctx.emit
    n_sp = len(sizes)
    want = [e.d_add(begins[i], targets[i]) for i in range(n_sp)]
    ends = [e.d_min(sizes[i], want[i]) for i in range(n_sp)]
    if not all(isinstance(b, int) and b == 0 for b in begins) or not all(
            isinstance(a, int) and isinstance(b, int) and a == b for a, b in zip(ends, sizes)):
        t = e.slice(t, begins, ends, list(range(2, 2 + n_sp)))
    missing = [e.d_sub(want[i], ends[i]) for i in range(n_sp)]
    return e.pad(t, [0] * (2 + n_sp) + [0, 0] + missing)


def _windows_to_input(ctx, stack, weight, x, y, kernel, strides, dilations, begins):
    """Adjoint of window extraction: stack [N*C, K, *Ho] holds, per kernel offset j (channel j),
    what window o sends to padded position o*s + j*d; ConvTranspose with kernel `weight`
    [K, 1, *k] adds it all up on the padded grid, the crop removes the pads. Returns [N*C, 1, *X]."""
    e = ctx.emit
    n_sp = len(kernel)
    full = e.op("ConvTranspose", stack, weight, strides=list(strides), dilations=list(dilations),
                kernel_shape=list(kernel))
    out_sizes = e.dims(y)[2:]
    spans = [_window_span(ctx, out_sizes[i], kernel[i], strides[i], dilations[i]) for i in range(n_sp)]
    return _crop(ctx, full, spans, begins, e.dims(x)[2:])


def _end_padding(ctx, x, y, kernel, strides, dilations, begins):
    """End pads so that every window (including ceil_mode's partial ones) lies inside."""
    e = ctx.emit
    in_sizes, out_sizes = e.dims(x)[2:], e.dims(y)[2:]
    tails = []
    for i in range(len(kernel)):
        span = _window_span(ctx, out_sizes[i], kernel[i], strides[i], dilations[i])
        tails.append(e.d_max(e.d_sub(span, e.d_add(in_sizes[i], begins[i])), 0))
    return tails


def _pool_setup(ctx, node):
    x, y = node.input(0), node.outputs[0]
    kernel = list(node.attr("kernel_shape"))
    strides, dilations = _kernel_geometry(node, kernel)
    begins, _ = spatial_pads(ctx, node, x, kernel, strides, dilations)
    return x, y, kernel, strides, dilations, begins


def _windows_adjoint_per_channel(ctx, g, x, y, kernel, strides, dilations, begins):
    """Scatter g [N, C, *Ho] back with an all-ones window (the adjoint of a window sum)."""
    e = ctx.emit
    n_sp = len(kernel)
    ones = e.const(np.ones([1, 1] + kernel), e.dtype(x))
    dx = _windows_to_input(ctx, _fold_channels(ctx, g, n_sp), ones, x, y, kernel, strides, dilations, begins)
    return e.op("Reshape", dx, e.shape_of_tensor_or_dims(x))


# ---------------------------------------------------------------------------------- ConvTranspose
def _conv_transpose_pads(ctx, node, in_sizes, kernel, strides, dilations, output_padding):
    """Begin/end crop of ConvTranspose's full output, resolved as ONNX Runtime does: with
    output_shape (or SAME_*), total = s*(H-1) + op + d*(k-1) + 1 - out; SAME_UPPER puts the odd
    element at the end (begin = total // 2), NOTSET and SAME_LOWER at the beginning."""
    e = ctx.emit
    n_sp = len(kernel)
    auto_pad = node.attr("auto_pad", "NOTSET") or "NOTSET"
    output_shape = node.attr("output_shape")
    if not output_shape and auto_pad in ("NOTSET", "VALID"):
        if auto_pad == "VALID":
            return [0] * n_sp, [0] * n_sp
        pads = list(node.attr("pads", [0] * (2 * n_sp)))
        return pads[:n_sp], pads[n_sp:]
    begins, ends = [], []
    for i in range(n_sp):
        span = dilations[i] * (kernel[i] - 1) + 1 + output_padding[i]
        if output_shape:
            out = list(output_shape)[-n_sp:][i]
        else:  # SAME: out = H * s
            out = e.d_mul(in_sizes[i], strides[i])
        full = e.d_add(e.d_mul(e.d_sub(in_sizes[i], 1), strides[i]), span)
        total = e.d_max(e.d_sub(full, out), 0)
        small = e.d_div(total, 2)
        big = e.d_sub(total, small)
        begins.append(small if auto_pad == "SAME_UPPER" else big)
        ends.append(big if auto_pad == "SAME_UPPER" else small)
    return begins, ends


@vjp("ConvTranspose", differentiable=(0,))
def conv_transpose(ctx, node, grads):
    """Y = crop(sum_i X[i] W placed at i*s + j*d) is the adjoint of Conv, so dX = Conv(g, W)
    with the same strides, dilations and group, W unchanged ([C_in, C_out/G, k] is read by Conv
    as [M, C/G, k]), and the crop pads turned into Conv pads. Output padding / a larger
    output_shape only make the Conv longer: keep the first H positions."""
    e = ctx.emit
    x, w, y = node.input(0), node.input(1), node.outputs[0]
    w_shape = e.info(w).shape
    kernel = list(node.attr("kernel_shape", w_shape[2:] if w_shape else []))
    if not kernel or any(not isinstance(k, int) for k in kernel):
        raise NotImplementedError(f"ConvTranspose {node.name!r}: kernel shape unknown")
    n_sp = len(kernel)
    strides, dilations = _kernel_geometry(node, kernel)
    output_padding = list(node.attr("output_padding", [0] * n_sp))
    in_sizes, out_sizes = e.dims(x)[2:], e.dims(y)[2:]
    begins, ends = _conv_transpose_pads(ctx, node, in_sizes, kernel, strides, dilations, output_padding)
    attrs = dict(strides=strides, dilations=dilations, group=node.attr("group", 1), kernel_shape=kernel)
    g = grads[0]
    if all(isinstance(p, int) for p in begins + ends):
        dx = e.op("Conv", g, w, pads=list(begins) + list(ends), **attrs)
    else:
        dx = e.op("Conv", e.pad(g, [0, 0] + list(begins) + [0, 0] + list(ends)), w, **attrs)
    conv_sizes = [e.d_add(e.d_div(e.d_sub(e.d_add(e.d_add(out_sizes[i], begins[i]), ends[i]),
                                           dilations[i] * (kernel[i] - 1) + 1), strides[i]), 1)
                  for i in range(n_sp)]
    if not all(isinstance(a, int) and isinstance(b, int) and a == b for a, b in zip(conv_sizes, in_sizes)):
        dx = e.slice(dx, [0] * n_sp, in_sizes, list(range(2, 2 + n_sp)))
    return [dx, None, None]


# ---------------------------------------------------------------------------------- pools
def _average_pool_scale(ctx, node, x, y, kernel, strides, dilations, begins):
    """1/divisor per output window, [1, 1, *Ho]. The divisor depends on count_include_pad,
    ceil_mode's partial windows and the pads; rather than re-deriving ONNX Runtime's rule, take
    AveragePool(ones) = real_count / divisor with the node's own attributes and divide by
    real_count (a window sum of ones padded with zeros, by a plain Conv)."""
    e = ctx.emit
    n_sp = len(kernel)
    pads = list(node.attr("pads", [0] * (2 * n_sp)))
    auto_pad = node.attr("auto_pad", "NOTSET") or "NOTSET"
    if (not node.attr("ceil_mode", 0) and auto_pad in ("NOTSET", "VALID")
            and (auto_pad == "VALID" or not any(pads))):
        return e.scalar(1.0 / float(np.prod(kernel)), x)  # every window is whole and real
    dtype = e.dtype(x)
    in_sizes, out_sizes = e.dims(x)[2:], e.dims(y)[2:]
    ones = e.op("ConstantOfShape", e.shape_of([1, 1] + in_sizes), value=helper.make_tensor("value", dtype, [1], [1]))
    mean_of_ones = e.op("AveragePool", ones, **node.attrs)
    tails = _end_padding(ctx, x, y, kernel, strides, dilations, begins)
    padded = e.pad(ones, [0, 0] + list(begins) + [0, 0] + tails)
    real = e.op("Conv", padded, e.const(np.ones([1, 1] + kernel), dtype), strides=strides, dilations=dilations,
                kernel_shape=kernel)
    real = e.slice(real, [0] * n_sp, out_sizes, list(range(2, 2 + n_sp)))
    return e.op("Div", mean_of_ones, e.op("Max", real, e.scalar(1.0, x)))


@vjp("AveragePool", differentiable=(0,))
def average_pool(ctx, node, grads):
    """Y[o] = sum_j Xpad[o*s + j*d] / div[o]: dX = crop(ConvTranspose(g / div, ones))."""
    x, y, kernel, strides, dilations, begins = _pool_setup(ctx, node)
    scale = _average_pool_scale(ctx, node, x, y, kernel, strides, dilations, begins)
    g = ctx.emit.op("Mul", grads[0], scale)
    return [_windows_adjoint_per_channel(ctx, g, x, y, kernel, strides, dilations, begins)]


@vjp("MaxPool", differentiable=(0,))
def max_pool(ctx, node, grads):
    """Each window sends g to its maximum; ties go to the first maximum in the window's row-major
    scan (torch's choice). Scatter-free: pad X with -inf, and for each kernel offset j compare
    the strided slice Xpad[o*s + j*d] with Y; the first-match mask keeps hits not taken by an
    earlier offset (And/Not/Or). g * mask_j stacked over j is [N*C, K, *Ho] (the boolean masks
    stacked first, then one Cast and one broadcast Mul: ONNX Runtime's Where per offset cost 3-4x
    more), and one ConvTranspose with one-hot kernels adds each back at offset j (overlapping
    windows add, unlike MaxUnpool). The Indices output is integer and carries no gradient."""
    e = ctx.emit
    x, y, kernel, strides, dilations, begins = _pool_setup(ctx, node)
    if grads[0] is None:
        return [None]
    n_sp = len(kernel)
    axes = list(range(2, 2 + n_sp))
    out_sizes = e.dims(y)[2:]
    tails = _end_padding(ctx, x, y, kernel, strides, dilations, begins)
    xs = e.pad(_fold_channels(ctx, x, n_sp), [0, 0] + list(begins) + [0, 0] + tails,
               value=e.scalar(-np.inf, x))
    ys, gs = _fold_channels(ctx, y, n_sp), _fold_channels(ctx, grads[0], n_sp)
    offsets = list(itertools.product(*[range(k) for k in kernel]))
    onehot = np.zeros([len(offsets), 1] + kernel)
    taken, parts = None, []
    for j, offset in enumerate(offsets):
        onehot[(j, 0) + offset] = 1
        starts = [offset[i] * dilations[i] for i in range(n_sp)]
        ends = [e.d_add(starts[i], e.d_add(e.d_mul(e.d_sub(out_sizes[i], 1), strides[i]), 1)) for i in range(n_sp)]
        hit = e.op("Equal", e.slice(xs, starts, ends, axes, strides), ys)
        if taken is None:
            first, taken = hit, hit
        else:
            first = e.op("And", hit, e.op("Not", taken))
            taken = e.op("Or", taken, hit)
        parts.append(first)
    masks = e.op("Concat", *parts, axis=1) if len(parts) > 1 else parts[0]
    stack = mask_grad(ctx, masks, gs)
    weight = e.const(onehot, e.dtype(x))
    dx = _windows_to_input(ctx, stack, weight, x, y, kernel, strides, dilations, begins)
    return [e.op("Reshape", dx, e.shape_of_tensor_or_dims(x))]


@vjp("GlobalMaxPool")
def global_max_pool(ctx, node, grads):
    """g goes to the first maximum of each channel in row-major order (torch's tie rule for
    adaptive_max_pool / max_pool with a whole-image window): ArgMax picks the first index,
    Equal against Range(H*W) makes the one-hot mask."""
    e, x = ctx.emit, node.input(0)
    flat = e.op("Reshape", x, e.ints([0, 0, -1]))
    first = e.op("ArgMax", flat, axis=2, keepdims=1)  # [N, C, 1]
    count = e.d_prod(e.dims(x)[2:])
    if isinstance(count, int):
        positions = e.ints(range(count))
    else:
        zero, one = (e.const(np.asarray(v, np.int64), TensorProto.INT64) for v in (0, 1))
        positions = e.op("Range", zero, e.squeeze(count, [0]), one)
    mask = e.op("Equal", positions, first)  # [N, C, H*W]
    dx = mask_grad(ctx, mask, e.op("Reshape", grads[0], e.ints([0, 0, -1])))
    return [e.op("Reshape", dx, e.shape_of_tensor_or_dims(x))]


def _lp_local_factor(ctx, x, p):
    """d|x|^p/dx / p = sign(x)|x|^(p-1) = x |x|^(p-2)."""
    e = ctx.emit
    if p == 2:
        return x
    if p == 1:
        return e.op("Sign", x)
    return e.op("Mul", x, e.op("Pow", e.op("Abs", x), e.scalar(float(p - 2), x)))


def _lp_output_factor(ctx, y, g, p):
    """g * Y^(1-p), 0 where Y == 0 (an all-zero window has a zero subgradient there)."""
    e = ctx.emit
    if p == 1:
        return g
    positive = e.op("Greater", y, e.scalar(0.0, y))
    safe = e.op("Where", positive, y, e.scalar(1.0, y))
    factor = e.op("Mul", g, e.op("Pow", safe, e.scalar(float(1 - p), y)))
    return e.op("Where", positive, factor, e.scalar(0.0, y))


@vjp("LpPool", differentiable=(0,))
def lp_pool(ctx, node, grads):
    """Y = (sum_window |x|^p)^(1/p): dX = x|x|^(p-2) * crop(ConvTranspose(g * Y^(1-p), ones))."""
    x, y, kernel, strides, dilations, begins = _pool_setup(ctx, node)
    p = int(node.attr("p", 2))
    g = _lp_output_factor(ctx, y, grads[0], p)
    back = _windows_adjoint_per_channel(ctx, g, x, y, kernel, strides, dilations, begins)
    return [ctx.emit.op("Mul", back, _lp_local_factor(ctx, x, p))]


@vjp("GlobalLpPool")
def global_lp_pool(ctx, node, grads):
    """Y = (sum_spatial |x|^p)^(1/p): dX = x|x|^(p-2) * Y^(1-p) * g (broadcast)."""
    x, y = node.input(0), node.outputs[0]
    p = int(node.attr("p", 2))
    return [ctx.emit.op("Mul", _lp_local_factor(ctx, x, p), _lp_output_factor(ctx, y, grads[0], p))]
