"""Transformer targets: token activations reshaped to a grid in-graph, automatic norm choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import onnxcam
from cam_reference import activations_and_gradients, reference_cam
from torch_nets import TinyViT, export


def vit_reshape(a, h=8, w=8):
    return a[:, 1:, :].reshape(a.shape[0], h, w, a.shape[2]).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("opset", [13, 17])  # decomposed LayerNorm and Erf-GELU / LayerNormalization op
@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam"])
def test_vit_cam_matches_reference_with_reshape_transform(tmp_path, opset, method):
    torch.manual_seed(0)
    model = TinyViT().eval()
    path = export(model, tmp_path / "vit.onnx", 64, opset=opset)
    auto = [l for l in onnxcam.layers(path) if l.auto]
    assert len(auto) == 1 and auto[0].shape[1:] == (65, 32)
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    result = onnxcam.Explainer(path, method=method)(x)
    pairs, classes, _ = activations_and_gradients(model, [model.blocks[-1].norm1], x, None)
    pairs = [(vit_reshape(a), vit_reshape(g)) for a, g in pairs]
    np.testing.assert_array_equal(result.class_index, classes)
    assert np.max(np.abs(result.cam - reference_cam(method, pairs, (64, 64)))) <= 1e-3


def test_token_grid_inference():
    from onnxcam.cam.spatial import token_grid
    assert token_grid(197, 224, 224) == (1, 14, 14)
    assert token_grid(198, 224, 224) == (2, 14, 14)  # DeiT: class + distillation tokens
    assert token_grid(49, 224, 224) == (0, 7, 7)  # Swin's last stage
    assert token_grid(1 + 12 * 24, 192, 384) == (1, 12, 24)
    assert token_grid(50, 13, 13) is None


def swin_reshape(a, h=8, w=8):
    return a.reshape(a.shape[0], h, w, a.shape[2]).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("opset", [13, 17])
def test_swin_style_windowed_block(tmp_path, opset):
    from torch_nets import TinySwin
    torch.manual_seed(3)
    model = TinySwin().eval()
    path = export(model, tmp_path / "swin.onnx", 64, opset=opset)
    auto = [l for l in onnxcam.layers(path) if l.auto]
    assert len(auto) == 1 and auto[0].shape[1:] == (64, 32)  # no class token: an 8x8 grid
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    result = onnxcam.Explainer(path)(x)
    pairs, classes, _ = activations_and_gradients(model, [model.blocks[-1].norm1], x, None)
    pairs = [(swin_reshape(a), swin_reshape(g)) for a, g in pairs]
    np.testing.assert_array_equal(result.class_index, classes)
    assert np.max(np.abs(result.cam - reference_cam("gradcam", pairs, (64, 64)))) <= 1e-3
