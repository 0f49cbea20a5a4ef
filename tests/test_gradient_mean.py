"""Grad-CAM's weights through a layer's 1x1 convolutions (cam/gradient_mean.py), against torch.

The shortcut replaces the gradient at the layer by its spatial mean summed from the 1x1
convolutions' output gradients; the maps must equal pytorch-grad-cam's formula on torch's own
gradients, and equal the full-gradient path onnxcam takes when another method needs all of G."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import onnxcam
from cam_reference import activations_and_gradients, reference_cam
from torch_nets import export, randomise_batchnorm

SIZE = 40  # odd sizes after the stride-2 stem (20 -> the 1x1/s2 downsample reads every other row of 20)


class Bottleneck(nn.Module):
    """The layer A = relu(stem) feeds only 1x1 convolutions: a 1x1 reduce and a 1x1/s2 downsample."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, 2, 1), nn.BatchNorm2d(12), nn.ReLU())
        self.reduce = nn.Sequential(nn.Conv2d(12, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.spatial = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(8, 24, 1), nn.BatchNorm2d(24))
        self.down = nn.Sequential(nn.Conv2d(12, 24, 1, 2), nn.BatchNorm2d(24))
        self.relu = nn.ReLU()
        self.fc = nn.Linear(24, 7)

    def forward(self, x):
        a = self.stem(x)
        y = self.relu(self.expand(self.spatial(self.reduce(a))) + self.down(a))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


@pytest.fixture(scope="module")
def bottleneck(tmp_path_factory):
    torch.manual_seed(3)
    model = randomise_batchnorm(Bottleneck())
    path = export(model, tmp_path_factory.mktemp("bottleneck") / "bottleneck.onnx", SIZE)
    layer = [l.name for l in onnxcam.layers(path) if l.name.startswith("/stem/") and l.op == "Relu"][-1]
    return model, path, layer


def images(n):
    return np.random.default_rng(0).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


def reads_weight_of_1x1(augmented, original) -> list:
    """Added Conv/ConvTranspose nodes reading a 1x1 weight: the adjoints the shortcut removes."""
    weights = {n.input[1] for n in original.graph.node if n.op_type == "Conv"
               and [a for a in n.attribute if a.name == "kernel_shape"][0].ints == [1, 1]}
    added = augmented.graph.node[len(original.graph.node):]
    return [n.name for n in added if n.op_type in ("Conv", "ConvTranspose") and set(n.input) & weights]


def test_gradcam_through_1x1_convolutions_matches_torch(bottleneck):
    model, path, layer = bottleneck
    original = onnx.load(path)
    augmented = onnxcam.augment(path, layer=layer, method="gradcam")
    assert reads_weight_of_1x1(augmented, original) == [], "the shortcut was not taken"
    conv_outputs = {n.output[0] for n in original.graph.node if n.op_type == "Conv"}
    added = augmented.graph.node[len(original.graph.node):]
    assert not [n.name for n in added if conv_outputs & set(n.input)], "an added node reads a Conv output"

    x = images(3)
    result = onnxcam.Explainer(path, layer=layer, method="gradcam")(x)
    pairs, classes, _ = activations_and_gradients(model, [model.stem[2]], x, None, None)
    expected = reference_cam("gradcam", pairs, (SIZE, SIZE))
    np.testing.assert_array_equal(result.class_index, classes)
    assert np.abs(result.cam - expected).max() <= 1e-4 * np.abs(expected).max()


def test_gradcam_equals_the_full_gradient_path(bottleneck):
    """With Grad-CAM++ in the same model the full gradient at the layer is built; Grad-CAM's map
    from it equals the shortcut's, and a method that needs all of G disables the shortcut."""
    _, path, layer = bottleneck
    original = onnx.load(path)
    both = onnxcam.augment(path, layer=layer, method=["gradcam", "gradcam++"])
    assert reads_weight_of_1x1(both, original), "Grad-CAM++ needs the full gradient at the layer"
    x = images(4)
    alone = onnxcam.Explainer(path, layer=layer, method="gradcam")(x).cam
    full = onnxcam.Explainer(path, layer=layer, method=["gradcam", "gradcam++"])(x).cams["gradcam"]
    assert np.abs(alone).max() > 0.5
    assert np.abs(alone - full).max() <= 1e-5


def test_guided_gradcam_with_the_shortcut_equals_without(bottleneck):
    """Guided Grad-CAM reads Grad-CAM's weights (standard pass: the shortcut) and the guided input
    gradient (its own pass, through the 1x1 convolutions as always)."""
    _, path, layer = bottleneck
    x = images(2)
    short = onnxcam.Explainer(path, layer=layer, method="guided-gradcam")(x).cam
    full = onnxcam.Explainer(path, layer=layer, method=["guided-gradcam", "gradcam++"])(x).cams["guided-gradcam"]
    assert np.abs(full).max() > 0.5
    assert np.abs(short - full).max() <= 1e-5


def test_fp16_export_takes_the_shortcut_in_float32(bottleneck, tmp_path):
    """A half-precision export: the 1x1 weights are widened for the MatMul, and the map matches
    both the float32 twin and the full-gradient path of the same fp16 model."""
    model, path32, layer = bottleneck
    half = Bottleneck().eval()
    half.load_state_dict(model.state_dict())
    half = half.half()
    path16 = str(tmp_path / "bottleneck16.onnx")
    torch.onnx.export(half, torch.randn(2, 3, SIZE, SIZE).half(), path16, opset_version=13, input_names=["input"],
                      output_names=["output"], dynamic_axes={"input": {0: "N"}, "output": {0: "N"}}, dynamo=False)
    proto = onnx.load(path16)
    proto.ir_version = min(proto.ir_version, 8)
    onnx.save(proto, path16)
    assert reads_weight_of_1x1(onnxcam.augment(path16, layer=layer, method="gradcam"), proto) == []
    x = images(2)
    short = onnxcam.Explainer(path16, layer=layer, method="gradcam")(x.astype(np.float16))
    full = onnxcam.Explainer(path16, layer=layer, method=["gradcam", "gradcam++"])(x.astype(np.float16))
    twin = onnxcam.Explainer(path32, layer=layer, method="gradcam")(x)
    assert short.cam.dtype == np.float32 and np.abs(short.cam).max() > 0.5
    np.testing.assert_array_equal(short.class_index, twin.class_index)
    assert np.abs(short.cam - full.cams["gradcam"]).max() <= 1e-5
    assert np.abs(short.cam - twin.cam).max() <= 2e-2
