"""BlockMNIST (models/blockmnist.py): the committed models' accuracy, and the attribution-share table
re-measured on them through onnxcam.evaluate — it must equal models/blockmnist/shares.json, the
source of the README's table, and keep the paper's finding for input gradients."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest


ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("blockmnist", ROOT / "models" / "blockmnist.py")
blockmnist = importlib.util.module_from_spec(spec)
spec.loader.exec_module(blockmnist)


@pytest.fixture(scope="module")
def held_out():
    return blockmnist.test_set()


def test_data_set_is_built_as_the_paper_describes(held_out):
    images, labels, masks = held_out
    assert images.shape == (400, 1, 56, 28) and set(np.unique(labels)) == {0, 1}
    assert masks.sum(axis=(1, 2)).tolist() == [28 * 28] * 400
    null = blockmnist.null_block()
    for image, mask in zip(images[:, 0], masks):  # the block outside the digit is always the null pattern
        np.testing.assert_array_equal(image[~mask].reshape(28, 28), null)
    top = masks[:, 0, 0]
    assert 0.4 < top.mean() < 0.6  # the digit's position is balanced
    assert abs(labels[top].mean() - labels[~top].mean()) < 0.05  # and says nothing about the label


@pytest.mark.parametrize("name", blockmnist.MODELS)
def test_committed_models_are_accurate(held_out, name):
    images, labels, _ = held_out
    session = ort.InferenceSession(str(blockmnist.model_path(name)), providers=["CPUExecutionProvider"])
    accuracy = (session.run(None, {"input": images})[0].argmax(axis=1) == labels).mean()
    assert accuracy >= 0.97
    recorded = json.loads((blockmnist.OUT_DIR / "training.json").read_text())[name]["clean_accuracy"]
    assert accuracy == pytest.approx(recorded, abs=1e-6)


def test_attribution_shares_reproduce_the_committed_table():
    committed = json.loads((blockmnist.OUT_DIR / "shares.json").read_text())
    # One method per family of the committed table (all 27 take minutes; `python models/blockmnist.py
    # --measure` rewrites the whole table, which the other rows of this check then follow)
    family_heads = ["gradcam", "hirescam", "saliency", "smoothgrad", "eigencam"]
    methods = [m for m in family_heads if m in committed["standard"]]
    measured = blockmnist.measure(methods=methods)
    committed = {model: {k: v for k, v in rows.items() if k == "input gradient" or k.replace(" @input", "") in methods}
                 for model, rows in committed.items()}
    assert measured.keys() == committed.keys()
    for model in committed:
        assert measured[model].keys() == committed[model].keys()
        for attribution, values in committed[model].items():
            for key, value in values.items():
                # 1e-3: the README's three decimals; other CPUs' float rounding may flip a tie at rank k
                assert measured[model][attribution][key] == pytest.approx(value, abs=1e-3), (model, attribution, key)
    # the paper's finding for input gradients: a standard model's put no more mass on the digit than on
    # the null block, a robust model's clearly more
    standard, robust = measured["standard"]["input gradient"], measured["robust"]["input gradient"]
    assert standard["share"] < 0.55 and robust["share"] > standard["share"] + 0.1
    # the same numbers as the torch measurement recorded at training time (autograd vs onnxcam's VJP)
    training = json.loads((blockmnist.OUT_DIR / "training.json").read_text())
    for model in blockmnist.MODELS:
        assert measured[model]["input gradient"]["share"] == pytest.approx(
            training[model]["input_gradient_digit_share_torch"], abs=1e-4)
