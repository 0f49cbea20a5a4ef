"""Tiny image classifiers for the user-facing tests: Conv-Relu-Conv(stride 2)-Relu-GAP-Gemm, built
in milliseconds, with the knobs those tests need (fixed batch, metadata preset, a tensor of its own
with a reserved name, classifier weights of one sign)."""

from __future__ import annotations

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tiny_classifier(classes=5, batch="N", height="H", width="W", preset=None, positive_head=False,
                    rename=None, seed=0) -> onnx.ModelProto:
    """positive_head: every classifier weight > 0, so every cell of the last feature map argues FOR
    every class (its gradient is >= 0 and its activation >= 0 after the Relu): a counterfactual map
    there is exactly zero. rename: {tensor: new name} to give a tensor a name of the model's own."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(np.float32)
    w2 = (rng.standard_normal((8, 8, 3, 3)) * 0.3).astype(np.float32)
    g = (rng.standard_normal((classes, 8)) * 0.6).astype(np.float32)
    if positive_head:
        g = np.abs(g) + 0.05
    names = {n: n for n in ("c1", "r1", "c2", "r2", "gap", "flat", "logits")}
    names.update(rename or {})
    nodes = [helper.make_node("Conv", ["input", "W1"], [names["c1"]], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", [names["c1"]], [names["r1"]], name="relu1"),
             helper.make_node("Conv", [names["r1"], "W2"], [names["c2"]], pads=[1, 1, 1, 1], strides=[2, 2],
                              name="conv2"),
             helper.make_node("Relu", [names["c2"]], [names["r2"]], name="relu2"),
             helper.make_node("GlobalAveragePool", [names["r2"]], [names["gap"]], name="gap"),
             helper.make_node("Flatten", [names["gap"]], [names["flat"]], name="flat"),
             helper.make_node("Gemm", [names["flat"], "G"], [names["logits"]], transB=1, name="fc")]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, height, width])],
        [helper.make_tensor_value_info(names["logits"], TensorProto.FLOAT, [batch, classes])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"), numpy_helper.from_array(g, "G")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    if preset:
        model.metadata_props.add(key="onnxcam.preset", value=preset)
    return model


def save(model, path):
    onnx.save(model, str(path))
    return path


def photo(h=48, w=64, seed=0) -> np.ndarray:
    """A smooth colourful uint8 RGB picture (so maps are not degenerate)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    channels = [127 + 120 * np.sin(xx / (5 + 3 * c) + rng.uniform(0, 6)) * np.cos(yy / (7 + 2 * c)) for c in range(3)]
    return np.clip(np.stack(channels, axis=2), 0, 255).astype(np.uint8)


def write_photo(path, h=48, w=64, seed=0):
    cv2.imwrite(str(path), photo(h, w, seed)[:, :, ::-1])
    return path
