"""One command, one run, one table: what an explanation costs with onnxcam, and with PyTorch.

    python tools/bench.py [--out DIR] [--quick] [--models resnet50,vgg16,...] [--threads 2]

For each model (ResNet-50, VGG16, EfficientNet-Lite0, MobileNetV3-Large; see bench_models.py) at
batch 1 and 8, 224x224, it times in one ONNX Runtime setting (intra-op threads fixed):
  * plain inference of the exported model,
  * the onnxcam-augmented model for every method (last feature map; ResNet-50 also at layer3),
  * when installed, pytorch-grad-cam GradCAM / GradCAM++ / ScoreCAM and captum LayerGradCam on
    the same torch module whose export ONNX Runtime runs (logits are compared to prove it); captum
    Saliency and IntegratedGradients (32 steps, internal_batch_size 32) when onnxcam's saliency /
    integrated-gradients are among the methods.
ONNX Runtime sessions of one model are timed round-robin (plain, then each augmented model, in
turn, run after run), so a neighbour's load on a shared machine hits all of them alike; the
ratio "x plain" compares medians. Peak RSS is measured per configuration in a fresh subprocess
(VmHWM of a child that loads the session, or builds the torch explainer, and runs it); "RSS x
plain" divides it by plain inference's at the same batch N, "RSS x plain@eff" by plain
inference's at the configuration's effective batch (the rows one pass pushes through the network
at once: samples per chunk x N for sampled methods, e.g. integrated-gradients:samples_per_chunk=8;
chunk_size for Score-CAM and Group-CAM, which re-run the whole network; see effective_batch), also measured in a fresh child.
--methods takes options as "method:option=value" (one configuration each).
PyTorch explainers are timed in that same child. The CUDA provider (and torch's CUDA device) is
used when it loads.

Results: a table on stdout, and DIR/bench.csv, DIR/bench.json (rows plus the machine).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)  # run from a checkout without installing

ALL_MODELS = ("efficientnet_lite0", "mobilenetv3_large", "resnet50", "vgg16")  # small first
QUICK_MODEL = "mobilenetv3_large"
IMAGE = 224
OPSET = 13
MAX_IR_VERSION = 8
# PyTorch explainers, and the onnxcam method each is compared with.
TORCH_EXPLAINERS = {
    "GradCAM": ("pytorch-grad-cam", "gradcam"),
    "GradCAM++": ("pytorch-grad-cam", "gradcam++"),
    "ScoreCAM": ("pytorch-grad-cam", "scorecam"),
    "AblationCAM": ("pytorch-grad-cam", "ablationcam"),
    "EigenCAM": ("pytorch-grad-cam", "eigencam"),
    "LayerGradCam": ("captum", "gradcam"),
    "Saliency": ("captum", "saliency"),
    "IntegratedGradients": ("captum", "integrated-gradients"),  # 32 steps, internal_batch_size 32
    "forward": ("torch", None),  # plain eager inference: how much of the gap is the engine, not the method
}
IG_STEPS = 32  # integrated-gradients: onnxcam's default steps, and captum's n_steps
# Explainers too slow for many runs: ScoreCAM and AblationCAM do one forward pass per channel of
# the target (pytorch-grad-cam: of the whole network; onnxcam's Ablation-CAM re-runs only the
# part after the layer). Both sides score 32 masked copies per forward (RERUN_BATCH): the same
# number of masks per batch. Slow methods run at batch 1 only, outside the round-robin.
SLOW_EXPLAINERS = {"ScoreCAM", "AblationCAM"}
SLOW_METHODS = {"scorecam", "ablationcam", "groupcam"}
RERUN_BATCH = 32
# Extra onnxcam configurations "method:option=value": Score-CAM's peak memory for two chunk sizes.
EXTRA_CONFIGS = ("scorecam:chunk_size=8", "scorecam:chunk_size=128")


# ====================================================================== helpers
def _summary(times):
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "runs": len(times)}


def _peak_rss_mb():
    """This process's peak resident set. On Linux VmHWM, not ru_maxrss: the kernel carries
    ru_maxrss across fork+exec, so a child of a big parent reports at least the parent's RSS."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _session(path_or_bytes, threads, providers, profile_prefix=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if isinstance(path_or_bytes, str):  # augmented models: the settings onnxcam's README recommends
        import onnx
        from onnxcam.runtime import tune_session_options
        tune_session_options(onnx.load(path_or_bytes, load_external_data=False), options)
    return ort.InferenceSession(path_or_bytes, options, providers=providers)


def _images(batch, seed=0):
    import numpy as np
    return np.random.RandomState(seed).standard_normal((batch, 3, IMAGE, IMAGE)).astype(np.float32)


def machine():
    info = {"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            models = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        info["cpu"] = models[0] if models else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        with open("/proc/meminfo") as f:
            info["mem_gb"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
    except (OSError, ValueError, IndexError):
        pass
    import onnxruntime as ort
    info["onnxruntime"] = ort.__version__
    for mod, key in (("torch", "torch"), ("pytorch_grad_cam", "pytorch_grad_cam"), ("captum", "captum"),
                     ("onnx", "onnx")):
        try:
            module = __import__(mod)
            info[key] = getattr(module, "__version__", "installed")
        except ImportError:
            info[key] = None
    if info["pytorch_grad_cam"] == "installed":
        try:
            from importlib.metadata import version
            info["pytorch_grad_cam"] = version("grad-cam")
        except Exception:
            pass
    import onnxcam
    info["onnxcam"] = onnxcam.__version__
    return info


def _feeds(session, x):
    """The image, and the automatic value (-1: the top class) for an augmented model's class input."""
    import numpy as np

    feeds = {session.get_inputs()[0].name: x}
    if any(i.name == "onnxcam_class" for i in session.get_inputs()):
        feeds["onnxcam_class"] = np.full(x.shape[0], -1, np.int64)
    return feeds


# ====================================================================== children (fresh processes)
def child_main(spec):
    """Run one configuration in this fresh process and print a JSON line: times (torch) and peak RSS."""
    if spec["kind"] == "ort":
        session = _session(spec["model"], spec["threads"], spec["providers"])
        feeds = _feeds(session, _images(spec["batch"]))
        times = []
        for i in range(spec["warmup"] + spec["runs"]):
            start = time.perf_counter()
            session.run(None, feeds)
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - start)
        result = _summary(times)
    else:
        result = _torch_explainer_child(spec)
    result["rss_mb"] = _peak_rss_mb()
    print("BENCH-CHILD " + json.dumps(result), flush=True)


def _torch_explainer_child(spec):
    import torch
    from bench_models import MODELS, module_at

    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    model = MODELS[spec["model"]].build().to(device)
    layer = module_at(model, MODELS[spec["model"]].targets[spec["target"]])
    explain = _torch_explainer(spec["explainer"], model, layer)
    x = torch.from_numpy(_images(spec["batch"])).to(device)
    times = []
    for i in range(spec["warmup"] + spec["runs"]):
        start = time.perf_counter()
        explain(x)
        if device != "cpu":
            torch.cuda.synchronize()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - start)
    return _summary(times)


def _torch_explainer(name, model, layer):
    """A callable x -> CAM [N, H, W] in [0, 1] for the top class, as a user would write it."""
    import torch

    if name == "forward":
        def forward(x):
            with torch.no_grad():
                return model(x).cpu().numpy()
        return forward

    if name in ("GradCAM", "GradCAM++", "ScoreCAM", "AblationCAM", "EigenCAM"):
        import pytorch_grad_cam as pgc
        cls = {"GradCAM": pgc.GradCAM, "GradCAM++": pgc.GradCAMPlusPlus, "ScoreCAM": pgc.ScoreCAM,
               "AblationCAM": pgc.AblationCAM, "EigenCAM": pgc.EigenCAM}[name]
        cam = cls(model=model, target_layers=[layer], **({"batch_size": RERUN_BATCH} if name == "AblationCAM" else {}))
        if name == "ScoreCAM":
            cam.batch_size = RERUN_BATCH  # (ScoreCAM reads this attribute; 16 without it)
        return lambda x: cam(input_tensor=x, targets=None)

    if name in ("Saliency", "IntegratedGradients"):  # attributions at the input, for the top class
        from captum.attr import IntegratedGradients, Saliency
        method = Saliency(model) if name == "Saliency" else IntegratedGradients(model)
        options = {} if name == "Saliency" else {"n_steps": IG_STEPS, "internal_batch_size": IG_STEPS}

        def attribute(x):
            with torch.no_grad():
                target = model(x).argmax(1)
            return method.attribute(x.clone().requires_grad_(name == "Saliency"), target=target,
                                    **options).detach().cpu().numpy()
        return attribute

    from captum.attr import LayerAttribution, LayerGradCam
    gradcam = LayerGradCam(model, layer)

    def explain(x):
        with torch.no_grad():
            target = model(x).argmax(1)
        attr = gradcam.attribute(x, target=target, relu_attributions=True)
        cam = LayerAttribution.interpolate(attr, tuple(x.shape[2:]), interpolate_mode="bilinear")[:, 0]
        flat = cam.flatten(1)
        low = flat.min(1).values[:, None, None]
        high = flat.max(1).values[:, None, None]
        return ((cam - low) / (high - low + 1e-7)).detach().cpu().numpy()
    return explain


def run_child(spec, timeout):
    """Run `spec` in a fresh interpreter; return its result dict or {"error": ...}."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH-CHILD "):
            return json.loads(line[len("BENCH-CHILD "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"child failed (exit {proc.returncode}): {tail[0][:200]}"}


# ====================================================================== export and augment
def export(name, model, directory):
    """TorchScript export (opset 13, dynamic batch, input "input"), IR version capped at 8."""
    import onnx
    import torch

    path = os.path.join(directory, f"{name}.onnx")
    with torch.no_grad():
        torch.onnx.export(model, (torch.zeros(1, 3, IMAGE, IMAGE),), path, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    proto = onnx.load(path)
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
        onnx.save(proto, path)
    return path, proto


def same_weights(model, session, device):
    """Max |torch logits - ORT logits| on one batch: proof both engines hold the same weights."""
    import numpy as np
    import torch

    x = _images(2, seed=1)
    with torch.no_grad():
        ref = model(torch.from_numpy(x).to(device)).cpu().numpy()
    got = session.run(None, {"input": x})[0]
    return float(np.abs(ref - got).max()), float(np.abs(ref).max())


# ====================================================================== the benchmark
def plan(args):
    """Which models, targets, methods and explainers to run."""
    import onnxcam

    models = [QUICK_MODEL] if args.quick else args.models.split(",")
    methods = ["gradcam"] if args.quick else (args.methods.split(",") if args.methods else list(onnxcam.METHODS))
    targets = {m: ["last"] + (["layer3"] if m == "resnet50" and not args.quick else []) for m in models}
    return models, methods, targets


def bench(args):
    import onnx
    import torch

    import onnxcam
    from bench_models import MODELS, onnx_tensor_of

    torch.set_num_threads(args.threads)
    info = machine()
    from onnxcam.providers import choose_providers
    providers = choose_providers(args.provider.split(",") if args.provider else None)
    device = "cuda" if "CUDAExecutionProvider" in providers and torch.cuda.is_available() else "cpu"
    info.update(providers=providers, torch_device=device, threads=args.threads, loadavg_start=os.getloadavg())
    have_pgc, have_captum = info["pytorch_grad_cam"] is not None, info["captum"] is not None
    batches = [1] if args.quick else [int(b) for b in args.batches.split(",")]
    runs, warmup = (3, 1) if args.quick else (args.runs, args.warmup)
    torch_runs = runs if args.quick or args.torch_runs is None else args.torch_runs
    models, methods, targets = plan(args)
    os.makedirs(args.out, exist_ok=True)
    rows, checks = [], {}
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    for name in models:
        spec = MODELS[name]
        model = spec.build().to(device)
        work = tempfile.mkdtemp(prefix=f"bench-{name}-", dir=args.out)
        log(f"[{name}] export")
        path, proto = export(name, model if device == "cpu" else spec.build(), work)
        plain = _session(path, args.threads, providers)
        diff, scale = same_weights(model, plain, device)
        checks[name] = {"max_abs_logit_diff": diff, "max_abs_logit": scale, "weights": spec.weights}
        log(f"[{name}] torch vs ORT logits: max |diff| {diff:.2e} (max |logit| {scale:.2e})")

        # Augment: one model per (target, method); mid-network targets get Grad-CAM only.
        configs = [("plain", "plain", path, plain, None)]
        for target in targets[name]:
            tensor = onnx_tensor_of(proto, spec.targets[target])
            extra = [c for c in EXTRA_CONFIGS if c.split(":")[0] in methods
                     and name in args.chunk_models.split(",")] if target == "last" else []
            for method in (methods + extra if target == "last" else ["gradcam"]):
                start = time.perf_counter()
                augmented = onnxcam.augment(path, layer=tensor, **_method_and_options(method))
                seconds = time.perf_counter() - start
                aug_path = os.path.join(work, f"{name}-{target}-{method}.onnx")
                onnx.save(augmented, aug_path)
                log(f"[{name}] augment {target} {method}: {seconds:.2f} s")
                configs.append((target, method, aug_path, _session(aug_path, args.threads, providers), seconds))

        for batch in batches:
            x = _images(batch)
            times = {i: [] for i in range(len(configs))}
            cpu = {i: [] for i in range(len(configs))}
            fast = [i for i, c in enumerate(configs) if not _slow(c[1])]
            log(f"[{name}] batch {batch}: timing {len(fast)} ORT sessions round-robin, {runs} runs")
            for r in range(warmup + runs):
                for i in fast:
                    session = configs[i][3]
                    feeds = _feeds(session, x)
                    c0, t0 = time.process_time(), time.perf_counter()
                    session.run(None, feeds)
                    t1, c1 = time.perf_counter(), time.process_time()
                    if r >= warmup:
                        times[i].append(t1 - t0)
                        cpu[i].append(c1 - c0)
            for i in [i for i in range(len(configs)) if i not in fast and ":" not in configs[i][1]] if batch == 1 else []:
                log(f"[{name}] batch 1: {configs[i][1]}, {args.slow_runs} run(s) after {args.slow_warmup} warm-up(s)")
                session, feeds = configs[i][3], _feeds(configs[i][3], x)
                for r in range(args.slow_warmup + args.slow_runs):
                    c0, t0 = time.process_time(), time.perf_counter()
                    session.run(None, feeds)
                    t1, c1 = time.perf_counter(), time.process_time()
                    if r >= args.slow_warmup:
                        times[i].append(t1 - t0)
                        cpu[i].append(c1 - c0)
            base = statistics.median(times[0])
            base_cpu = statistics.median(cpu[0])
            plain_rss = {}  # effective batch -> peak RSS of plain inference at that batch (fresh child)
            for i, (target, method, aug_path, _, seconds) in enumerate(configs):
                extra = ":" in method  # peak memory (and one timed run) in the fresh child only
                if not times[i] and not (extra and batch == 1):
                    continue
                row = {"model": name, "target": "-" if method == "plain" else target, "batch": batch,
                       "engine": "onnxruntime" if method == "plain" else "onnxcam", "method": method,
                       "augment_s": seconds}
                if times[i]:
                    row.update(**_summary(times[i]), x_plain=statistics.median(times[i]) / base,
                               cpu_x_plain=statistics.median(cpu[i]) / base_cpu)
                if not args.no_rss:
                    slow = _slow(method)
                    child = run_child({"kind": "ort", "model": aug_path, "batch": batch, "threads": args.threads,
                                       "providers": providers, "warmup": 0 if slow else 1, "runs": 1 if slow else 2},
                                      args.child_timeout * (10 if slow else 1))
                    row["rss_mb"] = child.get("rss_mb")
                    if extra and child.get("median_ms"):
                        row.update(median_ms=child["median_ms"], min_ms=child["min_ms"], runs=child["runs"],
                                   x_plain=child["median_ms"] / (1e3 * base))
                    if "error" in child:
                        row["error"] = child["error"]
                    eff = row["eff_batch"] = effective_batch(method, batch)
                    if method == "plain":
                        plain_rss[eff] = row["rss_mb"]
                    if eff not in plain_rss:
                        plain_rss[eff] = run_child({"kind": "ort", "model": path, "batch": eff, "threads": args.threads,
                                                    "providers": providers, "warmup": 1, "runs": 2},
                                                   args.child_timeout).get("rss_mb")
                    row["plain_rss_eff_mb"] = plain_rss[eff]
                rows.append(row)

            # PyTorch explainers, each in its own fresh process (timing and peak RSS together);
            # --torch-runs 0 skips them.
            for target in (targets[name] if torch_runs > 0 else []):
                for explainer, (package, _) in TORCH_EXPLAINERS.items():
                    if (package == "pytorch-grad-cam" and not have_pgc) or (package == "captum" and not have_captum) \
                            or (package == "torch" and not (have_pgc or have_captum)):
                        continue
                    if target != "last" and explainer not in ("GradCAM", "LayerGradCam"):
                        continue
                    counterpart = TORCH_EXPLAINERS[explainer][1]
                    if counterpart is not None and counterpart not in [m.split(":")[0] for m in methods]:
                        continue  # a PyTorch explainer runs when its onnxcam counterpart is benchmarked
                    slow = explainer in SLOW_EXPLAINERS
                    if slow and (batch != 1 or args.quick or name not in args.scorecam.split(",")):
                        continue
                    if args.quick and explainer != "GradCAM":
                        continue  # CI: one PyTorch explainer proves the path works
                    log(f"[{name}] batch {batch}: {explainer} ({target}) in a fresh process")
                    child = run_child({"kind": "torch", "model": name, "target": target, "explainer": explainer,
                                       "batch": batch, "threads": args.threads, "device": device,
                                       "warmup": 0 if slow else warmup, "runs": 1 if slow else torch_runs},
                                      args.child_timeout * (20 if slow else 4))
                    row = {"model": name, "target": target, "batch": batch, "engine": package, "method": explainer,
                           "median_ms": child.get("median_ms"), "min_ms": child.get("min_ms"),
                           "runs": child.get("runs"), "rss_mb": child.get("rss_mb")}
                    if "error" in child:
                        row["error"] = child["error"]
                    if row["median_ms"] is not None:
                        row["x_plain"] = row["median_ms"] / (1e3 * base)
                    rows.append(row)
            # After each batch: a long run that is cut short still leaves its results.
            _ratios(rows)
            info["loadavg_end"] = os.getloadavg()
            write(args.out, info, checks, rows)
            log(table([r for r in rows if r["model"] == name and r["batch"] == batch]))
        del configs, plain
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    return info, checks, rows


def _slow(method):
    return method.split(":")[0] in SLOW_METHODS


def _method_and_options(config):
    """"scorecam:chunk_size=8" -> augment keywords (method, and its options)."""
    method, _, options = config.partition(":")
    parsed = {k: int(v) for k, v in (o.split("=") for o in options.split(",") if o)}
    if method == "integrated-gradients" and "steps" not in parsed:
        parsed["steps"] = IG_STEPS  # captum's n_steps on the other side
    return {"method": method, **({"method_options": {method: parsed}} if parsed else {})}


def effective_batch(config, batch):
    """The rows one pass of the augmented model pushes through the network at once, the batch a
    plain inference is measured at for "RSS x plain@eff": N for single-pass methods; samples per
    chunk x N for the sampled ones (integrated-gradients: its 32 steps unless samples_per_chunk);
    chunk_size rows (default 32, shared by the batch's images) for the methods that re-run the model."""
    import inspect

    from onnxcam.cam.methods.registry import get_method
    from onnxcam.cam.reruns import DEFAULT_CHUNK

    if config == "plain":
        return batch
    options = _method_and_options(config).get("method_options", {})
    method = get_method(config.split(":")[0])
    options = options.get(method.name, {})
    if method.needs.reruns and method.name != "ablationcam":  # (Ablation-CAM re-runs only the tail)
        return options.get("chunk_size", DEFAULT_CHUNK)
    if method.needs.samples:
        defaults = {k: p.default for k, p in inspect.signature(method.fn).parameters.items()}
        count = options.get("steps", options.get("samples", defaults.get("steps", defaults.get("samples"))))
        return (options.get("samples_per_chunk") or count) * batch
    return batch


def _ratios(rows):
    """Peak RSS against plain inference; PyTorch explainer time against its onnxcam counterpart."""
    plain = {(r["model"], r["batch"]): r for r in rows if r["method"] == "plain"}
    ours = {(r["model"], r["target"], r["batch"], r["method"]): r for r in rows if r["engine"] == "onnxcam"}
    for r in rows:
        base = plain.get((r["model"], r["batch"]))
        if base and r.get("rss_mb") and base.get("rss_mb"):
            r["rss_x_plain"] = r["rss_mb"] / base["rss_mb"]
        if r.get("rss_mb") and r.get("plain_rss_eff_mb"):
            r["rss_x_eff"] = r["rss_mb"] / r["plain_rss_eff_mb"]
        if r["method"] in TORCH_EXPLAINERS and TORCH_EXPLAINERS[r["method"]][1] and r.get("median_ms"):
            counterpart = ours.get((r["model"], r["target"], r["batch"], TORCH_EXPLAINERS[r["method"]][1]))
            counterpart = counterpart or next((v for k, v in ours.items() if k[:3] == (r["model"], r["target"], r["batch"])
                                               and k[3].split(":")[0] == TORCH_EXPLAINERS[r["method"]][1]), None)
            if counterpart:
                r["vs_onnxcam"] = r["median_ms"] / counterpart["median_ms"]
                r["onnxcam_method"] = TORCH_EXPLAINERS[r["method"]][1]


# ====================================================================== output
COLUMNS = [("model", "model", "{}"), ("target", "target", "{}"), ("batch", "batch", "{}"), ("engine", "engine", "{}"),
           ("method", "method", "{}"), ("median_ms", "median ms", "{:.1f}"), ("min_ms", "min ms", "{:.1f}"),
           ("x_plain", "x plain", "{:.3f}"), ("cpu_x_plain", "cpu x plain", "{:.3f}"),
           ("vs_onnxcam", "torch/onnxcam", "{:.2f}"), ("rss_mb", "peak RSS MB", "{:.0f}"),
           ("rss_x_plain", "RSS x plain", "{:.2f}"), ("eff_batch", "eff. batch", "{}"),
           ("plain_rss_eff_mb", "plain@eff RSS MB", "{:.0f}"), ("rss_x_eff", "RSS x plain@eff", "{:.2f}"),
           ("augment_s", "augment s", "{:.2f}")]


def table(rows):
    cells = [[title for _, title, _ in COLUMNS]]
    for r in rows:
        line = []
        for key, _, fmt in COLUMNS:
            value = r.get(key)
            line.append("-" if value is None else fmt.format(value))
        if r.get("error"):
            line[-1] += f"  ERROR: {r['error']}"
        cells.append(line)
    widths = [max(len(c[i]) for c in cells if i < len(c)) for i in range(len(COLUMNS))]
    out = []
    for n, line in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write(out, info, checks, rows):
    keys = [k for k, _, _ in COLUMNS] + ["runs", "onnxcam_method", "error"]
    with open(os.path.join(out, "bench.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump({"machine": info, "same_weights": checks, "rows": rows}, f, indent=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-results", help="folder for bench.csv and bench.json")
    parser.add_argument("--quick", action="store_true", help="CI mode: one small model, batch 1, 3 runs")
    parser.add_argument("--models", default=",".join(ALL_MODELS))
    parser.add_argument("--methods", default=None, help="onnxcam methods (default: all)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads and torch threads")
    parser.add_argument("--provider", default=None, help="ORT providers (default: CUDA when it loads, then CPU)")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--torch-runs", type=int, default=None, help="timed runs of PyTorch explainers (default: --runs)")
    parser.add_argument("--scorecam", default=",".join(ALL_MODELS),
                        help="models to run ScoreCAM on, batch 1, one run (it does one forward pass per channel)")
    parser.add_argument("--chunk-models", default="efficientnet_lite0",
                        help="models on which Score-CAM's peak RSS is measured for two chunk sizes")
    parser.add_argument("--slow-runs", type=int, default=1,
                        help="timed runs of the methods that re-run the model per channel (batch 1 only)")
    parser.add_argument("--slow-warmup", type=int, default=1,
                        help="untimed runs before those (0: the first run is timed; the session is already built)")
    parser.add_argument("--child-timeout", type=float, default=300.0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    info, checks, rows = bench(args)
    print(f"onnxcam {info['onnxcam']} | onnxruntime {info['onnxruntime']} {info['providers'][0]} | "
          f"torch {info['torch']} | pytorch-grad-cam {info['pytorch_grad_cam']} | captum {info['captum']}")
    print(f"{info['cpu']}, {info['nproc']} cores, {info.get('mem_gb')} GB | threads {info['threads']} | "
          f"load average {info['loadavg_start'][0]:.2f} -> {info['loadavg_end'][0]:.2f}")
    print(table(rows))
    print(f"\nwritten: {os.path.join(args.out, 'bench.csv')}, {os.path.join(args.out, 'bench.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
