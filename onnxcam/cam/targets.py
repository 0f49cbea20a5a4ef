"""Score definitions: what is differentiated, built in the graph.

A target builder returns the seed (the cotangent of the score tensor: the gradient of the
scalar score per image with respect to that tensor), the explained score per image and the
explained class per image, plus any extra outputs (selected boxes...). Builders are small
functions registered by name, like CAM methods; the augmenter owns the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Tuple

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ..errors import UsageError

CLASS_INPUT = "onnxcam_class"
TARGETS: Dict[str, Callable] = {}


@dataclass
class Target:
    seed: str  # cotangent of the score tensor, same shape and type
    score: str  # float [N]: the explained score per image
    class_index: str  # int64 [N]
    extra_outputs: Dict[str, Tuple[str, int, tuple]] = field(default_factory=dict)  # name -> (tensor, dtype, shape)


def target(name):
    def register(fn):
        TARGETS[name] = fn
        return fn
    return register


def add_optional_input(proto, emit, name, default: np.ndarray, shape, dtype=TensorProto.INT64) -> str:
    """A graph input with an initializer of the same name: optional, `default` when omitted."""
    proto.graph.input.append(helper.make_tensor_value_info(name, dtype, list(shape)))
    proto.graph.initializer.append(numpy_helper.from_array(default, name))
    emit.set_info(name, dtype, shape)
    return name


def class_choice(proto, emit, scores_2d: str, batch) -> str:
    """int64 [N]: the `onnxcam_class` input where >= 0, else the arg-max of `scores_2d` [N, K]."""
    add_optional_input(proto, emit, CLASS_INPUT, np.array([-1], np.int64), [batch])
    top = emit.op("ArgMax", scores_2d, axis=1, keepdims=0)
    return emit.op("Where", emit.op("Less", CLASS_INPUT, emit.ints([0])), top, CLASS_INPUT)


def one_hot(emit, index: str, depth, dtype: int) -> str:
    """[N, depth] one-hot of int64 [N] indices (Equal against a Range: no OneHot/scatter)."""
    depth_t = (emit.const(np.array(depth, np.int64), TensorProto.INT64) if isinstance(depth, int)
               else emit.op("Squeeze", depth))
    classes = emit.op("Range", emit.const(np.array(0, np.int64), TensorProto.INT64), depth_t,
                      emit.const(np.array(1, np.int64), TensorProto.INT64))
    return emit.cast(emit.op("Equal", emit.unsqueeze(index, [1]), emit.unsqueeze(classes, [0])), dtype)


@target("class")
def classifier(proto, emit, out, score_tensor, image, **options):
    """The logit (or probability) of one class per image; the output is [N, classes]."""
    if emit.rank(out) != 2:
        raise UsageError(f"output {out!r} has rank {emit.rank(out)}; the class target needs a [N, classes] "
                         "output (use --target detection/segmentation/sequence for other heads)")
    class_index = class_choice(proto, emit, out, image.shape[0] if image.shape[0] is not None else "N")
    seed = one_hot(emit, class_index, emit.dims(out)[1], emit.dtype(score_tensor))
    product = emit.op("Mul", seed, out if score_tensor == out else emit.op(
        "Reshape", score_tensor, emit.shape_of_tensor_or_dims(out)))
    score = emit.reduce("ReduceSum", product, [1], keepdims=False)
    if emit.info(score_tensor).shape != emit.info(out).shape:  # logits behind a Flatten/Reshape
        seed = emit.op("Reshape", seed, emit.shape_of_tensor_or_dims(score_tensor))
    return Target(seed, score, class_index)
