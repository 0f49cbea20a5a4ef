"""Grad-CAM's channel weights without the layer's full gradient, where the graph allows it.

Grad-CAM reads only mean_ij dS/dA_kij. When every consumer of A on the way to the score is a 1x1
convolution Z = Conv(A, W) (group 1, no padding, any stride), that mean needs no gradient at A:
the adjoint of such a convolution places W^T dS/dZ at the input positions the outputs read, so

    sum_ij dS/dA_kij = sum_m W[m, k] sum_ij' dS/dZ_mij'      (summed over every such consumer)

exactly. The backward pass can then stop at the convolutions' outputs, and the two adjoint
convolutions, the largest part of it, become one ReduceSum and a [N, M] x [M, C] MatMul each.
This is the usual place of a Grad-CAM layer between stages: ResNet-50's layer3 feeds layer4's
first 1x1 conv and its 1x1/s2 downsample, a quarter of layer4's multiply-adds (measured, interleaved: Grad-CAM
at layer3 1.22x -> 1.19x plain inference at batch 1, 1.30x -> 1.26x at batch 8).

Only when every method that reads layer gradients declares that it reads their spatial mean
(Needs.gradient_mean) and the same pass does not differentiate the image input anyway.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Set, Tuple

from onnx import TensorProto


Consumer = Tuple[str, str]  # (the convolution's output Z, its weight W)


def one_by_one_consumers(analysis, emit, layer: str, feeding: Set[str]) -> Optional[List[Consumer]]:
    """The 1x1 convolutions through which `layer` reaches the score (`feeding`: the tensors the
    score depends on), or None when some other op on the way reads it (then its full gradient is
    needed)."""
    if emit.rank(layer) != 4:
        return None
    found: List[Consumer] = []
    for node in analysis.consumers.get(layer, []):
        if not any(out in feeding for out in node.output):
            continue  # off the score's path: no gradient comes back through it
        if not _is_plain_1x1(node, layer, emit):
            return None
        found.append((node.output[0], node.input[1]))
    return found or None


def _is_plain_1x1(node, layer: str, emit) -> bool:
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or node.input[0] != layer:
        return False
    if layer in list(node.input)[1:]:
        return False
    attrs = {a.name: a for a in node.attribute}
    if "group" in attrs and attrs["group"].i != 1:
        return False
    if "pads" in attrs and any(attrs["pads"].ints):
        return False  # a 1x1 kernel with explicit padding reads zeros outside A
    w_shape = emit.info(node.input[1]).shape if emit.info(node.input[1]) is not None else None
    if w_shape is None or len(w_shape) != 4 or not all(isinstance(d, int) for d in w_shape):
        return False
    return w_shape[2] == 1 and w_shape[3] == 1  # auto_pad SAME/VALID pads nothing for 1x1 kernels


def mean_gradient(emit, layer: str, consumers: Sequence[Consumer], gradients: Dict[str, str]) -> str:
    """mean_ij dS/dA as float32 [N, C, 1, 1] from dS/dZ at the consumers' outputs."""
    parts = []
    for z, w in consumers:
        if z not in gradients:
            continue
        summed = emit.reduce("ReduceSum", emit.as_float32(gradients[z]), [2, 3], keepdims=False)  # [N, M]
        m, c = emit.info(w).shape[:2]
        matrix = emit.op("Reshape", emit.as_float32(w), emit.ints([m, c]))
        parts.append(emit.op("MatMul", summed, matrix))  # [N, C]
    total = parts[0] if len(parts) == 1 else emit.op("Sum", *parts)
    h, w_ = emit.dims(layer)[2:]
    mean = emit.op("Div", total, emit.d_to_float(emit.d_mul(h, w_), total))
    shape = emit.info(layer).shape
    return emit.set_info(emit.unsqueeze(mean, [2, 3]), TensorProto.FLOAT, (shape[0], shape[1], 1, 1))
