"""A CRNN text recogniser (conv stack -> bidirectional LSTM -> Linear -> log-softmax [N, T, C]),
exported by torch, explained end to end with target="sequence": the greedy path, the score and
the Grad-CAM map of the last conv block against the same score differentiated by torch (hooks),
the map formula from cam_reference (pytorch-grad-cam's)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import onnxcam
from cam_reference import reference_cam

CLASSES, HW = 7, (32, 64)


class CRNN(nn.Module):
    """Conv features [N, 32, 8, W/4] -> MaxPool over height -> columns [N, T=W/4, 128] ->
    2-layer bidirectional LSTM -> Linear -> log_softmax: [N, T, classes], blank = 0."""

    def __init__(self, hidden=16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU())
        self.pool = nn.MaxPool2d((2, 1))
        self.rnn = nn.LSTM(32 * 4, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(2 * hidden, CLASSES)

    def logits(self, x):
        f = self.pool(self.features(x))  # [N, 32, 4, T]
        n, c, h, w = f.shape
        columns = f.permute(0, 3, 1, 2).reshape(n, w, c * h)
        return self.fc(self.rnn(columns)[0])

    def forward(self, x):
        return F.log_softmax(self.logits(x), dim=2)


def export(model, path, opset, dynamic_width=False):
    axes = {"input": {0: "N", 3: "W"}, "output": {0: "N", 1: "T"}} if dynamic_width else \
        {"input": {0: "N"}, "output": {0: "N"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.randn(2, 3, *HW), str(path), opset_version=opset, input_names=["input"],
                          output_names=["output"], dynamic_axes=axes, dynamo=False)
    proto = onnx.load(str(path))
    assert sum(n.op_type == "LSTM" for n in proto.graph.node) == 2
    proto.ir_version = min(proto.ir_version, 8)
    onnx.save(proto, str(path))
    return str(path)


def last_conv_relu(path):
    """The ONNX tensor of features.6 (the last ReLU) in the legacy exporter's naming."""
    outputs = [n.output[0] for n in onnx.load(path).graph.node if n.name.startswith("/features/features.6/")]
    assert outputs
    return outputs[-1]


def torch_pairs(model, x, weights):
    """Activation and gradient of the last conv block for sum(weights * logits) (pre-log-softmax)."""
    store = {}
    hook = model.features[6].register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        logits = model.logits(torch.tensor(x))
        store["a"].retain_grad()
        (logits * torch.tensor(weights, dtype=torch.float32)).sum().backward()
    finally:
        hook.remove()
    return [(store["a"].detach().numpy(), store["a"].grad.numpy())], logits.detach().numpy()


def centred_crnn(x):
    torch.manual_seed(2)
    model = CRNN().eval()
    with torch.no_grad():  # centre the untrained classes so the greedy path mixes blanks and symbols
        model.fc.bias -= model.logits(torch.tensor(x)).mean((0, 1))
        model.features[3].running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("opset,step", [(13, None), (17, 6), (11, None)])
def test_crnn_explained_as_a_sequence(tmp_path, opset, step):
    x = np.random.default_rng(21).standard_normal((2, 3, *HW)).astype(np.float32)
    model = centred_crnn(x)
    path = export(model, tmp_path / "crnn.onnx", opset)
    check_explained(path, model, x, step)


def test_crnn_with_a_free_input_width(tmp_path):
    """Exported with a dynamic width, the sequence length is dynamic: one explainer serves two widths."""
    x = np.random.default_rng(22).standard_normal((2, 3, *HW)).astype(np.float32)
    model = centred_crnn(x)
    path = export(model, tmp_path / "crnn_w.onnx", 13, dynamic_width=True)
    explainer = onnxcam.Explainer(path, layer=last_conv_relu(path), target="sequence")
    for width in (64, 96):
        xw = np.random.default_rng(width).standard_normal((2, 3, HW[0], width)).astype(np.float32)
        check_explained(path, model, xw, None, explainer)


def check_explained(path, model, x, step, explainer=None):
    with torch.no_grad():
        k = model.logits(torch.tensor(x)).numpy().argmax(2)
    if step is None:
        weights = np.eye(CLASSES)[k] * (k != 0)[:, :, None]
        assert 0 < (k != 0).sum() < k.size  # some blanks, some symbols
        inputs, classes = {}, [-1, -1]
    else:
        weights = np.zeros((2, k.shape[1], CLASSES))
        weights[np.arange(2), step, k[:, step]] = 1
        inputs, classes = {"onnxcam_step": np.array([step])}, k[:, step]
    explainer = explainer or onnxcam.Explainer(path, layer=last_conv_relu(path), target="sequence")
    result = explainer(x, inputs=inputs)
    pairs, logits = torch_pairs(model, x, weights)
    np.testing.assert_array_equal(result.extras["onnxcam_path"], k)
    np.testing.assert_array_equal(result.class_index, classes)
    np.testing.assert_allclose(result.score, (logits * weights).sum((1, 2)), rtol=1e-5)
    expected = reference_cam("gradcam", pairs, x.shape[2:])  # asserts the reference map is not degenerate
    diff = float(np.max(np.abs(result.cam - expected)))
    print(f"\nCRNN {x.shape} step {step}: max |CAM - reference| = {diff:.2e} (maps scaled to max 1)")
    assert diff <= 1e-4 * float(np.max(expected)), diff
