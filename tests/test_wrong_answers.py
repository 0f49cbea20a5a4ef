"""Cases that used to end in a silently wrong answer with exit 0 (issue: hostile inputs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

import onnxcam
from onnxcam.cli import main
from onnxcam.errors import InputError
from onnxcam.io.labels import labels_for_model
from torch_nets import TinyResNet, randomise_batchnorm


def test_no_imagenet_names_for_models_that_are_not_imagenet():
    assert labels_for_model(None, 1000)[285] == "Egyptian cat"
    assert labels_for_model(None, 1001)[286] == "Egyptian cat"
    for n in (None, 5, 3):  # a dynamic class axis, a 5-class classifier, a segmenter's count
        assert labels_for_model(None, n) is None


class Five(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_a_model_with_a_dynamic_class_axis_gets_no_imagenet_label(tmp_path):
    import cv2
    torch.manual_seed(0)
    path = tmp_path / "five.onnx"
    torch.onnx.export(Five(), torch.randn(1, 3, 32, 32), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}, "y": {0: "N", 1: "K"}}, dynamo=False, opset_version=13)
    cv2.imwrite(str(tmp_path / "a.png"), np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    result = CliRunner().invoke(main, ["explain", str(path), str(tmp_path / "a.png"), "-o", str(tmp_path / "o"),
                                       "--size", "32", "32"])
    assert result.exit_code == 0, result.output
    line = (tmp_path / "o" / "summary.jsonl").read_text()
    assert '"label": ""' in line


def test_feeding_the_image_input_as_an_extra_input_is_refused(tmp_path):
    torch.manual_seed(0)
    from torch_nets import export
    path = export(randomise_batchnorm(TinyResNet()), tmp_path / "r.onnx", 32)
    explainer = onnxcam.Explainer(path)
    x = np.zeros((1, 3, 32, 32), np.float32)
    with pytest.raises(InputError, match="image input 'input'"):
        explainer(x, inputs={"input": x})
