"""Tiny ONNX models whose explanation is known, for the evaluation tests.

`region_model(masks)`: x [N, 1, S, S] -> Conv 1x1 with all-one weights into K channels (the CAM
layer, A_k = x) -> times a constant 0/1 mask per channel -> sum over pixels: logit_k = sum of x
over region k. Everything a metric does to it can be computed by hand: deleting a region pixel
lowers logit_k by exactly that pixel's value, and HiResCAM's map for class k is mask_k * x.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

SIZE = 16


def region_masks(size: int = SIZE):
    """Two disjoint regions: a 4x6 block at the top left and a 5x5 block at the bottom right."""
    first = np.zeros((size, size), np.float32)
    first[2:6, 1:7] = 1
    second = np.zeros((size, size), np.float32)
    second[9:14, 8:13] = 1
    return np.stack([first, second])


def region_model(masks: np.ndarray, opset: int = 13, nhwc: bool = False):
    """nhwc: the model takes [N, S, S, 1] and transposes it first (a TensorFlow-style input)."""
    k, h, w = masks.shape
    first = [helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2], name="to_nchw")] if nhwc else []
    nodes = first + [
        helper.make_node("Conv", ["x_nchw" if nhwc else "x", "w", "b"], ["features"], name="conv"),
        helper.make_node("Mul", ["features", "masks"], ["masked"], name="select"),
        helper.make_node("ReduceSum", ["masked", "axes"], ["logits"], keepdims=0, name="sum"),
    ]
    inits = [numpy_helper.from_array(np.ones((k, 1, 1, 1), np.float32), "w"),
             numpy_helper.from_array(np.zeros(k, np.float32), "b"),
             numpy_helper.from_array(masks[None].astype(np.float32), "masks"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "axes")]
    shape = ["N", h, w, 1] if nhwc else ["N", 1, h, w]
    graph = helper.make_graph(nodes, "region", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def positive_images(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """Strictly positive pixels, so that every region pixel carries score."""
    return np.random.default_rng(seed).uniform(0.5, 1.5, size=(n, 1, size, size)).astype(np.float32)
