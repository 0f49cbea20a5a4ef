"""The embedding target: cosine similarity of the embedding to a reference."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from ...errors import UsageError
from .base import Target, TargetInput, filled, target

REFERENCE_INPUT = "onnxcam_reference"


@target("embedding")
def embedding(t: TargetInput, reference=None, eps=1e-8):
    """Cosine similarity of the embedding e [N, D] to a reference r: the graph input
    `onnxcam_reference` [N or 1, D] (required: it has no automatic value), or, with the option
    `reference`, that vector baked into the model as a constant (no input).
    cos = e.r / (|e| |r|), seed = d cos / d e = r / (|e| |r|) - cos * e / |e|^2.
    As torch.nn.functional.cosine_similarity, |e||r| is clamped below by `eps`. Class: -1."""
    emit, out, score_tensor = t.emit, t.out, t.score
    dtype, dims = t.dtype, emit.dims(score_tensor)
    if len(dims) < 2:
        raise UsageError(f"output {out!r} has shape {emit.info(out).shape}; the embedding target needs [N, D]")
    e = score_tensor if len(dims) == 2 else emit.op("Flatten", score_tensor, axis=1)
    size = emit.d_prod(dims[1:])
    d_static = size if isinstance(size, int) else None
    if reference is None:
        t.proto.graph.input.append(helper.make_tensor_value_info(REFERENCE_INPUT, TensorProto.FLOAT,
                                                                 ["onnxcam_reference_n", d_static]))
        emit.set_info(REFERENCE_INPUT, TensorProto.FLOAT, (None, d_static))
        r = REFERENCE_INPUT
    else:
        default = np.asarray(reference, np.float32)
        r = emit.const(default.reshape(-1, default.shape[-1]), TensorProto.FLOAT)
        emit.set_info(r, TensorProto.FLOAT, (None, d_static))
    r = r if dtype == TensorProto.FLOAT else emit.cast(r, dtype)
    ee = emit.reduce("ReduceSum", emit.op("Mul", e, e), [1], keepdims=True)  # [N, 1]
    rr = emit.reduce("ReduceSum", emit.op("Mul", r, r), [1], keepdims=True)
    dot = emit.reduce("ReduceSum", emit.op("Mul", e, r), [1], keepdims=True)
    inverse = emit.op("Reciprocal", emit.op("Sqrt", emit.op("Max", emit.op("Mul", ee, rr), emit.scalar(eps * eps, e))))
    cos = emit.op("Mul", dot, inverse)
    seed = emit.op("Sub", emit.op("Mul", r, inverse), emit.op("Div", emit.op("Mul", cos, e), ee))
    if len(dims) != 2:
        seed = emit.op("Reshape", seed, emit.shape_of_tensor_or_dims(score_tensor))

    def at(b, view):
        """The cosine and its seed for other evaluations view [k, N, ...] (sampled methods)."""
        v = view if len(dims) == 2 else b.op("Reshape", view, b.op(
            "Concat", b.op("Slice", b.shape(view), b.ints([0]), b.ints([2]), b.ints([0])), b.ints([-1]), axis=0))
        vv = b.reduce("ReduceSum", b.op("Mul", v, v), [2], keepdims=True)  # [k, N, 1]
        v_dot = b.reduce("ReduceSum", b.op("Mul", v, r), [2], keepdims=True)
        v_inverse = b.op("Reciprocal", b.op("Sqrt", b.op("Max", b.op("Mul", vv, rr), b.scalar(eps * eps, v))))
        v_cos = b.op("Mul", v_dot, v_inverse)
        v_seed = b.op("Sub", b.op("Mul", r, v_inverse), b.op("Div", b.op("Mul", v_cos, v), vv))
        return b.op("Reshape", v_seed, b.shape(view)), b.squeeze(v_cos, [2])
    return Target(seed, emit.squeeze(cos, [1]), filled(emit, [dims[0]], -1), at=at)
