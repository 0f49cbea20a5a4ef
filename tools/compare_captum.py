"""Check numerically that onnxcam's input-space and sampled methods equal the real captum,
pytorch-grad-cam and torchcam on the same weights.

    /work/main/.venv-reference/bin/python tools/compare_captum.py [--models resnet18,resnet50,efficientnet_lite0]
        [--json OUT.json]

Not part of CI (needs torchvision, captum, grad-cam and torchcam: tools/make_reference_venv.sh).
Models: torchvision resnet18 / resnet50 with random weights (torch.manual_seed(0); no hub weights
offline) and the real ImageNet EfficientNet-Lite0 (onnxcam's demo export), on three real photos
(skimage's chelsea, coffee, astronaut at 224x224). Each reference is run for the class onnxcam
explained (the top class), and compared with onnxcam's ``onnxcam_attribution__<method>`` output
(the attribution captum returns, [N, C, H, W]) or, for the CAMs, with the map:

  captum Saliency (abs=True / abs=False)     saliency / gradient
  captum InputXGradient                      input-x-gradient
  captum IntegratedGradients                 integrated-gradients, gausslegendre and riemann_trapezoid,
                                             same steps, zero baseline; plus the completeness residual
  captum NoiseTunnel(Saliency(abs=False))    smoothgrad / smoothgrad-sq / vargrad with captum's very
                                             noise (recorded from its torch.normal call) fed as onnxcam_noise
  captum GuidedBackprop / Deconvolution      guided-backprop / deconvnet
  captum GuidedGradCam (bilinear)            guided-gradcam: maps compared (sum over channels / max |.|),
                                             because onnxcam's Grad-CAM factor is min-max normalised
  pytorch-grad-cam GuidedBackpropReLUModel   guided-backprop
  torchcam SmoothGradCAMpp                   smooth-gradcam++ with torchcam's noise fed as onnxcam_noise;
                                             torchcam's map resized like onnxcam's pipeline

Reported: max |difference| / max |reference| per comparison. Exit status 1 above --tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

import onnxcam  # noqa: E402
from compare_pytorch_grad_cam import build, export, onnx_tensor_of  # noqa: E402

IG_STEPS = 32
NT_SAMPLES = 4
NT_STD = 0.2
CAM_SAMPLES = 4
CAM_STD = 0.3  # torchcam's default


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    top = np.max(np.abs(b))
    assert top > 0 and np.std(b) > 1e-6 * top, "degenerate reference: the comparison could not fail"
    return float(np.max(np.abs(a - b)) / top)


def signed_map(attribution):
    s = attribution.sum(1)
    return s / (np.abs(s).reshape(len(s), -1).max(1)[:, None, None] + 1e-7)


def explain(path, layer, method, x, options=None, inputs=None):
    explainer = onnxcam.Explainer(path, layer=layer, method=method, providers=["cpu"],
                                  method_options={method: options} if options else None)
    return explainer(x, inputs=inputs)


def recorded_noise(run):
    """Call run() while recording every torch.normal draw (captum's NoiseTunnel noise)."""
    draws, original = [], torch.normal

    def recording(*args, **kwargs):
        value = original(*args, **kwargs)
        draws.append(value.detach().clone())
        return value
    torch.normal = recording
    try:
        result = run()
    finally:
        torch.normal = original
    return result, draws


def replayed_noise(run, draws):
    """Call run() with torch.normal returning the recorded draws (in the caller's dtype)."""
    queue, original = list(draws), torch.normal

    def replay(mean, std, *args, **kwargs):
        value = queue.pop(0)
        assert tuple(value.shape) == tuple(std.shape)
        return value.to(std.dtype)
    torch.normal = replay
    try:
        return run()
    finally:
        torch.normal = original


class FixedNoise:
    """Stands in for torchcam's Normal distribution: hands out pre-drawn noise in order."""

    def __init__(self, tensors):
        self.tensors = list(tensors)

    def sample(self, size):
        value = self.tensors.pop(0)
        assert tuple(value.shape) == tuple(size)
        return value


PARTS = ("base", "ig", "noise", "cam")


def compare_model(name, tmp, parts=PARTS, ig_rules=("gausslegendre", "riemann_trapezoid")):
    model, module_paths, batches = build(name)
    label, x = batches[0]
    if name == "efficientnet_lite0":
        from onnxcam.demo_export import export as demo_export
        path = str(demo_export(os.path.join(tmp, f"{name}.onnx")))
        proto = onnx.load(path)
        pool = [n for n in proto.graph.node if n.op_type in ("GlobalAveragePool", "ReduceMean")][-1]
        layer = pool.input[0]
    else:
        path = os.path.join(tmp, f"{name}.onnx")
        export(model, path)
        layer = onnx_tensor_of(onnx.load(path), module_paths[-1])
    module = dict(model.named_modules())[module_paths[-1]]
    for p in model.parameters():
        p.requires_grad_(False)
    xt = torch.from_numpy(x)
    rows = []

    import copy
    model64 = copy.deepcopy(model).double()
    xt64 = xt.double()

    def row(method, reference, diff, note="", diff64=None, floor=None):
        rows.append({"model": name, "method": method, "reference": reference, "max_rel_diff": diff, "note": note,
                     "max_rel_diff_float64": diff64, "reference_float32_vs_float64": floor})
        extra = "" if diff64 is None else f" | vs float64 {diff64:.2e} | reference f32 vs f64 {floor:.2e}"
        print(f"   {method:22s} vs {reference:45s} {diff:.2e}{extra} {note}", flush=True)

    started = time.time()
    base = onnxcam.Explainer(path, layer=layer, method=["saliency", "gradient", "input-x-gradient",
                                                         "guided-backprop", "deconvnet", "guided-gradcam"],
                             providers=["cpu"])(x)
    target = torch.from_numpy(base.class_index)
    attr = lambda m: base.extras[f"onnxcam_attribution__{m}"]  # noqa: E731
    if "base" in parts:
        _base_rows(row, model, module, xt, target, base, attr)
    if "ig" in parts:
        _ig_rows(row, model, model64, path, layer, x, xt, xt64, target, ig_rules)
    if "noise" in parts:
        _noise_rows(row, model, model64, path, layer, x, xt, xt64, target)
    if "cam" in parts:
        _cam_rows(row, model, module_paths, path, layer, x, xt, base)
    print(f"   ({time.time() - started:.0f}s)", flush=True)
    return rows


def _base_rows(row, model, module, xt, target, base, attr):
    from captum.attr import Deconvolution, GuidedBackprop, GuidedGradCam, InputXGradient, Saliency
    row("saliency", "captum Saliency(abs=True)", relative(attr("saliency"), Saliency(model).attribute(
        xt.clone().requires_grad_(), target=target).numpy()))
    row("gradient", "captum Saliency(abs=False)", relative(attr("gradient"), Saliency(model).attribute(
        xt.clone().requires_grad_(), target=target, abs=False).numpy()))
    row("input-x-gradient", "captum InputXGradient", relative(attr("input-x-gradient"), InputXGradient(
        model).attribute(xt.clone().requires_grad_(), target=target).detach().numpy()))
    row("guided-backprop", "captum GuidedBackprop", relative(attr("guided-backprop"), GuidedBackprop(
        model).attribute(xt.clone().requires_grad_(), target=target).detach().numpy()))
    row("deconvnet", "captum Deconvolution", relative(attr("deconvnet"), Deconvolution(model).attribute(
        xt.clone().requires_grad_(), target=target).detach().numpy()))
    ggc = GuidedGradCam(model, module).attribute(xt.clone().requires_grad_(), target=target,
                                                 interpolate_mode="bilinear").detach().numpy()
    row("guided-gradcam", "captum GuidedGradCam (bilinear), maps", relative(base.cams["guided-gradcam"],
                                                                           signed_map(ggc)))


def _ig_rows(row, model, model64, path, layer, x, xt, xt64, target, rules):
    """Integrated Gradients, both rules, same steps, zero baseline; completeness residual."""
    from captum.attr import IntegratedGradients
    for rule in rules:
        for steps in (IG_STEPS,) + ((64,) if rule == "gausslegendre" else ()):
            ours = explain(path, layer, "integrated-gradients", x, {"steps": steps, "rule": rule,
                                                                     "samples_per_chunk": 8})
            reference, delta = IntegratedGradients(model).attribute(
                xt.clone(), target=target, n_steps=steps, method=rule, internal_batch_size=32,
                return_convergence_delta=True)
            with torch.no_grad():
                s_x = model(xt).gather(1, target[:, None])[:, 0].numpy()
                s_0 = model(torch.zeros_like(xt)).gather(1, target[:, None])[:, 0].numpy()
            diff64 = floor = None
            if steps == IG_STEPS:  # the same quadrature in float64: how much of the difference is float32's
                reference64 = IntegratedGradients(model64).attribute(
                    xt64.clone(), target=target, n_steps=steps, method=rule, internal_batch_size=32).numpy()
                diff64 = relative(ours.extras["onnxcam_attribution__integrated-gradients"], reference64)
                floor = relative(reference.detach().numpy(), reference64)
            residual = ours.extras["onnxcam_completeness__integrated-gradients"]
            note = (f"completeness residual / |S(x)-S(0)|: onnxcam {np.max(np.abs(residual) / np.abs(s_x - s_0)):.2e}, "
                    f"captum {np.max(np.abs(delta.numpy()) / np.abs(s_x - s_0)):.2e}")
            row("integrated-gradients", f"captum IntegratedGradients {rule} {steps}",
                relative(ours.extras["onnxcam_attribution__integrated-gradients"], reference.detach().numpy()), note,
                diff64, floor)


def _noise_rows(row, model, model64, path, layer, x, xt, xt64, target):
    """NoiseTunnel: captum draws the noise; we feed the same standard normal noise."""
    from captum.attr import NoiseTunnel, Saliency
    n = len(x)
    for nt_type, method in (("smoothgrad", "smoothgrad"), ("smoothgrad_sq", "smoothgrad-sq"),
                            ("vargrad", "vargrad")):
        reference, draws = recorded_noise(lambda: NoiseTunnel(Saliency(model)).attribute(
            xt.clone().requires_grad_(), nt_type=nt_type, nt_samples=NT_SAMPLES, stdevs=NT_STD, target=target,
            abs=False))
        noise = torch.cat(draws).numpy().reshape(n, NT_SAMPLES, *x.shape[1:]).transpose(1, 0, 2, 3, 4) / NT_STD
        ours = explain(path, layer, method, x, {"samples": NT_SAMPLES, "noise_std": NT_STD, "noise": "input"},
                       {"onnxcam_noise": np.ascontiguousarray(noise, np.float32)})
        reference64 = replayed_noise(lambda: NoiseTunnel(Saliency(model64)).attribute(
            xt64.clone().requires_grad_(), nt_type=nt_type, nt_samples=NT_SAMPLES, stdevs=NT_STD, target=target,
            abs=False), draws).detach().numpy()
        got = ours.extras[f"onnxcam_attribution__{method}"]
        row(method, f"captum NoiseTunnel({nt_type}) over Saliency(abs=False)",
            relative(got, reference.detach().numpy()), "", relative(got, reference64),
            relative(reference.detach().numpy(), reference64))



def _cam_rows(row, model, module_paths, path, layer, x, xt, base):
    """torchcam's SmoothGradCAMpp with our noise; pytorch-grad-cam's GuidedBackpropReLUModel."""
    import cv2
    from pytorch_grad_cam import GuidedBackpropReLUModel
    from torchcam.methods import SmoothGradCAMpp
    noise = np.random.default_rng(0).standard_normal((CAM_SAMPLES,) + x.shape).astype(np.float32)
    for p in model.parameters():
        p.requires_grad_(True)
    with SmoothGradCAMpp(model, module_paths[-1], num_samples=CAM_SAMPLES, std=CAM_STD,
                         input_shape=x.shape[1:]) as extractor:
        extractor._distrib = FixedNoise([torch.from_numpy(e * CAM_STD) for e in noise])
        model(xt)
        cams = extractor(class_idx=[int(c) for c in base.class_index])[0].detach().numpy()
    for p in model.parameters():
        p.requires_grad_(False)
    ours = explain(path, layer, "smooth-gradcam++", x, {"samples": CAM_SAMPLES, "noise_std": CAM_STD,
                                                         "noise": "input"}, {"onnxcam_noise": noise})
    resized = []
    for cam in cams:  # torchcam's [0, 1] layer map through onnxcam's pipeline: resize, min-max
        up = cv2.resize(np.float32(cam), (x.shape[3], x.shape[2]))
        up = up - up.min()
        resized.append(up / (up.max() + 1e-7))
    row("smooth-gradcam++", "torchcam SmoothGradCAMpp (maps)", relative(ours.cam, np.stack(resized)))
    # last: GuidedBackpropReLUModel swaps the model's ReLU modules (and puts fresh ones back)
    guided_model = GuidedBackpropReLUModel(model=model, device=torch.device("cpu"))
    pgc = np.stack([guided_model(xt[i:i + 1].clone(), target_category=int(c)).transpose(2, 0, 1)
                    for i, c in enumerate(base.class_index)])
    attribution = base.extras["onnxcam_attribution__guided-backprop"]
    row("guided-backprop", "pytorch-grad-cam GuidedBackpropReLUModel", relative(attribution, pgc))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50,efficientnet_lite0")
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--parts", default=",".join(PARTS), help="base (single gradients), ig, noise, cam")
    parser.add_argument("--ig-rules", default="gausslegendre,riemann_trapezoid")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
    import captum
    from importlib.metadata import version
    versions = {"torch": torch.__version__, "captum": captum.__version__, "grad-cam": version("grad-cam"),
                "torchcam": version("torchcam"), "onnxcam": onnxcam.__version__}
    print("versions:", versions)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            print(f"\n== {name}", flush=True)
            rows += compare_model(name, tmp, args.parts.split(","), args.ig_rules.split(","))
    print("\n| model | onnxcam method | reference | max |diff| / max |ref| | vs the reference in float64 | "
          "reference float32 vs float64 | note |")
    print("| --- | --- | --- | --- | --- | --- | --- |")

    def fmt(v):
        return "" if v is None else f"{v:.1e}"
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['reference']} | {r['max_rel_diff']:.1e} | "
              f"{fmt(r['max_rel_diff_float64'])} | {fmt(r['reference_float32_vs_float64'])} | {r['note']} |")
    failed = [r for r in rows if not r["max_rel_diff"] <= args.tolerance]
    print(f"\n{len(rows) - len(failed)} within {args.tolerance:g}, {len(failed)} above")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": versions, "rows": rows}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
