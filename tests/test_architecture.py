"""The package's shape: no import cycles, methods and targets as registered families, one model
for several methods with the same maps as one model per method."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import onnxcam
from onnxcam.autodiff.registry import STANDARD, mode_overrides, rule_modes
from onnxcam.cam.augment import CAM_OUTPUT, CLASS_INPUT, LAYER_CAMS_OUTPUT, method_output
from onnxcam.cam.methods import METHODS_REGISTRY, Needs, get_method
from onnxcam.cam.plan import INPUT, LAYERS, plan
from onnxcam.cam.targets import TARGETS
from onnxcam.errors import UsageError
from onnxcam.spec import ExplainSpec
from torch_nets import TinyResNet, export, randomise_batchnorm

PACKAGE = Path(onnxcam.__file__).parent
GRADIENT_CAMS = ("gradcam", "gradcam++", "xgradcam", "hirescam", "gradcam-elementwise", "layercam")


# ---------------------------------------------------------------------- imports
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set) -> set:
    """onnxcam modules `path` imports, anywhere in the file (imports inside functions too: a
    cycle through a lazy import is still a cycle of dependencies)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("onnxcam"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("onnxcam"):
                continue
            for alias in node.names:  # `from . import x` may name a submodule
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != name}


def test_no_import_cycles():
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    graph = {_module_name(f): _imports(f, modules) for f in files}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cli_is_a_thin_shell():
    """Nothing but the CLI imports it (the demo used to borrow its helpers)."""
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    users = [_module_name(f) for f in files if "onnxcam.cli" in _imports(f, modules)]
    assert users == []


# ---------------------------------------------------------------------- registries and spec
def test_every_method_declares_what_it_needs():
    assert set(GRADIENT_CAMS) <= set(METHODS_REGISTRY)
    for method in METHODS_REGISTRY.values():
        assert isinstance(method.needs, Needs)
        assert method.kind in ("layer", "map")
        assert method.needs.rule_mode in rule_modes()
        assert method.doc, f"method {method.name} has no docstring"
    assert set(TARGETS) == {"class", "detection", "segmentation", "embedding", "sequence"}


def test_rule_modes_replace_only_the_rules_they_name():
    assert rule_modes()[0] == STANDARD
    for mode in rule_modes()[1:]:
        assert mode_overrides(mode) == ("Relu",)


def test_plan_builds_each_need_once():
    p = plan(list(GRADIENT_CAMS))
    assert [m.name for m in p.methods] == list(GRADIENT_CAMS)
    assert p.gradients == {STANDARD: [LAYERS]} and p.needs_layers and p.needs_activations
    assert p.targets(STANDARD, ["a", "b"], "x") == ["a", "b"]


def test_spec_parses_and_refuses():
    spec = ExplainSpec.build(method="gradcam, layercam,gradcam", layer=[])
    assert spec.methods == ("gradcam", "layercam") and spec.layers == "auto"
    assert ExplainSpec.build(spec, layer="t").layers == ("t",)
    with pytest.raises(UsageError, match="no method"):
        ExplainSpec(methods=" , ")
    with pytest.raises(UsageError, match="not requested"):
        ExplainSpec(methods="gradcam", method_options={"saliency": {}})
    with pytest.raises(UsageError, match="layout"):
        ExplainSpec(layout="CHW")
    with pytest.raises(UsageError, match="did you mean 'gradcam'"):
        get_method("gradcm")


# ---------------------------------------------------------------------- several methods in one model
@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    torch.manual_seed(0)
    return export(randomise_batchnorm(TinyResNet()), tmp_path_factory.mktemp("arch") / "resnet.onnx", 64)


def _run(model, x, optimize):
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"input": x, CLASS_INPUT: np.full(len(x), -1, np.int64)})))


@pytest.mark.parametrize("optimize", [False, True])
@pytest.mark.parametrize("layers", ["auto", "two"])
def test_one_model_for_six_methods_equals_six_models(resnet, layers, optimize):
    layer = "auto" if layers == "auto" else ["/layer2/relu_1/Relu_output_0", "/layer3/relu_1/Relu_output_0"]
    x = np.random.default_rng(3).standard_normal((3, 3, 64, 64)).astype(np.float32)
    combined = onnxcam.augment(resnet, method=list(GRADIENT_CAMS), layer=layer)
    together = _run(combined, x, optimize)
    np.testing.assert_array_equal(together[CAM_OUTPUT], together[method_output(CAM_OUTPUT, GRADIENT_CAMS[0])])
    for method in GRADIENT_CAMS:
        alone = _run(onnxcam.augment(resnet, method=method, layer=layer), x, optimize)
        assert alone[CAM_OUTPUT].max() > 0.5 and alone[CAM_OUTPUT].std() > 0.01  # not a degenerate map
        np.testing.assert_array_equal(together[method_output(CAM_OUTPUT, method)], alone[CAM_OUTPUT])
        if layers == "two":
            np.testing.assert_array_equal(together[method_output(LAYER_CAMS_OUTPUT, method)],
                                          alone[LAYER_CAMS_OUTPUT])


def test_shared_backward_pass_is_built_once(resnet):
    """Six methods at a mid-network layer: the backward convolutions exist once, not six times."""
    layer = "/layer2/relu_1/Relu_output_0"

    def backward_convs(model):
        return sum(n.op_type == "ConvTranspose" for n in model.graph.node)

    single = backward_convs(onnxcam.augment(resnet, method="gradcam", layer=layer))
    assert single > 0
    assert backward_convs(onnxcam.augment(resnet, method=list(GRADIENT_CAMS), layer=layer)) == single


def test_explainer_returns_one_map_per_method(resnet):
    x = np.random.default_rng(4).standard_normal((2, 3, 64, 64)).astype(np.float32)
    both = onnxcam.Explainer(resnet, method="gradcam,layercam")(x)
    assert list(both.cams) == ["gradcam", "layercam"]
    np.testing.assert_array_equal(both.cam, both.cams["gradcam"])
    np.testing.assert_array_equal(both.cams["layercam"], onnxcam.Explainer(resnet, method="layercam")(x).cam)


def test_metadata_records_methods_and_automatic_choices(resnet):
    meta = {p.key: p.value for p in onnxcam.augment(resnet, method=["layercam", "gradcam"]).metadata_props}
    assert meta["onnxcam.method"] == "layercam" and meta["onnxcam.methods"] == "layercam,gradcam"
    assert meta["onnxcam.input.onnxcam_class"] == '{"fill": -1, "shape": ["batch"], "dtype": "int64"}'


def test_saliency_is_the_input_gradient_magnitude(resnet):
    """The first input-space method: the planner differentiates to the input, the method reads it."""
    import torch.nn as nn  # noqa: F401
    from torch_nets import TinyResNet as Net
    torch.manual_seed(0)
    model = randomise_batchnorm(Net()).double().eval()
    x = np.random.default_rng(5).standard_normal((2, 3, 64, 64))
    result = onnxcam.Explainer(resnet, method="saliency,gradcam")(x.astype(np.float32))
    t = torch.tensor(x, requires_grad=True)
    logits = model(t)
    logits.gather(1, torch.tensor(result.class_index).view(-1, 1)).sum().backward()
    expected = t.grad.abs().amax(1).numpy()
    expected /= expected.reshape(2, -1).max(1)[:, None, None] + 1e-7
    assert expected.std() > 0.01
    np.testing.assert_allclose(result.cams["saliency"], expected, atol=1e-4)
