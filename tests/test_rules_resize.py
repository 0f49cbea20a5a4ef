"""Resize VJP against torch F.interpolate twins (float32: ORT has no float64 Resize) and a
dot-product check for the modes without a twin. Resize is linear in X, so finite differences
are exact up to rounding and the dot-product tolerance can be tight."""

import numpy as np
import pytest
import torch.nn.functional as F
from onnx import TensorProto, helper

from harness import dot_product_check, make_model, ort_vjp, rel_err, run, torch_vjp

WORST = {}
EMPTY = np.zeros([0], np.float32)


def _model(x, opset, attrs, scales=None, sizes=None, axes=None, roi=None, dynamic=(), runtime_sizes=False,
           blank_optional=False):
    """One Resize node. scales/sizes cover all 4 axes, or only `axes` (opset 18+)."""
    inits, inputs = {}, {"x": x}
    if axes is not None:
        attrs = dict(attrs, axes=axes)
    names = ["x", "roi", "scales", "sizes"]
    inits["roi"] = np.asarray(roi, np.float32) if roi is not None else EMPTY
    if scales is not None:
        inits["scales"] = np.asarray(scales, np.float32)
        names = names[:3]
    else:
        inits["scales"] = EMPTY
        if runtime_sizes:
            inputs["sizes"] = np.asarray(sizes, np.int64)
        else:
            inits["sizes"] = np.asarray(sizes, np.int64)
    if blank_optional:  # opset 13+: optional inputs as empty names
        if roi is None:
            names[1] = ""
            del inits["roi"]
        if scales is None:
            names[2] = ""
            del inits["scales"]
    node = helper.make_node("Resize", names, ["y"], **attrs)
    model = make_model([node], inputs, ["y"], inits, opset=opset)
    for i, d in dynamic:
        model.graph.input[0].type.tensor_type.shape.dim[i].dim_param = d
    if runtime_sizes or dynamic:  # inference can lose Y's dims: declare them symbolic
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "ho", "wo"])
        model.graph.output[0].CopyFrom(out)
    feeds = {k: v for k, v in inputs.items()}
    return model, feeds


def _vs_torch(model, feeds, fn, tol=2e-5, family="twin"):
    x = feeds["x"]
    y = run(model, feeds)["y"]
    seed = np.random.default_rng(5).standard_normal(y.shape).astype(np.float32)
    (gx,), _ = ort_vjp(model, feeds, ["x"], "y", seed)
    (ref,), y_ref = torch_vjp(fn, [x], seed)
    assert rel_err(y, y_ref) < 1e-5, "forward twin mismatch: the test's twin is wrong"
    err = rel_err(gx, ref)
    WORST[family] = max(WORST.get(family, 0.0), err)
    assert err < tol, err


def _x(shape=(2, 3, 5, 7), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


OPSETS = [11, 13, 17, 18]

# (onnx attrs, torch kwargs) pairs that are exact twins
TWINS = {
    "nearest": ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
                {"mode": "nearest"}),
    "bilinear": ({"mode": "linear", "coordinate_transformation_mode": "half_pixel"},
                 {"mode": "bilinear", "align_corners": False}),
    "bilinear_pytorch_half_pixel": ({"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
                                    {"mode": "bilinear", "align_corners": False}),
    "bilinear_align_corners": ({"mode": "linear", "coordinate_transformation_mode": "align_corners"},
                               {"mode": "bilinear", "align_corners": True}),
    "bicubic": ({"mode": "cubic", "coordinate_transformation_mode": "half_pixel", "cubic_coeff_a": -0.75},
                {"mode": "bicubic", "align_corners": False}),
    "bicubic_align_corners": ({"mode": "cubic", "coordinate_transformation_mode": "align_corners",
                               "cubic_coeff_a": -0.75}, {"mode": "bicubic", "align_corners": True}),
}


@pytest.mark.parametrize("kind", sorted(TWINS))
@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("factor", [2.0, 3.0])
def test_upsample_scales_vs_torch(kind, opset, factor):
    attrs, kw = TWINS[kind]
    x = _x()
    model, feeds = _model(x, opset, attrs, scales=[1, 1, factor, factor])
    _vs_torch(model, feeds, lambda t: F.interpolate(t, scale_factor=factor, **kw))


@pytest.mark.parametrize("kind", [k for k in sorted(TWINS) if k != "nearest"])
@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("out_hw", [(9, 4), (3, 11), (2, 3)])
def test_sizes_vs_torch(kind, opset, out_hw):
    """Up- and down-sampling to given sizes (different factors per axis)."""
    attrs, kw = TWINS[kind]
    x = _x()
    model, feeds = _model(x, opset, attrs, sizes=[2, 3, *out_hw])
    _vs_torch(model, feeds, lambda t: F.interpolate(t, size=out_hw, **kw))


@pytest.mark.parametrize("kind", ["nearest", "bilinear", "bicubic"])
def test_opset18_axes_attribute(kind):
    attrs, kw = TWINS[kind]
    x = _x()
    model, feeds = _model(x, 18, attrs, scales=[2.0, 2.0], axes=[2, 3])
    _vs_torch(model, feeds, lambda t: F.interpolate(t, scale_factor=2.0, **kw))
    model, feeds = _model(x, 18, attrs, sizes=[10, 14], axes=[-2, -1])
    _vs_torch(model, feeds, lambda t: F.interpolate(t, size=(10, 14), **kw))


def test_opset18_single_axis():
    attrs, kw = TWINS["bilinear"]
    x = _x()
    model, feeds = _model(x, 18, attrs, scales=[3.0], axes=[3])
    _vs_torch(model, feeds, lambda t: F.interpolate(t, size=(5, 21), **kw))


@pytest.mark.parametrize("opset", [13, 18])
def test_blank_optional_inputs(opset):
    attrs, kw = TWINS["bilinear"]
    x = _x()
    model, feeds = _model(x, opset, attrs, sizes=[2, 3, 8, 9], blank_optional=True)
    _vs_torch(model, feeds, lambda t: F.interpolate(t, size=(8, 9), **kw))
    model, feeds = _model(x, opset, attrs, scales=[1, 1, 2, 2], blank_optional=True)
    _vs_torch(model, feeds, lambda t: F.interpolate(t, scale_factor=2.0, **kw))


@pytest.mark.parametrize("mode", ["linear", "cubic"])
def test_antialias_downsampling_sizes(mode):
    """ORT's antialias filter is not torch's (forward differs by ~0.2): dot-product check only."""
    x = _x((2, 3, 12, 10))
    attrs = {"mode": mode, "antialias": 1, "coordinate_transformation_mode": "pytorch_half_pixel"}
    model, feeds = _model(x, 18, attrs, sizes=[2, 3, 5, 4])
    err = dot_product_check(model, feeds, "x", "y", eps=1e-1)
    WORST["dot"] = max(WORST.get("dot", 0.0), err)
    assert err < 1e-5, err


@pytest.mark.parametrize("opset", OPSETS)
def test_dynamic_spatial_size(opset):
    """One gradient graph for several spatial sizes: scales form and run-time sizes form."""
    attrs, kw = TWINS["bilinear"]
    dyn = [(0, "N"), (2, "H"), (3, "W")]
    model, _ = _model(_x(), opset, attrs, scales=[1, 1, 2.0, 3.0], dynamic=dyn)
    for shape in [(2, 3, 5, 7), (1, 3, 8, 4)]:
        x = _x(shape)
        _vs_torch(model, {"x": x}, lambda t: F.interpolate(t, scale_factor=(2.0, 3.0), **kw))
    model, _ = _model(_x(), opset, attrs, sizes=[2, 3, 9, 4], dynamic=dyn, runtime_sizes=True)
    for shape, hw in [((2, 3, 5, 7), (9, 4)), ((1, 3, 8, 4), (3, 10))]:
        x = _x(shape)
        sizes = np.asarray([shape[0], 3, *hw], np.int64)
        _vs_torch(model, {"x": x, "sizes": sizes}, lambda t: F.interpolate(t, size=hw, **kw))


# ------------------------------------------------------------------ no torch twin: dot-product check
NO_TWIN = [
    {"mode": "nearest", "coordinate_transformation_mode": "half_pixel", "nearest_mode": "round_prefer_floor"},
    {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "ceil"},
    {"mode": "nearest", "coordinate_transformation_mode": "align_corners", "nearest_mode": "round_prefer_ceil"},
    {"mode": "linear", "coordinate_transformation_mode": "asymmetric"},
    {"mode": "cubic", "coordinate_transformation_mode": "half_pixel", "exclude_outside": 1},
    {"mode": "cubic", "coordinate_transformation_mode": "asymmetric", "cubic_coeff_a": -0.5},
    {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize", "extrapolation_value": 3.0},
]


@pytest.mark.parametrize("attrs", NO_TWIN, ids=lambda a: "-".join(str(v) for v in a.values()))
@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("form", ["scales", "sizes"])
def test_dot_product(attrs, opset, form):
    x = _x()
    roi = [0, 0, 0.1, -0.2, 1, 1, 0.8, 1.1] if attrs["coordinate_transformation_mode"] == "tf_crop_and_resize" else None
    if form == "scales":
        model, feeds = _model(x, opset, attrs, scales=[1, 1, 1.7, 0.6], roi=roi)
    else:
        model, feeds = _model(x, opset, attrs, sizes=[2, 3, 8, 4], roi=roi)
    err = dot_product_check(model, feeds, "x", "y", eps=1e-1)
    WORST["dot"] = max(WORST.get("dot", 0.0), err)
    assert err < 1e-5, err


@pytest.mark.parametrize("mode", ["linear", "cubic"])
def test_dot_product_antialias_axes_opset18(mode):
    x = _x((2, 3, 11, 13))
    attrs = {"mode": mode, "antialias": 1, "coordinate_transformation_mode": "half_pixel"}
    model, feeds = _model(x, 18, attrs, scales=[0.4, 0.7], axes=[2, 3])
    assert dot_product_check(model, feeds, "x", "y", eps=1e-1) < 1e-5


def test_resizing_channels_is_refused():
    x = _x()
    model, feeds = _model(x, 13, TWINS["nearest"][0], scales=[1, 2, 2, 2])
    with pytest.raises(Exception, match="N or C"):
        ort_vjp(model, feeds, ["x"], "y", np.ones((2, 6, 10, 14), np.float32))


def test_report_worst():
    print("worst relative errors:", WORST)
