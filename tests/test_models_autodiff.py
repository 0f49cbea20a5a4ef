"""Whole-model gradients: small torch nets exported with torch.onnx.export at opsets 11, 13 and 17,
gradients at intermediate tensors computed by the augmented ONNX graph in ONNX Runtime, compared
with torch autograd on the same module.

Each net's forward returns (logits, feature, ...) so that the feature tensors are named graph
outputs ("feat", "deep") and can be targeted by name; the score is "logits" with a random seed.
torch sees the same tensors through forward hooks. One augmented graph (symbolic batch) serves
batch 1 and batch 3. Float32 throughout (ORT's CPU provider has no float64 Conv/Resize/MaxPool):
relative error tolerance 1e-4, measured against the largest gradient entry.

Invariants checked on every model: the original outputs are bit-identical in the original and
augmented models (ORT optimisations off), onnx.checker full_check passes, IR version and opset
imports are unchanged.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "2")

import copy
import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness import rel_err, session
from torch_nets import BasicBlock, Block
from onnxcam.autodiff import add_gradients
from onnxcam.autodiff.shapes import make_value_info

OPSETS = [11, 13, 17]
TOL = 1e-4
WORST = {}


@pytest.fixture(scope="module", autouse=True)
def _report_worst():
    yield
    print("\nworst relative error per model/target:")
    for key in sorted(WORST):
        print(f"  {key:40s} {WORST[key]:.2e}")


# --------------------------------------------------------------------------- the nets
def randomise(model, seed=0):
    """Non-trivial BatchNorm statistics and a random head, so no gradient is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
        if isinstance(m, nn.Linear):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight.shape[1] ** 0.5)
    return model.eval()


class ResNetish(nn.Module):
    """conv-bn-relu stem, MaxPool 3x3/2 pad 1, two residual blocks (Add), GAP, Linear.
    Targets: "feat" = the last block's ReLU output; "deep" = the stem's ReLU output (its gradient
    goes back through both blocks and the MaxPool)."""
    size = 32

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.block1 = BasicBlock(8, 8, 1)
        self.block2 = BasicBlock(8, 16, 2)
        self.fc = nn.Linear(16, 5)
        self.hooks = {"feat": self.block2.relu, "deep": self.stem[2]}

    def forward(self, x):
        deep = self.stem(x)
        feat = self.block2(self.block1(self.pool(deep)))
        return self.fc(feat.mean((2, 3))), feat, deep


class SqueezeExcite(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s  # [N,C,1,1] broadcast


class InvertedResidual(nn.Module):
    def __init__(self, c, expand, act):
        super().__init__()
        e = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), act())
        self.dw = nn.Sequential(nn.Conv2d(e, e, 3, 1, 1, groups=e, bias=False), nn.BatchNorm2d(e), nn.ReLU6())
        self.se = SqueezeExcite(e)
        self.project = nn.Sequential(nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.project(self.se(self.dw(self.expand(x))))


class MobileNetV3ish(nn.Module):
    """HardSwish stem, inverted residuals with depthwise conv + ReLU6 (Clip) + SE (GAP, 1x1 convs,
    Hardsigmoid, Mul broadcast), last 1x1 conv + HardSwish. Targets: "feat" = the last feature map;
    "deep" = the stem output (back through both SE blocks, depthwise convs and Clips)."""
    size = 32

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        self.blocks = nn.Sequential(InvertedResidual(8, 3, nn.Hardswish), InvertedResidual(8, 2, nn.ReLU))
        self.last = nn.Sequential(nn.Conv2d(8, 24, 1, bias=False), nn.BatchNorm2d(24), nn.Hardswish())
        self.fc = nn.Linear(24, 5)
        self.hooks = {"feat": self.last[2], "deep": self.stem[2]}

    def forward(self, x):
        deep = self.stem(x)
        feat = self.last(self.blocks(deep))
        return self.fc(F.adaptive_avg_pool2d(feat, 1).flatten(1)), feat, deep


class ViTish(nn.Module):
    """Patch-embedding conv, class token concat, position embedding add, two pre-norm blocks
    (LayerNorm, multi-head attention with MatMul/Softmax/Transpose/Reshape, GELU MLP), final
    LayerNorm, class-token selection x[:, 0], Linear head. Targets: "feat" = the final norm output;
    "deep" = the tokens entering the first block (back through both blocks)."""
    size = 16

    def __init__(self, dim=16, heads=2, patch=4):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        n = (self.size // patch) ** 2
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.5)
        self.blocks = nn.Sequential(Block(dim, heads), Block(dim, heads))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)
        self.hooks = {"feat": self.norm, "deep": (self.blocks, "input")}

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        deep = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        feat = self.norm(self.blocks(deep))
        return self.head(feat[:, 0]), feat, deep


class YOLOish(nn.Module):
    """Backbone convs, SPPF (MaxPool 5x5/1 pad 2 three times + Concat), nearest x2 Upsample (Resize),
    Concat with the higher-resolution map, chunk (Split), SiLU, a dense head. Targets: "feat" =
    the SPPF input; "deep" = the high-resolution map (reached through the skip Concat and the
    whole SPPF/Upsample path)."""
    size = 32

    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.SiLU())
        self.c2 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.SiLU())
        self.cv1 = nn.Conv2d(16, 8, 1)
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.cv2 = nn.Sequential(nn.Conv2d(32, 16, 1), nn.SiLU())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.c3 = nn.Sequential(nn.Conv2d(24, 16, 3, 1, 1), nn.SiLU())
        self.head = nn.Conv2d(8, 6, 1)
        self.hooks = {"feat": self.c2, "deep": self.c1}

    def forward(self, x):
        deep = self.c1(x)
        feat = self.c2(deep)
        s = self.cv1(feat)
        y1 = self.pool(s)
        y2 = self.pool(y1)
        y3 = self.pool(y2)
        p = self.cv2(torch.cat([s, y1, y2, y3], 1))
        u = self.c3(torch.cat([self.up(p), deep], 1))
        a, b = u.chunk(2, 1)
        logits = self.head(a * torch.sigmoid(b))  # [N, 6, H, W]: a dense score
        return logits, feat, deep


NETS = {"resnet": ResNetish, "mobilenetv3": MobileNetV3ish, "vit": ViTish, "yolo": YOLOish}
OUTPUTS = ["logits", "feat", "deep"]


# --------------------------------------------------------------------------- export and run
def build_net(name, seed=0):
    torch.manual_seed(seed)
    return randomise(NETS[name](), seed)


def export(net, opset, dynamo=False):
    x = torch.randn(2, 3, net.size, net.size)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(net, (x,), buf, opset_version=opset, input_names=["x"], output_names=OUTPUTS,
                              dynamo=True, dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}})
        else:
            torch.onnx.export(net, (x,), buf, opset_version=opset, input_names=["x"], output_names=OUTPUTS,
                              dynamo=False, dynamic_axes={"x": {0: "batch"}, **{o: {0: "batch"} for o in OUTPUTS}})
    return onnx.load_from_string(buf.getvalue())


def augment(model, targets):
    gmodel = copy.deepcopy(model)
    built = add_gradients(gmodel, targets, "logits")
    for t in targets:
        gmodel.graph.output.append(make_value_info(built.gradients[t], built.emitter.info(t)))
    return gmodel, built


def torch_gradients(net, x, seed, targets):
    """d(sum(seed * logits))/d(target) in torch, the targets' tensors captured by forward hooks."""
    captured = {}

    def hook(name, which):
        def fn(module, inputs, output):
            tensor = inputs[0] if which == "input" else output
            tensor.retain_grad()
            captured[name] = tensor
        return fn

    handles = []
    for t in targets:  # a module (its output is the target) or (module, "input")
        module, which = net.hooks[t] if isinstance(net.hooks[t], tuple) else (net.hooks[t], "output")
        handles.append(module.register_forward_hook(hook(t, which)))
    try:
        logits = net(torch.from_numpy(x))[0]
        logits.backward(torch.from_numpy(seed))
    finally:
        for h in handles:
            h.remove()
    return {t: captured[t].grad.numpy() for t in targets}, logits.detach().numpy()


def check_model_gradients(name, model, net, targets=("feat", "deep"), batches=(1, 3), opset=None):
    targets = list(targets)
    original = copy.deepcopy(model)
    gmodel, built = augment(model, targets)

    # Invariants: the checker accepts it; IR version and opsets are the model's own.
    onnx.checker.check_model(gmodel, full_check=True)
    assert gmodel.ir_version == original.ir_version
    assert [(o.domain, o.version) for o in gmodel.opset_import] == [(o.domain, o.version) for o in original.opset_import]
    assert [o.name for o in gmodel.graph.output][:len(original.graph.output)] == [o.name for o in original.graph.output]

    orig_sess, grad_sess = session(original), session(gmodel)
    grad_names = [built.gradients[t] for t in targets]
    rng = np.random.default_rng(0)
    for n in batches:
        x = rng.standard_normal((n, 3, net.size, net.size)).astype(np.float32)
        before = orig_sess.run(OUTPUTS, {"x": x})
        seed = rng.standard_normal(before[0].shape).astype(np.float32)
        after = grad_sess.run(OUTPUTS + grad_names, {"x": x, built.seed: seed})
        for o, b, a in zip(OUTPUTS, before, after):
            assert np.array_equal(a, b), f"original output {o!r} changed by the augmentation"
        ref, ref_logits = torch_gradients(net, x, seed, targets)
        assert rel_err(before[0], ref_logits) < 1e-4, "exported model differs from torch"
        for t, g in zip(targets, after[len(OUTPUTS):]):
            assert np.abs(ref[t]).max() > 0
            err = rel_err(g, ref[t])
            key = f"{name} {t} opset {opset}"
            WORST[key] = max(WORST.get(key, 0.0), err)
            assert err < TOL, f"{name}: gradient at {t!r} (batch {n}) rel err {err:.3g}"


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("name", list(NETS))
def test_exported_model_gradients_match_torch(name, opset):
    net = build_net(name)
    model = export(net, opset)
    assert model.opset_import[0].version == opset
    check_model_gradients(name, model, net, opset=opset)


@pytest.mark.parametrize("name", list(NETS))
def test_target_only_the_feature_map(name):
    """The usual Grad-CAM case: one target, the last feature map (shortest backward path)."""
    net = build_net(name, seed=1)
    check_model_gradients(name, export(net, 13), net, targets=["feat"], batches=(2,), opset=13)


def test_dynamo_exporter_resnet():
    """The dynamo exporter names and structures graphs differently (onnxscript is in the dev extra)."""
    net = build_net("resnet")
    model = export(net, 18, dynamo=True)
    check_model_gradients("resnet-dynamo", model, net, opset=18)
