"""A sweep over timm architectures: onnxcam's gradient and Grad-CAM against torch and pytorch-grad-cam.

    /work/main/.venv-reference/bin/python tools/timm_zoo.py [--archs resnet18,vit_tiny...] \
        [--exporters legacy17,dynamo18] [--json docs/timm-zoo.json] [--markdown docs/timm-zoo.md]

Runs in the reference venv (torch, timm installed with --no-deps, pytorch-grad-cam, onnxscript for
the dynamo exporter); imports onnxcam from this checkout. Not part of CI.

For every architecture: timm.create_model(pretrained=False) with torch.manual_seed(0), then every
parameter that initialisation leaves at (or near) zero is perturbed — heads, the zero-init last
BatchNorm gammas of residual blocks, layer scales (1e-5, 1e-6) — or the comparison would be
vacuous (a zero head gives zero gradients everywhere; a 1e-6 layer scale makes every block the
identity). The model is exported by torch's legacy exporter (opset 17) and by the dynamo exporter
(opset 18), dynamic batch. The target is pytorch-grad-cam's recommended layer (its README's
blocks[-1].norm1 for ViT/Swin; the last stage/block before pooling elsewhere) with its
reshape_transform; the ONNX tensor of that module is found by value (the earliest tensor equal to a
forward hook's output). Checked on two photos (skimage's chelsea and astronaut, ImageNet mean/std):
  grad  the gradient of the top logit at the target, onnxcam (vjp mode) vs torch autograd
        (max |diff| / max |torch|),
  cam   onnxcam's Grad-CAM on that tensor vs pytorch-grad-cam's GradCAM on the module, for the
        class onnxcam explained (max |diff| of the [0, 1] maps; the reference must peak > 0.5),
  auto  whether onnxcam.layers()' automatic choice is the recommended tensor, and whether
        Explainer(model) with everything automatic runs and gives a finite map.
A row passes when grad <= 1e-4 (relative), cam <= 1e-3, the reference peaks above 0.5 and the
automatic explainer runs; "pass (flat map)" when activation and gradient agree but the raw map is
nearly flat (spread (max - min) / max |.| < 1e-2), so that min-max scaling amplifies float32
rounding beyond 1e-3, and the difference stays within 10 x (activation + gradient error + 1e-6)
/ spread. Results accumulate in --json (archs already there are skipped; --rerun to redo some),
and --markdown is rewritten from it.
Each architecture runs in a child process (a crash or a hang is a failed row, not a dead sweep).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GRAD_TOLERANCE = 1e-4
CAM_TOLERANCE = 1e-3
MAX_IR_VERSION = 10

# name: (timm kwargs, input size, target module, layout of its output, extra tokens)
ARCHS = {
    "resnet18": ({}, 96, "layer4.-1", "NCHW", 0),
    "resnet50": ({}, 96, "layer4.-1", "NCHW", 0),
    "efficientnet_b0": ({}, 96, "bn2", "NCHW", 0),
    "mobilenetv3_large_100": ({}, 96, "blocks.-1", "NCHW", 0),
    "mobilenetv3_small_100": ({}, 96, "blocks.-1", "NCHW", 0),
    "regnetx_002": ({}, 96, "final_conv", "NCHW", 0),
    "densenet121": ({}, 64, "features.norm5", "NCHW", 0),
    "ghostnet_100": ({}, 96, "blocks.-1", "NCHW", 0),
    "convnext_atto": ({}, 96, "stages.-1", "NCHW", 0),
    "convnextv2_atto": ({}, 96, "stages.-1", "NCHW", 0),
    "edgenext_xx_small": ({}, 96, "stages.-1", "NCHW", 0),
    "mobilevit_xxs": ({}, 96, "final_conv", "NCHW", 0),
    "poolformer_s12": ({}, 96, "stages.-1", "NCHW", 0),
    "convformer_s18": ({}, 96, "stages.-1", "NCHW", 0),
    "caformer_s18": ({}, 96, "stages.-1", "NCHW", 0),
    "vit_tiny_patch16_224": ({"img_size": 96}, 96, "blocks.-1.norm1", "tokens", 1),
    "deit_tiny_patch16_224": ({"img_size": 96}, 96, "blocks.-1.norm1", "tokens", 1),
    "deit_tiny_distilled_patch16_224": ({"img_size": 96}, 96, "blocks.-1.norm1", "tokens", 2),
    "swin_tiny_patch4_window7_224": ({"img_size": 64, "window_size": 2}, 64, "layers.-1.blocks.-1.norm1", "NHWC", 0),
    "levit_128s": ({}, 224, "stages.-1.blocks.-1", "tokens", 0),
    "levit_conv_128s": ({}, 224, "stages.-1.blocks.-1", "NCHW", 0),
    "efficientformer_l1": ({}, 224, "stages.-1.blocks.-1.norm1", "tokens", 0),
    "efficientformerv2_s0": ({}, 224, "stages.-1", "NCHW", 0),
    "pvt_v2_b0": ({}, 96, "stages.-1.blocks.-1.norm1", "tokens", 0),
    "resmlp_12_224": ({}, 224, "blocks.-1.norm1", "tokens", 0),
    "cait_xxs24_224": ({"img_size": 96}, 96, "blocks.-1.norm1", "tokens", 0),
    "coat_lite_tiny": ({}, 224, "serial_blocks4.-1.norm1", "tokens", 1),
    "twins_svt_small": ({}, 96, "blocks.-1.-1.norm1", "tokens", 0),
    "beit_base_patch16_224": ({"img_size": 96}, 96, "blocks.-1.norm1", "tokens", 1),
    "mixer_s16_224": ({}, 224, "blocks.-1.norm1", "tokens", 0),
    "gmlp_s16_224": ({}, 224, "blocks.-1.norm", "tokens", 0),
    "xcit_nano_12_p16_224": ({"img_size": 96}, 96, "blocks.-1.norm1", "tokens", 0),
    "fastvit_t8": ({}, 96, "final_conv", "NCHW", 0),
    "repvit_m0_9": ({}, 96, "stages.-1", "NCHW", 0),
    "efficientvit_b0": ({}, 96, "stages.-1", "NCHW", 0),
    "mobilevitv2_050": ({}, 96, "stages.-1", "NCHW", 0),
    "repvgg_a0": ({}, 96, "stages.-1", "NCHW", 0),
    "cspdarknet53": ({}, 96, "stages.-1", "NCHW", 0),
    "inception_v3": ({}, 160, "Mixed_7c", "NCHW", 0),
    "tiny_vit_5m_224": ({}, 224, "stages.-1", "NCHW", 0),
}
DEFAULT_ORDER = ["resnet18", "efficientnet_b0", "mobilenetv3_large_100", "convnext_atto", "vit_tiny_patch16_224",
                 "deit_tiny_distilled_patch16_224", "swin_tiny_patch4_window7_224", "levit_128s", "efficientformer_l1",
                 "pvt_v2_b0", "caformer_s18", "resmlp_12_224", "cait_xxs24_224", "mobilenetv3_small_100",
                 "resnet50", "regnetx_002", "densenet121", "ghostnet_100", "convnextv2_atto", "edgenext_xx_small",
                 "mobilevit_xxs", "poolformer_s12", "convformer_s18", "deit_tiny_patch16_224", "levit_conv_128s",
                 "efficientformerv2_s0", "coat_lite_tiny", "twins_svt_small", "mixer_s16_224", "beit_base_patch16_224",
                 "gmlp_s16_224", "xcit_nano_12_p16_224", "fastvit_t8", "repvit_m0_9", "efficientvit_b0",
                 "mobilevitv2_050", "repvgg_a0", "cspdarknet53", "inception_v3", "tiny_vit_5m_224"]


# ---------------------------------------------------------------------- model and inputs
def build(name):
    import timm
    import torch

    kwargs, size, target, layout, extra = ARCHS[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    perturbed = perturb_vacuous_parameters(model)
    return model, size, target, layout, extra, perturbed


def perturb_vacuous_parameters(model, seed: int = 1) -> list:
    """Give parameters that initialisation leaves at (or near) zero values that matter: scales
    (1-D: norm gammas, layer scales) around 1, weights (heads) like a random init."""
    import torch

    g = torch.Generator().manual_seed(seed)
    changed = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point() or p.numel() == 0 or float(p.abs().max()) >= 1e-2:
                continue
            if name.endswith("bias"):
                continue  # zero biases are ordinary
            if p.dim() == 1 or "gamma" in name or "scale" in name:
                p.copy_((torch.rand(p.shape, generator=g) * 0.5 + 0.5) * (0.3 if "gamma" in name or "ls" in name else 1))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p.shape[-1]) ** 0.5))
            changed.append(name)
    return changed


def module_at(model, path: str):
    module = model
    for part in path.split("."):
        module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
    return module


def photos(size: int):
    import cv2
    import numpy as np
    from skimage import data

    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    out = []
    for img in (data.chelsea(), data.astronaut()):
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        out.append(((img - mean) / std).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


def reshape_transform(layout: str, extra: int):
    """pytorch-grad-cam's reshape_transform for the target's layout (its ViT/Swin recipes)."""
    if layout == "NCHW":
        return None
    if layout == "NHWC":
        return lambda t: t.permute(0, 3, 1, 2)

    def tokens(t):
        n, count, c = t.shape
        side = int(round((count - extra) ** 0.5))
        return t[:, extra:, :].reshape(n, side, side, c).permute(0, 3, 1, 2)
    return tokens


# ---------------------------------------------------------------------- export
def export(model, size, path, exporter):
    import onnx
    import torch

    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        if exporter == "legacy17":
            torch.onnx.export(model, (x,), path, opset_version=17, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
        else:
            batch = torch.export.Dim("batch", min=1, max=64)
            try:
                torch.onnx.export(model, (x,), path, opset_version=18, dynamo=True, input_names=["input"],
                                  output_names=["logits"], dynamic_shapes=({0: batch},), optimize=True)
            except Exception:
                torch.onnx.export(model, (x,), path, opset_version=18, dynamo=True, input_names=["input"],
                                  output_names=["logits"], optimize=True)  # static batch of 2
    proto = onnx.load(path)
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    onnx.save(proto, path)
    return path


def find_tensor(path, x, wanted):
    """The earliest ONNX tensor (graph order) holding the module's output for `x`."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    proto = onnx.load(path)
    names = [o for n in proto.graph.node for o in n.output if o]
    existing = {o.name for o in proto.graph.output}
    for name in names:
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    values = session.run(None, {session.get_inputs()[0].name: x})
    scale = float(np.max(np.abs(wanted))) + 1e-12
    for name in names:
        v = values[outputs.index(name)]
        if isinstance(v, np.ndarray) and v.shape == wanted.shape and v.dtype == np.float32:
            if float(np.max(np.abs(v - wanted))) / scale <= 1e-4:
                return name
    return None


# ---------------------------------------------------------------------- one architecture
def torch_reference(model, module, x):
    import torch

    store = {}
    handle = module.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        xt = torch.from_numpy(x)
        logits = model(xt)
        store["a"].retain_grad()
        top = logits.argmax(1)
        logits.gather(1, top[:, None]).sum().backward()
    finally:
        handle.remove()
    return store["a"].detach().numpy(), store["a"].grad.numpy(), top.numpy(), logits.detach().numpy()


def onnxcam_gradient(path, tensor, x, classes, n_classes):
    """The gradient of the chosen logits at `tensor`, by onnxcam's vjp mode."""
    import numpy as np
    import onnxruntime as ort

    import onnxcam
    augmented = onnxcam.augment(path, layer=tensor, vjp=True)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(augmented.SerializeToString(), options, providers=["CPUExecutionProvider"])
    seed = np.zeros((len(x), n_classes), np.float32)
    seed[np.arange(len(x)), classes] = 1
    feeds = {"input": x}
    for i in session.get_inputs():
        if i.name not in feeds:
            feeds[i.name] = seed
    act, grad = session.run(["onnxcam_activation", "onnxcam_gradient"], feeds)
    return act, grad


def check_export(name, exporter, model, size, target, layout, extra, tmp):
    import numpy as np
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    import onnxcam

    row = {"arch": name, "exporter": exporter, "target": target, "layout": layout}
    started = time.time()
    path = os.path.join(tmp, f"{name}-{exporter}.onnx")
    try:
        export(model, size, path, exporter)
    except Exception as exc:
        row.update(status="export failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        return row
    row["export_s"] = round(time.time() - started, 1)
    x = photos(size)
    module = module_at(model, target)
    act, grad, top, logits = torch_reference(model, module, x)
    tensor = find_tensor(path, x, act)
    row["tensor"] = tensor
    if tensor is None:
        row.update(status="target not found", error="no ONNX tensor equals the module's output")
        return row
    try:
        auto = [l for l in onnxcam.layers(path) if l.auto]
        row["auto"] = auto[0].name if auto else None
        row["auto_reason"] = auto[0].reason if auto else None
        row["auto_matches"] = bool(auto) and auto[0].name == tensor
        act_o, grad_o = onnxcam_gradient(path, tensor, x, top, logits.shape[1])
        row["act_rel"] = float(np.max(np.abs(act_o - act)) / (np.max(np.abs(act)) + 1e-12))
        row["grad_rel"] = float(np.max(np.abs(grad_o - grad)) / (np.max(np.abs(grad)) + 1e-12))
        result = onnxcam.Explainer(path, layer=tensor, method="gradcam", providers=["cpu"])(x)
        with GradCAM(model=model, target_layers=[module], reshape_transform=reshape_transform(layout, extra)) as cam:
            reference = cam(input_tensor=torch.from_numpy(x),
                            targets=[ClassifierOutputTarget(int(c)) for c in result.class_index])
        row["reference_peak"] = float(reference.reshape(len(x), -1).max(1).min())
        row["cam_diff"] = float(np.max(np.abs(result.cam - reference)))
        to_nchw = reshape_transform(layout, extra) or (lambda t: t)
        a4, g4 = (to_nchw(torch.from_numpy(v)).numpy() for v in (act, grad))
        row["map_spread"] = map_spread(a4, g4)
        if np.all(result.class_index == top):  # the same formula on ONNX Runtime's own A and G
            o4, og4 = (to_nchw(torch.from_numpy(v)).numpy() for v in (act_o, grad_o))
            row["cam_vs_formula_on_ort"] = float(np.max(np.abs(result.cam - gradcam_formula(o4, og4, x.shape[2:]))))
        row["classes_agree"] = bool(np.all(result.class_index == top))
        try:
            automatic = onnxcam.Explainer(path, providers=["cpu"])(x)
            row["auto_runs"] = bool(np.all(np.isfinite(automatic.cam)))
        except Exception as exc:
            row["auto_runs"] = False
            row["auto_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    except Exception as exc:
        row.update(status="onnxcam failed", error=f"{type(exc).__name__}: {str(exc)[:300]}",
                   trace=traceback.format_exc()[-1500:])
        return row
    exact = row["grad_rel"] <= GRAD_TOLERANCE and row["reference_peak"] > 0.5 and row["auto_runs"]
    if exact and row["cam_diff"] <= CAM_TOLERANCE:
        row["status"] = "pass"
    elif exact and row["act_rel"] <= GRAD_TOLERANCE and row["map_spread"] < 1e-2 and row["cam_diff"] <= (
            10 * (row["act_rel"] + row["grad_rel"] + 1e-6) / row["map_spread"]):
        # A and G agree with torch to float32 rounding, but the raw map is nearly flat: min-max
        # scaling amplifies that rounding by 1 / spread (also between two ORT sessions of one model).
        row["status"] = "pass (flat map)"
    else:
        row["status"] = "FAIL"
    row["seconds"] = round(time.time() - started, 1)
    return row


def gradcam_formula(A, G, input_hw):
    """pytorch-grad-cam's GradCAM pipeline in numpy (one layer): weights, relu, scale, resize, scale."""
    import cv2
    import numpy as np

    cams = np.maximum((G.mean(axis=(2, 3))[:, :, None, None] * A).sum(axis=1), 0)
    out = []
    for cam in cams:
        cam = cam - cam.min()
        cam = cv2.resize(np.float32(cam / (1e-7 + cam.max())), (input_hw[1], input_hw[0]))
        cam = cam - cam.min()
        out.append(cam / (1e-7 + cam.max()))
    return np.float32(out)


def map_spread(A, G) -> float:
    """(max - min) / max |.| of the raw Grad-CAM map, the smallest over the batch: a map with a
    spread of 1e-3 turns float32 rounding of A (1e-7 relative) into 1e-4 after min-max scaling."""
    import numpy as np

    raw = (G.mean(axis=(2, 3))[:, :, None, None] * A).sum(axis=1)
    flat = raw.reshape(len(raw), -1)
    return float(np.min((flat.max(1) - flat.min(1)) / (np.abs(flat).max(1) + 1e-30)))


def run_one(name, exporters, out_json):
    import torch
    torch.set_num_threads(1)
    rows = []
    model, size, target, layout, extra, perturbed = build(name)
    with tempfile.TemporaryDirectory() as tmp:
        for exporter in exporters:
            row = check_export(name, exporter, model, size, target, layout, extra, tmp)
            row["perturbed"] = len(perturbed)
            row["size"] = size
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
    with open(out_json, "w") as f:
        json.dump(rows, f)


# ---------------------------------------------------------------------- the sweep
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(DEFAULT_ORDER))
    parser.add_argument("--exporters", default="legacy17,dynamo18")
    parser.add_argument("--json", default=os.path.join(ROOT, "docs", "timm-zoo.json"))
    parser.add_argument("--markdown", default=os.path.join(ROOT, "docs", "timm-zoo.md"))
    parser.add_argument("--budget", type=float, default=40 * 60, help="seconds; stop starting new archs after it")
    parser.add_argument("--per-arch-timeout", type=float, default=600)
    parser.add_argument("--rerun", default="", help="comma-separated archs to run again even if recorded")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    exporters = args.exporters.split(",")
    if args.one:
        run_one(args.one, exporters, args.out)
        return 0
    rows = _load(args.json)
    again = set(filter(None, args.rerun.split(",")))
    done = {(r["arch"], r["exporter"]) for r in rows if r["arch"] not in again}
    started = time.time()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for name in args.archs.split(","):
        if all((name, e) in done for e in exporters):
            continue
        if time.time() - started > args.budget:
            print(f"budget spent: {name} and later not run", flush=True)
            break
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        try:
            child = subprocess.run([sys.executable, __file__, "--one", name, "--exporters", args.exporters,
                                    "--out", out], env=env, timeout=args.per_arch_timeout, capture_output=True,
                                   text=True)
            new = json.load(open(out)) if os.path.getsize(out) else []
            if not new:
                tail = (child.stderr or "").strip().splitlines()[-1:] or ["(no output)"]
                new = [{"arch": name, "exporter": e, "status": "crashed", "error": tail[0][:300]} for e in exporters]
        except subprocess.TimeoutExpired:
            new = [{"arch": name, "exporter": e, "status": "timeout"} for e in exporters]
        finally:
            os.unlink(out)
        for r in new:
            print(f"{r['arch']:34s} {r['exporter']:9s} {r['status']:14s} grad {_f(r.get('grad_rel'))} "
                  f"cam {_f(r.get('cam_diff'))} auto {'=' if r.get('auto_matches') else '!='} {r.get('error', '')}",
                  flush=True)
        rows = [r for r in rows if r["arch"] != name] + new
        _save(args.json, rows)
        write_markdown(args.markdown, rows)
    write_markdown(args.markdown, rows)
    passed = sum(r["status"].startswith("pass") for r in rows)
    print(f"{passed}/{sum(r['status'] != 'export failed' for r in rows)} exports pass")
    return 0


def _plain(text: str) -> str:
    """Without the terminal colour codes torch puts in its messages."""
    import re
    return re.sub(r"\x1b\[[0-9;]*m|\[[0-9;]*m", "", text)


def _f(v):
    return "   -    " if v is None else f"{v:.1e}"


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return []


def _save(path, rows):
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


def write_markdown(path, rows):
    import onnx
    import onnxruntime
    import timm
    import torch
    exported = [r for r in rows if r["status"] != "export failed"]
    passed = sum(r["status"].startswith("pass") for r in rows)
    flat = sum(r["status"] == "pass (flat map)" for r in rows)
    auto = sum(bool(r.get("auto_matches")) for r in exported)
    lines = ["# onnxcam on timm architectures",
             "",
             f"Made by `tools/timm_zoo.py` (torch {torch.__version__}, timm {timm.__version__}, onnx {onnx.__version__}, "
             f"onnxruntime {onnxruntime.__version__}): seeded weights with zero-initialised parameters perturbed, "
             "two photos, pytorch-grad-cam's recommended layer and reshape_transform. "
             f"grad: max |onnxcam - torch| / max |torch| of the gradient at the target (pass <= {GRAD_TOLERANCE:g}); "
             f"cam: max |diff| of the Grad-CAM maps in [0, 1] (pass <= {CAM_TOLERANCE:g}); auto: onnxcam's automatic "
             "layer is the recommended tensor (=) or another (!=), and the all-automatic explainer runs.",
             "",
             "A row whose maps differ by more than that passes as *flat map* only when activation and gradient "
             "agree with torch (<= 1e-4), the raw map is nearly flat (spread = (max - min) / max |.| < 1e-2) and "
             "the difference is within 10 x (activation error + gradient error + 1e-6) / spread: min-max scaling "
             "of a nearly flat map amplifies float32 rounding by about 1 / spread (seeded weights make the last "
             "tokens of some models almost alike).",
             "",
             f"**{passed} of {len(exported)} exports pass** ({passed - flat} within {CAM_TOLERANCE:g}, {flat} as "
             f"flat maps) over {len({r['arch'] for r in rows})} architectures; exports that failed in torch's "
             f"exporter, not counted: {len(rows) - len(exported)}. The automatic layer is the recommended one in "
             f"{auto} of {len(exported)}.",
             "",
             "| arch | exporter | input | target | grad | cam | spread | auto | status |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["arch"], r["exporter"])):
        automatic = "-" if "auto_matches" not in r else ("=" if r["auto_matches"] else "!=") + (
            "" if r.get("auto_runs", True) else " (fails)")
        status = r["status"] + (f": {_plain(r['error'])}" if r.get("error") else "")
        lines.append(f"| {r['arch']} | {r['exporter']} | {r.get('size', '')} | {r.get('target', '')} | "
                     f"{_f(r.get('grad_rel'))} | {_f(r.get('cam_diff'))} | {_f(r.get('map_spread'))} | {automatic} | {status.replace('|', '/')} |")
    differ = [r for r in sorted(rows, key=lambda r: (r["arch"], r["exporter"])) if "auto_matches" in r
              and not r["auto_matches"]]
    if differ:
        lines += ["", "## Where the automatic layer is not the recommended one", "",
                  "| arch | exporter | recommended tensor | automatic tensor | onnxcam's reason |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['arch']} | {r['exporter']} | `{r.get('tensor')}` | `{r.get('auto')}` | "
                  f"{(r.get('auto_reason') or '').replace('|', '/')} |" for r in differ]
    failed = [r for r in rows if not r["status"].startswith("pass")]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- {r['arch']} ({r['exporter']}): {r['status']}: {_plain(r.get('error') or r.get('auto_error') or '')}"
                  for r in sorted(failed, key=lambda r: (r["arch"], r["exporter"]))]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
