"""Hierarchical transformers and MLP-mixers explained with nothing given: the automatic layer, the
layout (NHWC through 6-D Reshape/Transpose chains) and the token grid (measured, also when the
token count changes with the input size) all found by onnxcam; maps against pytorch-grad-cam's
formula on torch hooks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import onnxcam
from cam_reference import activations_and_gradients, reference_cam, reference_raw_cam
from hier_nets import CaiTLike, LeViTLike, PVTLike, ResMLPLike, SwinNHWC, randomise_norms
from torch_nets import export


def scope(module_path: str) -> str:
    """The legacy exporter's node-name prefix of a module: 'blocks.1.norm1' -> '/blocks/blocks.1/norm1/'."""
    parts = module_path.split(".")
    return "/" + "/".join(".".join(parts[:i + 1]) if parts[i].isdigit() else parts[i]
                          for i in range(len(parts))) + "/"


def in_scope(node_name: str, module_path: str) -> bool:
    """Also modules reached by iterating a ModuleList, named '/stage2.1/norm1/'."""
    flat = []
    for part in module_path.split("."):
        if part.isdigit() and flat:
            flat[-1] += "." + part
        else:
            flat.append(part)
    return node_name.startswith(scope(module_path)) or node_name.startswith("/" + "/".join(flat) + "/")


def module_at(model, path):
    module = model
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def tokens_to_nchw(a, h, w, extra=0):
    return a[:, extra:, :].reshape(a.shape[0], h, w, a.shape[2]).transpose(0, 3, 1, 2)


def nhwc_to_nchw(a):
    return a.transpose(0, 3, 1, 2)


def auto_layer(path):
    auto = [l for l in onnxcam.layers(path) if l.auto]
    assert len(auto) == 1
    return auto[0]


def check_against_reference(model, path, module_path, x, to_nchw, layer="auto"):
    result = onnxcam.Explainer(path, layer=layer)(x)
    pairs, classes, _ = activations_and_gradients(model, [module_at(model, module_path)], x, None)
    pairs = [(to_nchw(a), to_nchw(g)) for a, g in pairs]
    np.testing.assert_array_equal(result.class_index, classes)
    reference = reference_cam("gradcam", pairs, x.shape[2:])  # asserts the reference is not degenerate
    raw = np.maximum(reference_raw_cam("gradcam", *pairs[0]), 0)
    spread = (raw.max(axis=(1, 2)) - raw.min(axis=(1, 2))) / raw.max(axis=(1, 2))
    assert np.all(spread > 0.02), f"near-constant reference map (spread {spread}): min-max would amplify noise"
    assert np.max(np.abs(result.cam - reference)) <= 1e-3


def photo_like(n, h, w, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, h, w)).astype(np.float32)


@pytest.mark.parametrize("opset", [13, 17])
def test_levit_like_dynamic_token_count(tmp_path, opset):
    """No LayerNorm, attention inside [N, heads, T, d]: the automatic layer is the last block's
    output; the token count depends on the input size and is measured, not asked for."""
    torch.manual_seed(0)
    model = randomise_norms(LeViTLike())
    path = export(model, tmp_path / "levit.onnx", 64, opset=opset, dynamic_spatial=True)
    auto = auto_layer(path)
    assert in_scope(auto.node, "blocks2.1") and auto.op == "Add", auto
    assert "block output" in auto.reason
    x = photo_like(2, 64, 96)  # 4 x 6 tokens at the end: not the probe's square sizes
    check_against_reference(model, path, "blocks2.1", x, lambda a: tokens_to_nchw(a, 4, 6))


@pytest.mark.parametrize("opset, dynamic", [(13, True), (17, True), (17, False)])
def test_pvt_like_token_count_lost_by_shape_inference(tmp_path, opset, dynamic):
    """Dynamic input size: the count changes with it (grid computed at run time). Fixed input size:
    shape inference still loses the count after the Reshapes that read h, w at run time."""
    torch.manual_seed(1)
    model = randomise_norms(PVTLike())
    path = export(model, tmp_path / "pvt.onnx", 64, opset=opset, dynamic_spatial=dynamic)
    auto = auto_layer(path)
    assert in_scope(auto.node, "stage2.1.norm1"), auto
    assert "self-attention" in auto.reason
    x, grid = (photo_like(2, 64, 96, seed=1), (8, 12)) if dynamic else (photo_like(2, 64, 64, seed=1), (8, 8))
    check_against_reference(model, path, "stage2.1.norm1", x, lambda a: tokens_to_nchw(a, *grid))


@pytest.mark.parametrize("opset", [13, 17])
def test_swin_nhwc_after_patch_merging(tmp_path, opset):
    """timm's Swin: NHWC maps after a PatchMerging through 6-D tensors are read as NHWC."""
    torch.manual_seed(2)
    model = randomise_norms(SwinNHWC())
    path = export(model, tmp_path / "swin.onnx", 64, opset=opset)
    auto = auto_layer(path)
    assert in_scope(auto.node, "stage2.1.norm1") and len(auto.shape) == 4 and auto.shape[3] == 32, auto
    x = photo_like(2, 64, 64, seed=2)
    check_against_reference(model, path, "stage2.1.norm1", x, nhwc_to_nchw)
    # The PatchMerging's own output (a Linear over [N, 8, 8, 64]): its channels are found through
    # the 6-D Reshape/Transpose chain, not guessed from the input's layout.
    proto = onnx.load(path)
    merged = [n.output[0] for n in proto.graph.node if n.name.startswith(scope("merge.reduction"))][-1]
    check_against_reference(model, path, "merge.reduction", x, nhwc_to_nchw, layer=merged)


def test_axes_followed_through_six_dims(tmp_path):
    from onnxcam.autodiff.analysis import GraphAnalysis
    from onnxcam.cam.axes import AxisTracker
    from onnxcam.cam.inputs import image_input

    torch.manual_seed(2)
    path = export(SwinNHWC().eval(), tmp_path / "swin.onnx", 64, opset=13)
    proto = onnx.load(path)
    flatten = [n for n in proto.graph.node if n.name.startswith(scope("merge")) and n.op_type == "Reshape"][-1]
    transpose = [n for n in proto.graph.node if n.name.startswith(scope("merge")) and n.op_type == "Transpose"][-1]
    tracker = AxisTracker(GraphAnalysis(proto), image_input(proto, "swin"))
    assert tracker.kinds(transpose.output[0]) == ["B", "S", "S", "S", "S", "C"]  # [N, H/2, W/2, 2, 2, C]
    assert tracker.kinds(flatten.output[0]) == ["B", "S", "S", "C"]  # [N, H/2, W/2, 4C]
    assert tracker.layout(flatten.output[0]) == "NHWC"


def test_resmlp_like_affine_norms(tmp_path):
    """No LayerNorm op, no attention: the last block's affine norm that feeds the Linear across tokens."""
    torch.manual_seed(3)
    model = ResMLPLike().eval()
    path = export(model, tmp_path / "resmlp.onnx", 64, opset=17)
    auto = auto_layer(path)
    assert auto.node.startswith(scope("blocks.1.norm1")), auto
    assert "across tokens" in auto.reason
    check_against_reference(model, path, "blocks.1.norm1", photo_like(2, 64, 64, seed=3),
                            lambda a: tokens_to_nchw(a, 8, 8))


def test_cait_like_last_self_attention_block(tmp_path):
    """Class attention (one query) does not count: blocks[-1].norm1, not the class-attention norm."""
    torch.manual_seed(4)
    model = randomise_norms(CaiTLike())
    path = export(model, tmp_path / "cait.onnx", 64, opset=17)
    auto = auto_layer(path)
    assert auto.node.startswith(scope("blocks.1.norm1")), auto
    check_against_reference(model, path, "blocks.1.norm1", photo_like(2, 64, 64, seed=4),
                            lambda a: tokens_to_nchw(a, 8, 8))


def test_cli_layout_token_grid_and_reason(tmp_path):
    from onnxcam.cli import main

    torch.manual_seed(0)
    model = randomise_norms(LeViTLike())
    path = export(model, tmp_path / "levit.onnx", 64, opset=17, dynamic_spatial=True)
    listed = CliRunner().invoke(main, ["layers", path])
    assert listed.exit_code == 0, listed.output
    assert "\nauto: the last token block output" in listed.output
    out = tmp_path / "fixed.onnx"
    done = CliRunner().invoke(main, ["augment", path, "-o", str(out), "--layout", "tokens", "--token-grid", "0", "4", "4"])
    assert done.exit_code == 0, done.output
    import onnxruntime as ort
    x = photo_like(1, 64, 64)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    cam = session.run(["onnxcam_cam"], {"input": x, "onnxcam_class": np.full(1, -1, np.int64)})[0]
    pairs, _, _ = activations_and_gradients(model, [model.blocks2[1]], x, None)
    reference = reference_cam("gradcam", [(tokens_to_nchw(a, 4, 4), tokens_to_nchw(g, 4, 4)) for a, g in pairs],
                              (64, 64))
    assert np.max(np.abs(cam - reference)) <= 1e-3
    wrong = CliRunner().invoke(main, ["augment", path, "-o", str(tmp_path / "x.onnx"), "--token-grid", "0", "0", "4"])
    assert wrong.exit_code == 2 and "token grid" in wrong.output


def test_token_grid_when_the_model_cannot_be_probed(tmp_path, monkeypatch):
    """Without a probe run (a model ONNX Runtime cannot run on made-up inputs), the grid of a
    dynamic token count follows from the run-time count and the input's aspect ratio (the
    convolution strides, 8 here, would miss the subsampling attention's Slice)."""
    from onnxcam.autodiff.analysis import GraphAnalysis

    torch.manual_seed(0)
    model = randomise_norms(LeViTLike())
    path = export(model, tmp_path / "levit.onnx", 64, opset=17, dynamic_spatial=True)
    monkeypatch.setattr(GraphAnalysis, "probe", lambda self, names, required=False: {})
    check_against_reference(model, path, "blocks2.1", photo_like(2, 64, 96), lambda a: tokens_to_nchw(a, 4, 6))


@pytest.mark.parametrize("size, grid", [((100, 60), (6, 3)), ((64, 96), (4, 6)), ((48, 200), (3, 12))])
def test_run_time_grid_when_patches_floor_the_input(tmp_path, size, grid):
    """One augmented model for every input size: the grid follows the run-time token count, also
    when flooring H / 16 and W / 16 moves it off the input's aspect ratio."""
    from hier_nets import PatchTransformer

    torch.manual_seed(5)
    model = randomise_norms(PatchTransformer())
    path = export(model, tmp_path / "patches.onnx", 64, opset=17, dynamic_spatial=True)
    assert in_scope(auto_layer(path).node, "blocks.1.norm1")
    check_against_reference(model, path, "blocks.1.norm1", photo_like(2, *size, seed=5),
                            lambda a: tokens_to_nchw(a, *grid))
