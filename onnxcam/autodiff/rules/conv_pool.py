"""Conv, ConvTranspose and pooling."""

from __future__ import annotations

from ..registry import vjp


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
    """dX = ConvTranspose(g, W) with the same strides, dilations, group and kernel."""
    x, w, y = node.input(0), node.input(1), node.outputs[0]
    w_shape = ctx.emit.info(w).shape
    kernel = list(node.attr("kernel_shape", w_shape[2:] if w_shape else []))
    if not kernel or any(not isinstance(k, int) for k in kernel):
        raise NotImplementedError(f"Conv {node.name!r}: kernel shape unknown")
    n_sp = len(kernel)
    strides = list(node.attr("strides", [1] * n_sp))
    dilations = list(node.attr("dilations", [1] * n_sp))
    begins, ends = spatial_pads(ctx, node, x, kernel, strides, dilations)
    dx = transpose_conv_to(ctx, grads[0], w, x, y, kernel, strides, dilations,
                           node.attr("group", 1), begins, ends)
    return [dx, None, None]


@vjp("GlobalAveragePool")
def global_average_pool(ctx, node, grads):
    e, x = ctx.emit, node.input(0)
    count = e.d_prod(e.dims(x)[2:])
    scaled = e.op("Div", grads[0], e.d_to_float(count, x))
    return [e.op("Expand", scaled, e.shape_of_tensor_or_dims(x))]
