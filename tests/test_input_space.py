"""Input-space and sampled methods against their formulas on torch autograd in float64.

Every map and attribution is recomputed here from the papers' formulas (captum's and torchcam's
conventions where they fix a detail), independently of onnxcam: gradients with torch.autograd on
float64 copies of the nets, guided backprop and deconvnet by swapping torch's ReLU backward,
SmoothGrad/Integrated Gradients with the very noise fed to the graph and the same quadrature.
References are checked non-degenerate before any comparison.
"""

from __future__ import annotations

import contextlib

import cv2

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import onnxcam
from cam_reference import scale
from onnxcam.cam.augment import CAM_OUTPUT, method_output
from onnxcam.cam.targets import CLASS_INPUT
from torch_nets import TinyMobileNetV3, TinyResNet, TinyViT, export, randomise_batchnorm

GRAD_TOL = 1e-5  # of the attribution's max |.|
MAP_TOL = 1e-4  # of the map's max
SAMPLES, STEPS, CHUNK = 3, 4, 2  # CHUNK < SAMPLES: the chunk Loop is exercised
SIZE = 64
LAYER = {"resnet": ("/layer3/relu_1/Relu_output_0", "layer3"), "mobilenet": ("/last/last.2/Mul_output_0", "last"),
         "vit": ("/blocks/blocks.1/norm1/Add_1_output_0", "blocks.1.norm1")}  # tensor, the torch module making it


# ---------------------------------------------------------------------- nets
@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("input_space")
    built = {}
    for name, cls in (("resnet", TinyResNet), ("mobilenet", TinyMobileNetV3), ("vit", TinyViT)):
        torch.manual_seed(1)
        model = cls() if name == "vit" else randomise_batchnorm(cls())
        path = export(model.eval(), folder / f"{name}.onnx", SIZE)
        logits = model.logits if name == "mobilenet" else model
        layer, module_path = LAYER[name]
        built[name] = (model.double().eval(), logits, path, layer, model.get_submodule(module_path))
    return built


def images(n, seed):
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


# ---------------------------------------------------------------------- torch references
class _Guided(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g.clamp(min=0) * (x > 0)


class _Deconv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        return g.clamp(min=0)


@contextlib.contextmanager
def relu_backward(mode):
    """Every ReLU (nn.ReLU and torch.relu: both export as a Relu node) with a modified backward."""
    if mode is None:
        yield
        return
    fn = {"guided": _Guided, "deconvnet": _Deconv}[mode].apply
    saved = nn.ReLU.forward, torch.relu, nn.functional.relu
    nn.ReLU.forward = lambda self, x: fn(x)
    torch.relu = fn
    nn.functional.relu = lambda x, inplace=False: fn(x)
    try:
        yield
    finally:
        nn.ReLU.forward, torch.relu, nn.functional.relu = saved


def torch_pass(logits_fn, module, x, classes, mode=None):
    """(dS/dx, A, dS/dA, S) in float64 for the logits of `classes` at inputs x [B, C, H, W]."""
    store = {}
    hook = module.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        with relu_backward(mode):
            t = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
            out = logits_fn(t)
            store["a"].retain_grad()
            score = out.gather(1, torch.as_tensor(classes).view(-1, 1))[:, 0]
            score.sum().backward()
    finally:
        hook.remove()
    a, g = store["a"].detach(), store["a"].grad
    if a.dim() == 3:  # tokens [N, 1 + h*w, C] -> [N, C, h, w] (class token dropped)
        side = int(round((a.shape[1] - 1) ** 0.5))
        a, g = (v[:, 1:].reshape(v.shape[0], side, side, -1).permute(0, 3, 1, 2) for v in (a, g))
    return t.grad.numpy(), a.numpy(), g.numpy(), score.detach().numpy()


def signed_map(attribution):
    s = attribution.sum(1)
    return s / (np.abs(s).reshape(len(s), -1).max(1)[:, None, None] + 1e-7)


def magnitude_map(attribution):
    m = np.abs(attribution).max(1)
    return m / (m.reshape(len(m), -1).max(1)[:, None, None] + 1e-7)


def cam_pipeline(raw):
    """pytorch-grad-cam's pipeline for one layer: relu, min-max, bilinear resize, min-max."""
    return scale(scale(np.maximum(raw, 0), (SIZE, SIZE)))


def noise_sigma(x, level):
    return level * (x.max((1, 2, 3)) - x.min((1, 2, 3)))[:, None, None, None]


def gausslegendre(steps):
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return 0.5 * (nodes + 1), 0.5 * weights


def references(net, x, classes, noise, noise_std_cam, cam_noise):
    """Every method's (attribution or None, map) from its formula."""
    model, logits, _, _, module = net
    n = len(x)
    g, A, G, S = torch_pass(logits, module, x, classes)
    out = {"gradient": (g, signed_map(g)), "input-x-gradient": (x * g, signed_map(x * g)),
           "saliency": (np.abs(g), magnitude_map(g))}
    for mode, method in (("guided", "guided-backprop"), ("deconvnet", "deconvnet")):
        modified = torch_pass(logits, module, x, classes, mode)[0]
        out[method] = (modified, signed_map(modified))
    raw = np.maximum((G.mean((2, 3))[:, :, None, None] * A).sum(1), 0)
    out["gradcam"] = (None, cam_pipeline(raw))
    # captum's GuidedGradCam: relu(Grad-CAM) upsampled (bilinear, half-pixel) times guided backprop
    upsampled = np.stack([cv2.resize(np.float32(r / r.max()), (SIZE, SIZE)) for r in raw]).astype(np.float64)
    guided = out["guided-backprop"][0] * upsampled[:, None]
    out["guided-gradcam"] = (guided, signed_map(guided))
    # SmoothGrad family: the fed standard normal noise, sigma = 0.15 (max - min) per image
    samples = x[None] + noise_sigma(x, 0.15)[None] * noise
    grads = np.stack([torch_pass(logits, module, s, classes)[0] for s in samples])
    mean, square = grads.mean(0), (grads ** 2).mean(0)
    out["smoothgrad"] = (mean, magnitude_map(mean))
    out["smoothgrad-sq"] = (square, magnitude_map(square))
    out["vargrad"] = (square - mean ** 2, magnitude_map(square - mean ** 2))
    # Integrated Gradients, zero baseline, Gauss-Legendre
    alphas, weights = gausslegendre(STEPS)
    path = [torch_pass(logits, module, a * x, classes) for a in alphas]
    ig = x * sum(w * p[0] for w, p in zip(weights, path))
    zero_score = torch_pass(logits, module, 0 * x, classes)[3]
    out["integrated-gradients"] = (ig, signed_map(ig))
    out["completeness"] = ig.sum((1, 2, 3)) - (S - zero_score)
    # Integrated Grad-CAM: sum_k sum_i w_i (A(x_i) - A(0)) mean_hw G(x_i)
    a_zero = torch_pass(logits, module, 0 * x, classes)[1]
    raw = sum(w * ((p[1] - a_zero) * p[2].mean((2, 3), keepdims=True)).sum(1) for w, p in zip(weights, path))
    out["integrated-gradcam"] = (None, cam_pipeline(raw))
    # Smooth Grad-CAM++ as torchcam: absolute std, D2/D3 means, A at x, the last copy's A and G
    cam_samples = x[None] + noise_std_cam * cam_noise
    passes = [torch_pass(logits, module, s, classes) for s in cam_samples]
    d2 = np.mean([p[2] ** 2 for p in passes], 0)
    d3 = np.mean([p[2] ** 3 for p in passes], 0)
    alpha = d2 / (2 * d2 + (d3 * A).sum((2, 3), keepdims=True) + 1e-8)
    w = (alpha * np.maximum(passes[-1][2], 0)).sum((2, 3), keepdims=True)
    out["smooth-gradcam++"] = (None, cam_pipeline((w * passes[-1][1]).sum(1)))
    assert n == len(classes)
    return out


ALL = ["gradient", "input-x-gradient", "saliency", "guided-backprop", "deconvnet", "guided-gradcam", "smoothgrad",
       "smoothgrad-sq", "vargrad", "integrated-gradients", "integrated-gradcam", "smooth-gradcam++"]


def options(noise="input"):
    noisy = {"samples": SAMPLES, "samples_per_chunk": CHUNK, "noise": noise}
    return {"smoothgrad": noisy, "smoothgrad-sq": noisy, "vargrad": noisy,
            "integrated-gradients": {"steps": STEPS, "samples_per_chunk": CHUNK},
            "integrated-gradcam": {"steps": STEPS, "samples_per_chunk": 0},
            "smooth-gradcam++": {"samples": SAMPLES, "samples_per_chunk": CHUNK, "noise": noise}}


def run_all(path, layer, methods, x, noise, cam_noise, extra_options=None):
    explainer = onnxcam.Explainer(path, layer=layer, method=methods,
                                  method_options={m: o for m, o in {**options(), **(extra_options or {})}.items()
                                                  if m in methods})
    feeds = {}
    if "smoothgrad" in methods:
        feeds["onnxcam_noise"] = noise
    if "smooth-gradcam++" in methods:
        feeds["onnxcam_noise__smooth-gradcam++" if "smoothgrad" in methods else "onnxcam_noise"] = cam_noise
    return explainer(x, inputs=feeds)


def compare(name, got_attr, got_map, ref_attr, ref_map):
    if ref_attr is not None:
        top = np.abs(ref_attr).max()
        assert top > 0 and ref_attr.std() > 1e-3 * top, f"{name}: degenerate reference attribution"
        assert np.abs(got_attr - ref_attr).max() <= GRAD_TOL * top, (name, np.abs(got_attr - ref_attr).max() / top)
    assert np.abs(ref_map).max() > 0.5 and ref_map.std() > 0.01, f"{name}: degenerate reference map"
    assert np.abs(got_map - ref_map).max() <= MAP_TOL * np.abs(ref_map).max(), (name, np.abs(got_map - ref_map).max())


# ---------------------------------------------------------------------- the tests
@pytest.mark.parametrize("name", ["resnet", "mobilenet", "vit"])
def test_every_method_matches_its_formula(nets, name):
    """All twelve methods in one model (one forward, shared backward passes) against torch."""
    net = nets[name]
    x = images(2, seed=3)
    rng = np.random.default_rng(9)
    noise = rng.standard_normal((SAMPLES,) + x.shape).astype(np.float32)
    cam_noise = rng.standard_normal((SAMPLES,) + x.shape).astype(np.float32)
    result = run_all(net[2], net[3], ALL, x, noise, cam_noise)
    refs = references(net, x.astype(np.float64), result.class_index, noise.astype(np.float64), 0.3,
                      cam_noise.astype(np.float64))
    for method in ALL:
        ref_attr, ref_map = refs[method]
        got_attr = result.extras.get(f"onnxcam_attribution__{method}")
        compare(method, got_attr, result.cams[method], ref_attr, ref_map)
    residual = result.extras["onnxcam_completeness__integrated-gradients"]
    np.testing.assert_allclose(residual, refs["completeness"], atol=1e-4 * np.abs(refs["completeness"]).max() + 1e-4)


def test_one_model_equals_single_method_models(nets):
    """gradcam + guided-gradcam + saliency + integrated-gradients together == each alone."""
    path, layer = nets["resnet"][2], nets["resnet"][3]
    x = images(3, seed=4)
    methods = ["gradcam", "guided-gradcam", "saliency", "integrated-gradients"]
    together = onnxcam.Explainer(path, layer=layer, method=methods, method_options={
        "integrated-gradients": options()["integrated-gradients"]})(x)
    for method in methods:
        alone = onnxcam.Explainer(path, layer=layer, method=method,
                                  method_options={k: v for k, v in options().items() if k == method})(x)
        assert alone.cam.std() > 0.01
        np.testing.assert_allclose(together.cams[method], alone.cam, atol=1e-6)


def test_random_noise_is_seeded_and_chunking_changes_nothing(nets):
    """In-graph noise: a fresh session draws the same noise; with fed noise, 1 chunk == 3 chunks."""
    path, layer = nets["resnet"][2], nets["resnet"][3]
    x = images(2, seed=5)
    first = [onnxcam.Explainer(path, layer=layer, method="smoothgrad",
                               method_options={"smoothgrad": {"samples": 3, "samples_per_chunk": 2}})(x).cam
             for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])
    noise = np.random.default_rng(2).standard_normal((3,) + x.shape).astype(np.float32)
    maps = [onnxcam.Explainer(path, layer=layer, method="smoothgrad",
                              method_options={"smoothgrad": {"samples": 3, "samples_per_chunk": k, "noise": "input"}})(
        x, inputs={"onnxcam_noise": noise}).cam for k in (0, 1)]
    assert maps[0].std() > 0.01
    np.testing.assert_allclose(maps[0], maps[1], atol=1e-6)


def test_loop_in_plain_onnx_runtime_and_dynamic_batch(nets):
    """A raw session (no Explainer) runs the chunk Loop at batch 1 and batch 3 from one model."""
    path, layer = nets["resnet"][2], nets["resnet"][3]
    model = onnxcam.augment(path, layer=layer, method="integrated-gradients",
                            method_options={"integrated-gradients": {"steps": 5, "samples_per_chunk": 2}})
    assert any(n.op_type == "Loop" for n in model.graph.node)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = images(3, seed=6)
    three = session.run([CAM_OUTPUT], {"input": x, CLASS_INPUT: np.full(3, -1, np.int64)})[0]
    one = session.run([CAM_OUTPUT], {"input": x[1:2], CLASS_INPUT: np.full(1, -1, np.int64)})[0]
    assert three.std() > 0.01
    np.testing.assert_allclose(one[0], three[1], atol=1e-5)


@pytest.mark.parametrize("rule", ["riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle"])
def test_riemann_rules_follow_captum(nets, rule):
    """captum's Riemann sums: step 1/n, alphas by linspace; the trapezoid halves both end steps."""
    model, logits, path, layer, module = nets["resnet"]
    x = images(1, seed=7)
    n = 4
    alphas = {"riemann_trapezoid": np.linspace(0, 1, n), "riemann_left": np.linspace(0, 1 - 1 / n, n),
              "riemann_right": np.linspace(1 / n, 1, n),
              "riemann_middle": np.linspace(1 / (2 * n), 1 - 1 / (2 * n), n)}[rule]
    weights = np.full(n, 1 / n)
    if rule == "riemann_trapezoid":
        weights[[0, -1]] /= 2
    result = onnxcam.Explainer(path, layer=layer, method="integrated-gradients", method_options={
        "integrated-gradients": {"steps": n, "rule": rule}})(x)
    x64 = x.astype(np.float64)
    ig = x64 * sum(w * torch_pass(logits, module, a * x64, result.class_index)[0] for a, w in zip(alphas, weights))
    compare(rule, result.extras["onnxcam_attribution__integrated-gradients"], result.cam, ig, signed_map(ig))


def test_baselines_blur_and_input(nets):
    """A user baseline (graph input onnxcam_baseline, [1, ...] broadcast) and the blurred input."""
    model, logits, path, layer, module = nets["resnet"]
    x = images(2, seed=8)
    baseline = np.random.default_rng(1).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32) * 0.1
    result = onnxcam.Explainer(path, layer=layer, method="integrated-gradients", method_options={
        "integrated-gradients": {"steps": 3, "baseline": "input"}})(x, inputs={"onnxcam_baseline": baseline})
    alphas, weights = gausslegendre(3)
    x64, b64 = x.astype(np.float64), baseline.astype(np.float64)
    path_grads = [torch_pass(logits, module, b64 + a * (x64 - b64), result.class_index)[0] for a in alphas]
    ig = (x64 - b64) * sum(w * g for w, g in zip(weights, path_grads))
    compare("baseline input", result.extras["onnxcam_attribution__integrated-gradients"], result.cam, ig,
            signed_map(ig))
    with pytest.raises(onnxcam.errors.InputError, match="onnxcam_baseline"):
        onnxcam.Explainer(path, layer=layer, method="integrated-gradients", method_options={
            "integrated-gradients": {"steps": 3, "baseline": "input"}})(x)
    blurred = onnxcam.Explainer(path, layer=layer, method="integrated-gradients", method_options={
        "integrated-gradients": {"steps": 3, "baseline": "blur", "blur_sigma": 2.0}})(x)
    import cv2
    reference = np.stack([np.stack([cv2.GaussianBlur(c, (13, 13), 2.0, borderType=cv2.BORDER_REPLICATE) for c in im])
                          for im in x]).astype(np.float64)
    path_grads = [torch_pass(logits, module, reference + a * (x64 - reference), blurred.class_index)[0]
                  for a in alphas]
    ig = (x64 - reference) * sum(w * g for w, g in zip(weights, path_grads))
    # cv2's kernel is normalised in float64 like ours; the float32 Conv adds ~1e-7 per pixel
    compare("baseline blur", blurred.extras["onnxcam_attribution__integrated-gradients"], blurred.cam, ig,
            signed_map(ig))


def test_bad_options_are_named(nets):
    path, layer = nets["resnet"][2], nets["resnet"][3]
    for method, opts, message in (("integrated-gradients", {"rule": "simpson"}, "unknown integration rule"),
                                  ("integrated-gradients", {"baseline": "noise"}, "unknown baseline"),
                                  ("smoothgrad", {"samples": 0}, "samples/steps must be"),
                                  ("smoothgrad", {"noise": "file"}, "noise must be"),
                                  ("smoothgrad", {"sigma": 1}, "has no option 'sigma'")):
        with pytest.raises(onnxcam.errors.UsageError, match=message):
            onnxcam.augment(path, layer=layer, method=method, method_options={method: opts})


def test_rule_modes_change_relu_only(nets):
    """MobileNetV3-style net: Clip (ReLU6), HardSwish, HardSigmoid keep their gradient in the
    guided mode; only the Relu inside the squeeze-excite blocks changes. Checked by the reference
    (which swaps torch's ReLU only) in test_every_method_matches_its_formula; here: the modes
    differ from the plain gradient at all (the net has Relu nodes) and the docs name the ops."""
    from onnxcam.autodiff.registry import mode_overrides
    assert mode_overrides("guided") == ("Relu",) and mode_overrides("deconvnet") == ("Relu",)
    path, layer = nets["mobilenet"][2], nets["mobilenet"][3]
    result = onnxcam.Explainer(path, layer=layer, method=["gradient", "guided-backprop"])(images(2, seed=1))
    assert np.abs(result.cams["gradient"] - result.cams["guided-backprop"]).max() > 1e-3
    assert method_output(CAM_OUTPUT, "gradient") == "onnxcam_cam__gradient"


def test_signed_maps_are_overlaid_with_a_diverging_colormap(nets, tmp_path):
    """The CLI pipeline keeps signed maps in [-1, 1] (.npy) and colours them blue-white-red."""
    from onnxcam.io.overlay import colorize_signed
    from onnxcam.io.pipeline import Source, explain_sources
    import cv2
    path, layer = nets["resnet"][2], nets["resnet"][3]
    explainer = onnxcam.Explainer(path, layer=layer, method=["gradcam", "gradient"])
    assert explainer.signed_methods == ("gradient",)
    photo = (np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "photo.png"), photo)
    (tmp_path / "out").mkdir()
    records = explain_sources(explainer, [Source.from_path(tmp_path / "photo.png")], tmp_path / "out",
                              preset="unit")
    by_method = {r.method: np.load(r.npy) for r in records}
    assert by_method["gradient"].min() < -0.5 and by_method["gradient"].max() > 0.5
    assert by_method["gradcam"].min() >= 0
    colours = colorize_signed(np.array([[-1.0, 0.0, 1.0]]))[0]
    assert colours[0, 2] > colours[0, 0] and colours[2, 0] > colours[2, 2] and colours[1].min() > 200


def test_noise_variants_share_one_pass(nets):
    """smoothgrad, smoothgrad-sq and vargrad with equal options: one Loop, one noise input."""
    path, layer = nets["resnet"][2], nets["resnet"][3]
    opts = {"samples": 3, "samples_per_chunk": 1, "noise": "input"}
    model = onnxcam.augment(path, layer=layer, method=["smoothgrad", "smoothgrad-sq", "vargrad"],
                            method_options={m: opts for m in ("smoothgrad", "smoothgrad-sq", "vargrad")})
    assert sum(n.op_type == "Loop" for n in model.graph.node) == 1
    assert [i.name for i in model.graph.input if i.name.startswith("onnxcam_noise")] == ["onnxcam_noise"]


def test_fixed_batch_model_runs_one_sample_per_chunk(tmp_path):
    """A model exported with a fixed batch cannot take S*N images: one sample per chunk."""
    torch.manual_seed(0)
    model = randomise_batchnorm(TinyResNet()).eval()
    path = str(tmp_path / "fixed.onnx")
    torch.onnx.export(model, torch.randn(2, 3, SIZE, SIZE), path, opset_version=13, input_names=["input"],
                      output_names=["output"], dynamo=False)
    x = images(2, seed=9)
    noise = np.random.default_rng(3).standard_normal((3,) + x.shape).astype(np.float32)
    opts = {"samples": 3, "samples_per_chunk": 3, "noise": "input"}
    fixed = onnxcam.Explainer(path, method="smoothgrad", method_options={"smoothgrad": opts})(
        x, inputs={"onnxcam_noise": noise})
    model.double()
    sigma = noise_sigma(x.astype(np.float64), 0.15)
    grads = [torch_pass(model, model.layer3, x + sigma * n, fixed.class_index)[0] for n in noise.astype(np.float64)]
    mean = np.mean(grads, 0)
    compare("fixed batch", fixed.extras["onnxcam_attribution__smoothgrad"], fixed.cam, mean, magnitude_map(mean))
