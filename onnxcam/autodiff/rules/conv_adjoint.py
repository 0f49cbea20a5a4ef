"""The input gradient of Conv written as a Conv, where ONNX Runtime computes that much faster.

dX for Y = Conv(X, W) is the adjoint of the convolution: ConvTranspose(g, W). ONNX Runtime's CPU
ConvTranspose is a GEMM plus col2im per group, while its Conv runs in the blocked NCHWc layout:
measured on single ops (2 threads), the ConvTranspose is 1.4x slower for 1x1 and 3x3 convolutions
and 5-10x slower for depthwise ones. With stride 1 the adjoint is itself a convolution:

    dX = Conv(g, W'),  W' = per-group transpose of W ([C, M/G, *k]) flipped on every spatial axis,
    pads begin = d(k-1) - pad_begin, end = d(k-1) - pad_end  (then dX has exactly X's size).

W' is computed in the graph from W (Reshape/Transpose/Slice), so the file does not grow and a
weight that is not a constant (DequantizeLinear's output, a graph input) works too; for an
initializer, ONNX Runtime folds those nodes once when the session is created.

Strided convolutions: zero-inserting g (g[o] at o*s, zeros between) turns the adjoint into a
stride-1 convolution again, with s^prod more positions. For depthwise kernels that are large
against the stride (5x5/s2) that is faster than the grouped ConvTranspose (measured 1.6-2.8x on
EfficientNet-Lite0's 5x5/s2 layers); the zero insertion is itself a ConvTranspose with a 1x1 kernel
of ones, which ONNX Runtime runs as a plain scatter. For the rest (full 3x3/s2 and 7x7/s2
convolutions, 1x1/s2, depthwise 3x3/s2) the ConvTranspose stayed as fast or faster than every
alternative measured (polyphase sub-kernels interleaved by DepthToSpace: 1.5-5x slower, because
ONNX Runtime's DepthToSpace and Concat interleaving cost more than the convolution), so
`conv_as_conv` returns None and the caller emits the ConvTranspose.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
from onnx import helper

INT64_MIN = np.iinfo(np.int64).min



def _zero_insertion_pays(kernel, strides) -> bool:
    """Measured on 2-D depthwise layers: 5x5/s2 pays (1.6-2.8x), 3x3/s2 is about even (the
    zero-inserted grid costs as much as the ConvTranspose saves). So: k >= 2s + 1 on every
    strided axis."""
    return all(s == 1 or k >= 2 * s + 1 for k, s in zip(kernel, strides))


def conv_as_conv(ctx, g: str, w: str, x: str, y: str, kernel: List[int], strides: List[int],
                 dilations: List[int], group: int, begins: Sequence, ends: Sequence) -> Optional[str]:
    """dX as a stride-1 Conv (after zero insertion for large strided depthwise kernels), or None
    when this form does not apply or does not pay: unknown weight shape, pads larger than the
    kernel's span, strided convolutions other than large depthwise ones."""
    e = ctx.emit
    w_shape = e.info(w).shape
    if w_shape is None or len(w_shape) != 2 + len(kernel) or not all(isinstance(d, int) and d > 0 for d in w_shape):
        return None
    if list(w_shape[2:]) != list(kernel) or w_shape[0] % group:
        return None
    if not all(isinstance(p, int) for p in list(begins) + list(ends)):
        return None
    spans = [dilations[i] * (kernel[i] - 1) for i in range(len(kernel))]
    if any(not 0 <= begins[i] <= spans[i] for i in range(len(kernel))):
        return None  # a pad wider than the kernel's reach: a crop a Conv's pads cannot express
    if all(s == 1 for s in strides):
        if any(not 0 <= ends[i] <= spans[i] for i in range(len(kernel))):
            return None
        pads = [spans[i] - begins[i] for i in range(len(kernel))] + [spans[i] - ends[i] for i in range(len(kernel))]
        return _adjoint_conv(ctx, g, w, w_shape, group, dilations, pads)
    if w_shape[1] == 1 and _zero_insertion_pays(kernel, strides):
        return _zero_inserted_depthwise(ctx, g, w, w_shape, x, y, kernel, strides, dilations, group, begins, spans)
    return None


def adjoint_weight(ctx, w: str, w_shape: Sequence[int], group: int) -> str:
    """W [M, C/G, *k] -> W' [C, M/G, *k]: each group's [M/G, C/G] block transposed, every spatial
    axis reversed. A Reshape is enough when either block side is 1 (depthwise)."""
    e = ctx.emit
    m, c_per_group = w_shape[0], w_shape[1]
    kernel = list(w_shape[2:])
    m_per_group = m // group
    target = [c_per_group * group, m_per_group] + kernel
    if m_per_group == 1 or c_per_group == 1:
        wt = w if list(w_shape) == target else e.op("Reshape", w, e.ints(target))
    elif group == 1:
        wt = e.op("Transpose", w, perm=[1, 0] + list(range(2, 2 + len(kernel))))
    else:
        blocks = e.op("Reshape", w, e.ints([group, m_per_group, c_per_group] + kernel))
        swapped = e.op("Transpose", blocks, perm=[0, 2, 1] + list(range(3, 3 + len(kernel))))
        wt = e.op("Reshape", swapped, e.ints(target))
    n_sp = len(kernel)
    flipped = e.slice(wt, [-1] * n_sp, [INT64_MIN] * n_sp, list(range(2, 2 + n_sp)), [-1] * n_sp)
    return e.set_info(flipped, e.dtype(w), target)


def _adjoint_conv(ctx, g, w, w_shape, group, dilations, pads):
    e = ctx.emit
    kernel = list(w_shape[2:])
    return e.op("Conv", g, adjoint_weight(ctx, w, w_shape, group), group=group, kernel_shape=kernel,
                dilations=list(dilations), strides=[1] * len(kernel), pads=list(pads))


def _zero_inserted_depthwise(ctx, g, w, w_shape, x, y, kernel, strides, dilations, group, begins, spans):
    """g[o] placed at o*s of a zero grid of length L = min(Ho*s, H + pad_begin) (a depthwise
    ConvTranspose with a 1x1 kernel of ones and output_padding L - (Ho-1)*s - 1 < s), then the
    stride-1 adjoint: pads begin d(k-1) - pad_begin, end H + pad_begin - L."""
    e = ctx.emit
    n_sp = len(kernel)
    in_sizes, out_sizes = (list((e.info(t).shape or [None] * (2 + n_sp))[2:]) for t in (x, y))
    if not all(isinstance(v, int) and v >= 0 for v in in_sizes + out_sizes):
        return None  # dynamic sizes: output_padding and the end pads would be run-time values
    lengths = [min(out_sizes[i] * strides[i], in_sizes[i] + begins[i]) for i in range(n_sp)]
    output_padding = [lengths[i] - (out_sizes[i] - 1) * strides[i] - 1 for i in range(n_sp)]
    end_pads = [in_sizes[i] + begins[i] - lengths[i] for i in range(n_sp)]
    if any(p < 0 for p in output_padding + end_pads):
        return None
    channels = w_shape[0]
    ones = e.const(np.ones([channels, 1] + [1] * n_sp), e.dtype(g))
    spread = e.op("ConvTranspose", g, ones, group=channels, strides=list(strides), kernel_shape=[1] * n_sp,
                  output_padding=output_padding)
    pads = [spans[i] - begins[i] for i in range(n_sp)] + end_pads
    return _adjoint_conv(ctx, spread, w, w_shape, group, dilations, pads)


def crop_by_pads(ctx, g: str, axes: Sequence[int], begins: Sequence[int], ends: Sequence[int]) -> Optional[str]:
    """g[..., b:-e, ...] computed by g's own producer when that is a node emitted here whose pads
    can absorb the crop: a stride-1 Conv (smaller pads make a shorter output, starting later) or a
    ConvTranspose (larger pads crop more). The Pad before a convolution (TF-style "same" exports
    pad explicitly) then costs no Slice in the backward pass. A new node is emitted; the original
    stays for any other reader (and is pruned when none is left). None when not applicable."""
    e = ctx.emit
    producer = next((n for n in reversed(e.nodes) if g in n.output), None)
    if producer is None or producer.op_type not in ("Conv", "ConvTranspose"):
        return None
    attrs = {a.name: a for a in producer.attribute}
    if "pads" not in attrs or "output_shape" in attrs or attrs.get("auto_pad") and attrs["auto_pad"].s not in (b"", b"NOTSET"):
        return None
    pads = list(attrs["pads"].ints)
    n_sp = len(pads) // 2
    if any(not 2 <= a < 2 + n_sp for a in axes):
        return None
    sign = -1 if producer.op_type == "Conv" else 1
    if producer.op_type == "Conv" and any(s != 1 for s in (attrs["strides"].ints if "strides" in attrs else [])):
        return None
    for a, b, end in zip(axes, begins, ends):
        pads[a - 2] += sign * b
        pads[n_sp + a - 2] += sign * end
    if any(p < 0 for p in pads):
        return None
    kwargs = {name: helper.get_attribute_value(a) for name, a in attrs.items() if name != "pads"}
    return e.op(producer.op_type, *producer.input, pads=pads, **kwargs)

