"""`onnxcam.evaluate(...)` and `onnxcam evaluate`: maps from the Explainer by method name (any method
it accepts), maps from outside, sanity checks and class sensitivity with known answers, the files
written, and one-line errors for bad requests."""

from __future__ import annotations

import json

import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnxcam
from onnxcam.cam.plan import plan
from evaluate_models import SIZE, positive_images, region_masks, region_model
from onnxcam.cli import main
from onnxcam.errors import UsageError
from onnxcam.evaluate import sanity
from onnxcam.evaluate.maps import MapSource
from onnxcam.evaluate.scoring import ScoreModel

MASKS = region_masks()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("evaluate") / "region.onnx"
    onnx.save(region_model(MASKS), str(path))
    return path


def test_every_explainer_method_is_evaluated_by_name(model_path):
    methods = list(onnxcam.METHODS)  # only to enumerate them: evaluation itself passes names on
    x = positive_images(2)
    result = onnxcam.evaluate(model_path, x, methods=methods, metrics=["deletion", "confidence"], steps=8,
                              class_index=0, score="logit")
    assert len(methods) >= 6 and [r["method"] for r in result.records] == [m for m in methods for _ in range(2)]
    for record in result.records:
        assert np.isfinite(record["deletion_auc"]) and len(record["deletion_curve"]) == 9
        # a layer is named exactly when the method reads one (input-space methods read the input)
        assert bool(record["layer"]) == plan([record["method"]]).needs_layers and record["class_index"] == 0


def test_explainer_maps_and_outside_maps_agree(model_path):
    """HiResCAM's map of this model is mask_0 * x: the same map given as an array scores the same."""
    x = positive_images(3)
    by_hand = MASKS[0] * x[:, 0]
    by_hand = (by_hand - by_hand.min(axis=(1, 2), keepdims=True)) / by_hand.max(axis=(1, 2), keepdims=True)
    result = onnxcam.evaluate(model_path, x, methods="hirescam", maps={"hand": by_hand.astype(np.float32)},
                              metrics=["deletion", "insertion", "road", "confidence"], class_index=0, steps=10)
    ours = [r for r in result.records if r["method"] == "hirescam"]
    theirs = [r for r in result.records if r["method"] == "hand"]
    for a, b in zip(ours, theirs):
        for key in ("deletion_auc", "insertion_auc", "road_morf", "road_lerf", "drop_in_confidence"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_ground_truth_metrics_with_masks(model_path):
    x = positive_images(2)
    truth = np.repeat(MASKS[:1].astype(bool), 2, axis=0)
    result = onnxcam.evaluate(model_path, x, methods="hirescam", metrics=["pointing"], masks=truth, class_index=0)
    for record in result.records:  # the map lives inside region 0 only
        assert record["pointing_game"] == 1.0
        assert record["energy_pointing_game"] == pytest.approx(1.0)
    wrong = onnxcam.evaluate(model_path, x, methods="hirescam", metrics=["pointing"], masks=~truth, class_index=0)
    assert all(r["energy_pointing_game"] == pytest.approx(0.0, abs=1e-6) for r in wrong.records)


def test_class_sensitivity_of_disjoint_regions(model_path):
    """Class 0's map is on region 0, class 1's on region 1 (least likely: the smaller sum)."""
    x = positive_images(2)
    result = onnxcam.evaluate(model_path, x, methods="hirescam", metrics=["class_sensitivity"])
    scores = ScoreModel(model_path, score="logit").class_scores(x)
    for i, record in enumerate(result.records):
        top, least = scores[i].argmax(), scores[i].argmin()
        a, b = MASKS[top] * x[i, 0], MASKS[least] * x[i, 0]
        assert record["class_sensitivity_pearson"] == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-4)
        assert record["class_sensitivity_pearson"] < 0


def test_sanity_randomises_top_down_and_only_weights():
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    import io

    buffer = io.BytesIO()
    torch.onnx.export(net, (torch.zeros(1, 3, 16, 16),), buffer, opset_version=13, dynamo=False,
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "N"}},
                      do_constant_folding=False)
    proto = onnx.load_from_string(buffer.getvalue())
    proto.ir_version = 8
    layers = sanity.weight_layers(proto)
    assert [n.op_type for n in layers] == ["Gemm", "Conv", "BatchNormalization", "Conv"]
    # torch shares BatchNorm's all-ones scale with its running variance (an Identity): only the
    # scale may be re-drawn, or the variance turns negative and the network NaN
    assert any(n.op_type == "Identity" and n.input[0] == layers[2].input[1] for n in proto.graph.node)
    copy = sanity.randomised_copy(proto, layers[:3], np.random.default_rng(0))
    values = {t.name: onnx.numpy_helper.to_array(t) for t in copy.graph.initializer}

    def weights(model, op):
        node = next(n for n in model.graph.node if n.op_type == op)
        return [values.get(name) for name in node.input[1:3]]

    original = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    for op in ("Gemm", "BatchNormalization"):
        node = next(n for n in proto.graph.node if n.op_type == op)
        for name, fresh in zip(node.input[1:3], weights(copy, op)):
            assert fresh is not None and not np.array_equal(fresh, original[name]), (op, name)
    first_conv = next(n for n in copy.graph.node if n.op_type == "Conv")
    assert all(np.array_equal(values[name], original[name]) for name in first_conv.input[1:3])
    variance = next(n for n in copy.graph.node if n.op_type == "Identity" and n.output[0].endswith("running_var"))
    assert np.array_equal(values[variance.input[0]], original[variance.input[0]])

    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    source = MapSource(proto, layer="auto")
    original, classes = source.maps("gradcam", x)
    assert original.std() > 0
    result = sanity.cascading_randomisation(source, "gradcam", x, original, classes)
    assert [s.stage for s in result.stages] == [1, 2, 3, 4]
    rho = np.array([s.spearman for s in result.stages])
    similarity = np.array([s.ssim for s in result.stages])
    assert np.all(np.isfinite(similarity)), similarity  # every stage computes (no NaN network)
    assert np.isfinite(rho[0]).all() and np.all(rho[np.isfinite(rho)] < 0.99)


def test_cli_writes_table_files_and_plots(model_path, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        cv2.imwrite(str(photos / f"{name}.png"), rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    (tmp_path / "boxes.json").write_text(json.dumps({"a": [[1, 2, 7, 6]], "b.png": [[8, 9, 13, 14]]}))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["evaluate", str(model_path), str(photos), "--method", "hirescam,gradcam",
                                       "--steps", "8", "--preset", "unit", "--sanity-stages", "1",
                                       "--boxes", str(tmp_path / "boxes.json"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "hirescam" in result.output and "deletion" in result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4
    assert {"deletion_auc", "insertion_auc", "road_combined", "relative_drop", "pointing_game",
            "localisation_iou", "sanity_stages"} <= set(records[0])
    assert (out / "metrics.csv").read_text().count("\n") == 5
    for png in ("curves_hirescam.png", "curves_gradcam.png", "metrics.png"):
        assert cv2.imread(str(out / png)) is not None


@pytest.mark.parametrize("args, message", [
    (["--metrics", "pointing"], "need ground truth"),
    (["--metrics", "wobble"], "unknown metric"),
    (["--method", "nosuchcam"], "nosuchcam"),
    (["--steps", "0"], "--steps"),
    (["--wsol-fraction", "1.5"], "localisation threshold"),
    (["--road-noise", "-1"], "ROAD noise"),
    (["--sanity-stages", "-2"], "--sanity-stages"),
])
def test_cli_bad_requests_are_one_line_errors(model_path, tmp_path, args, message):
    photo = tmp_path / "p.png"
    cv2.imwrite(str(photo), np.zeros((SIZE, SIZE, 3), np.uint8))
    result = CliRunner().invoke(main, ["evaluate", str(model_path), str(photo), "-o", str(tmp_path / "o")] + args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()  # no empty output folder left behind


def test_outside_maps_of_the_wrong_shape(model_path):
    with pytest.raises(UsageError, match=r"\[2, 16, 16\]"):
        onnxcam.evaluate(model_path, positive_images(2), methods=[], maps={"m": np.zeros((2, 8, 8))},
                         metrics=["deletion"])


def test_custom_score_for_other_targets(model_path):
    """Targets other than a class pass score_fn(outputs, classes): here, region 1's sum whatever the class."""
    x = positive_images(2)
    region_one = onnxcam.evaluate(model_path, x, methods="hirescam", metrics=["deletion"], steps=4,
                                  score_fn=lambda outputs, classes: outputs["logits"][:, 1])
    expected = (x[:, 0] * MASKS[1]).sum(axis=(1, 2))
    for record, first in zip(region_one.records, expected):
        assert record["deletion_curve"][0] == pytest.approx(first, rel=1e-5)
        assert record["deletion_curve"][-1] == pytest.approx(0.0, abs=1e-5)


def test_cli_masks_folder(model_path, tmp_path):
    """Mask images with the photo's stem; the map of class 0 lies in region 0 only (unit preset: x > 0)."""
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    photos.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(1)
    cv2.imwrite(str(photos / "p.png"), rng.integers(60, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    cv2.imwrite(str(masks / "p.png"), (MASKS[0] * 255).astype(np.uint8))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["evaluate", str(model_path), str(photos), "--method", "hirescam", "--class", "0",
                                       "--metrics", "pointing", "--masks", str(masks), "--preset", "unit",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["pointing_game"] == 1.0 and record["energy_pointing_game"] == pytest.approx(1.0)
    cv2.imwrite(str(masks / "p.png"), np.zeros((SIZE + 1, SIZE), np.uint8))
    result = CliRunner().invoke(main, ["evaluate", str(model_path), str(photos), "--metrics", "pointing",
                                       "--masks", str(masks), "-o", str(tmp_path / "out2")])
    assert result.exit_code == 2 and "mask is 16x17" in result.output
