"""Targets beyond classifiers through the command line: --target, --target-option, --input."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from onnxcam.cli import main, parse_options
from torch_nets import export


class TinySegmenter(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.head = nn.Conv2d(16, classes, 1)

    def forward(self, x):
        return nn.functional.interpolate(self.head(self.enc(x)), scale_factor=4, mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("seg")
    path = export(TinySegmenter().eval(), folder / "seg.onnx", 32)
    photo = (np.random.default_rng(0).uniform(0, 255, (40, 48, 3))).astype(np.uint8)
    cv2.imwrite(str(folder / "photo.png"), photo)
    return folder, path


def test_parse_options_reads_numbers_and_words():
    assert parse_options(["threshold=0.5", "blank=0", "layout=v5", "background=none"]) == \
        {"threshold": 0.5, "blank": 0, "layout": "v5", "background": None}


def test_explain_segmentation_with_a_user_mask(segmenter):
    folder, path = segmenter
    mask = np.zeros((1, 32, 32), np.float32)
    mask[:, 8:24, 8:24] = 1
    np.save(folder / "mask.npy", mask)
    layer = "/enc/enc.3/Relu_output_0"
    result = CliRunner().invoke(main, ["explain", path, str(folder / "photo.png"), "-o", str(folder / "out"),
                                       "--size", "32", "32", "--layer", layer, "--target", "segmentation",
                                       "--class", "1", "--input", f"onnxcam_mask={folder / 'mask.npy'}"])
    assert result.exit_code == 0, result.output
    record = json.loads((folder / "out" / "summary.jsonl").read_text().splitlines()[0])
    assert record["class_index"] == 1 and record["layer"] == layer
    heat = np.load(record["npy"])
    assert heat.shape == (40, 48) and heat.dtype == np.float32 and 0 <= heat.min() and heat.max() <= 1


def test_bad_target_option_is_a_usage_error(segmenter):
    folder, path = segmenter
    result = CliRunner().invoke(main, ["explain", path, str(folder / "photo.png"), "-o", str(folder / "out2"),
                                       "--size", "32", "32", "--layer", "/enc/enc.3/Relu_output_0",
                                       "--target", "segmentation", "--target-option", "colour=red"])
    assert result.exit_code == 2
    assert "target 'segmentation' has no option 'colour'" in result.stderr
