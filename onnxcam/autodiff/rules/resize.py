"""Resize (every mode and coordinate transform) via the adjoint of its separable matrices."""

from __future__ import annotations

import numpy as np
from onnx import helper

from ..registry import vjp

# Attributes that shape the interpolation weights; copied to the identity Resize unchanged.
_WEIGHT_ATTRS = ("mode", "coordinate_transformation_mode", "nearest_mode", "cubic_coeff_a",
                 "exclude_outside", "antialias")


@vjp("Resize", differentiable=(0,))
def resize(ctx, node, grads):
    """Resize of NCHW along H and W is separable and linear: Y[n, c] = A_h · X[n, c] · A_wᵀ, so
    dX[n, c] = A_hᵀ · g[n, c] · A_w.

    Each A is obtained by running a Resize with the node's own attributes on an identity matrix
    laid out so that only that axis is resized ([n, 1, n, 1] for H, [n, 1, 1, n] for W) with the
    same scale (or output size) for that axis: the result, reshaped to [n, m], is Aᵀ (row i holds
    where input pixel i goes). That reproduces every mode, coordinate transform, nearest mode,
    cubic coefficient, exclude_outside and antialias setting exactly, and since it runs at run
    time, dynamic spatial sizes work. Only 4-D inputs whose N and C are not resized are handled."""
    e, x, y, g = ctx.emit, node.input(0), node.outputs[0], grads[0]
    if e.rank(x) != 4:
        raise NotImplementedError(f"Resize gradient: only 4-D NCHW inputs (got rank {e.rank(x)})")
    policy = node.attr("keep_aspect_ratio_policy", "stretch")
    roi, scales, sizes = node.input(1), node.input(2), node.input(3)
    if scales is not None and _is_empty(ctx, scales):
        scales = None
    if sizes is not None and _is_empty(ctx, sizes):
        sizes = None
    if scales is None and sizes is None:
        raise NotImplementedError("Resize gradient: neither scales nor sizes given")
    if sizes is not None and policy != "stretch":
        raise NotImplementedError(f"Resize gradient: keep_aspect_ratio_policy={policy!r}")
    axes = [a + 4 if a < 0 else a for a in node.attr("axes", [0, 1, 2, 3])]
    checked = _check_batch_channels_kept(ctx, node, axes, scales, sizes)

    attrs = {k: node.attrs[k] for k in _WEIGHT_ATTRS if k in node.attrs}
    attrs["extrapolation_value"] = 0.0  # outside the crop Y is a constant: no weight
    n_in, n_out = e.dims(x), e.dims(y)
    dx = g
    for axis in (2, 3):
        if axis not in axes:
            continue
        position = axes.index(axis)  # where this axis sits in scales / sizes / roi
        a_t = _weights_transposed(ctx, axis, position, len(axes), n_in[axis], n_out[axis],
                                  roi, scales, sizes, attrs, e.dtype(x))
        if axis == 2:  # [H, Ho] @ [N, C, Ho, W'] -> [N, C, H, W']
            dx = e.op("MatMul", a_t, dx)
        else:  # [N, C, H', Wo] @ [Wo, W] -> [N, C, H', W]
            dx = e.op("MatMul", dx, e.op("Transpose", a_t, perm=[1, 0]))
    if not checked:  # N or C might have been resized: fail loudly rather than mis-shape
        dx = e.op("Reshape", dx, e.shape_of_tensor_or_dims(x))
    return [dx]


def _is_empty(ctx, name):
    value = ctx.value(name)
    if value is not None:
        return value.size == 0
    shape = ctx.emit.info(name).shape
    return shape is not None and len(shape) == 1 and shape[0] == 0


def _check_batch_channels_kept(ctx, node, axes, scales, sizes) -> bool:
    """Refuse a Resize that changes N or C when that is known; False when it can't be told."""
    e, x, y = ctx.emit, node.input(0), node.outputs[0]
    outer = [a for a in (0, 1) if a in axes]
    if not outer:
        return True
    if scales is not None:
        value = ctx.value(scales)
        if value is not None:
            if any(float(value[axes.index(a)]) != 1.0 for a in outer):
                raise NotImplementedError("Resize gradient: N or C is rescaled")
            return True
    else:
        value = ctx.value(sizes)
        x_shape = e.info(x).shape
        if value is not None and x_shape is not None:
            for a in outer:
                if isinstance(x_shape[a], int) and x_shape[a] != int(value[axes.index(a)]):
                    raise NotImplementedError("Resize gradient: N or C is resized")
            if all(isinstance(x_shape[a], int) for a in outer):
                return True
    x_shape, y_shape = e.info(x).shape, e.info(y).shape
    if x_shape is not None and y_shape is not None:
        return all(x_shape[a] == y_shape[a] and x_shape[a] is not None for a in outer)
    return False


def _weights_transposed(ctx, axis, position, n_axes, n, m, roi, scales, sizes, attrs, dtype):
    """Aᵀ for one axis as an [n, m] tensor: the node's Resize applied to an identity matrix."""
    e = ctx.emit
    zero = helper.make_tensor("value", dtype, [1], [0])
    eye = e.op("EyeLike", e.op("ConstantOfShape", e.shape_of([n, n]), value=zero))
    layout = [n, 1, n, 1] if axis == 2 else [n, 1, 1, n]
    eye = e.op("Reshape", eye, e.shape_of(layout))
    roi_id = scales_id = sizes_id = None
    if scales is not None:
        s = e.op("Gather", scales, e.ints([position]), axis=0)
        one = e.const(np.ones([1], np.float32), e.dtype(scales))
        scales_id = e.op("Concat", *([one] * axis + [s] + [one] * (3 - axis)), axis=0)
    else:
        sizes_id = e.shape_of([n, 1, m, 1] if axis == 2 else [n, 1, 1, m])
    if attrs.get("coordinate_transformation_mode") == "tf_crop_and_resize":
        rdt = e.dtype(roi)
        start = e.op("Gather", roi, e.ints([position]), axis=0)
        end = e.op("Gather", roi, e.ints([n_axes + position]), axis=0)
        lo, hi = e.const(np.zeros([1]), rdt), e.const(np.ones([1]), rdt)
        roi_id = e.op("Concat", *([lo] * axis + [start] + [lo] * (3 - axis)
                                  + [hi] * axis + [end] + [hi] * (3 - axis)), axis=0)
    weights = e.resize_full(eye, roi_id, scales_id, sizes_id, **attrs)
    return e.op("Reshape", weights, e.ints([0, -1]))
