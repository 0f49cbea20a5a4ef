"""The `onnxcam` command: layers, augment, explain, demo.

Errors a user can cause end in one line on stderr, "onnxcam: error: ...", and exit code 2 for a
wrong request (bad option, unknown layer, bad class index) or 1 for a failure (missing or broken
file, unwritable output). `--debug` shows the Python traceback instead. Heavy imports (onnx,
onnxruntime, OpenCV) happen inside the commands so that `onnxcam --version` stays instant.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ._version import __version__
from .errors import OnnxcamError, UsageError

TARGET_NAMES = ("class", "detection", "segmentation", "embedding", "sequence")
METHOD_HELP = "Method name, or several comma-separated (one model computes them all); see `onnxcam methods`."
PRESET_NAMES = ("imagenet", "unit", "symmetric", "caffe", "raw")


def score_options(command):
    """The options that say what is differentiated, shared by `augment` and `explain`."""
    options = [
        click.option("--keep-probabilities", is_flag=True,
                     help="Differentiate the Softmax/Sigmoid output, not its logits."),
        click.option("--counterfactual", is_flag=True,
                     help="Negate the gradient: regions that argue against the class."),
        click.option("--target", "target", default="class", show_default=True, type=click.Choice(TARGET_NAMES),
                     help="What to explain: a class logit, a detection's score, a segment, an embedding, a sequence."),
        click.option("--target-option", "target_options", multiple=True, metavar="KEY=VALUE",
                     help="An option of the target (e.g. threshold=0.5, layout=v5, blank=0); repeatable."),
        click.option("--layout", "layout", default="auto", show_default=True,
                     type=click.Choice(("auto", "NCHW", "NHWC", "tokens")),
                     help="Layout of the target layer's activation (auto: found from the ops that made it)."),
        click.option("--token-grid", "token_grid", nargs=3, type=int, default=None, metavar="EXTRA H W",
                     help="Token layers: EXTRA leading tokens (class, distillation), then an H x W grid "
                          "(default: measured)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _say(kind: str, message: str) -> None:
    click.echo(f"onnxcam: {kind}: {message}", err=True)


def _warn(message: str) -> None:
    _say("warning", message)


class _Group(click.Group):
    """A click group that turns every error into one line on stderr and the right exit code."""

    debug = False

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = list(sys.argv[1:] if args is None else args)
        # --debug is accepted anywhere (before or after the command): taken out here, so a
        # subcommand never sees it as an unknown option. After "--" everything is an argument.
        end = argv.index("--") if "--" in argv else len(argv)
        _Group.debug = "--debug" in argv[:end] or os.environ.get("ONNXCAM_DEBUG", "") not in ("", "0")
        argv = [a for a in argv[:end] if a != "--debug"] + argv[end:]
        from .interrupts import exit_code, signals_as_exceptions

        try:
            with signals_as_exceptions():
                code = self._invoke_safely(argv, prog_name or "onnxcam", complete_var, **extra)
        except KeyboardInterrupt as exc:  # a signal just after the command returned: nothing to clean
            code = exit_code(exc)
        if standalone_mode:
            sys.exit(code)
        return code

    def _invoke_safely(self, argv, prog_name, complete_var, **extra) -> int:
        try:
            value = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
            return value if isinstance(value, int) else 0
        except click.exceptions.Exit as exc:
            return exc.exit_code
        except click.UsageError as exc:
            if _Group.debug:
                raise
            where = exc.ctx.command_path if exc.ctx is not None else prog_name
            _say("error", f"{exc.format_message()} (see '{where} --help')")
            return 2
        except click.ClickException as exc:
            if _Group.debug:
                raise
            _say("error", exc.format_message())
            return exc.exit_code
        except (click.Abort, KeyboardInterrupt) as exc:
            # Ctrl-C, SIGTERM, SIGHUP (see interrupts.py); click wraps KeyboardInterrupt in Abort.
            from .interrupts import describe, exit_code

            signal = exc if isinstance(exc, KeyboardInterrupt) else (exc.__cause__ or exc.__context__)
            if not isinstance(signal, KeyboardInterrupt):
                _say("error", "aborted")
                return 1
            _say("error", describe(signal))
            return exit_code(signal)
        except BrokenPipeError:
            return 1
        except OnnxcamError as exc:
            if _Group.debug:
                raise
            _say("error", _one_line(str(exc)))
            return exc.exit_code
        except Exception as exc:  # a bug in onnxcam: still no traceback unless asked for
            if _Group.debug:
                raise
            _say("error", f"internal error: {type(exc).__name__}: {_one_line(str(exc))} "
                          "(rerun with --debug for the traceback, and please report it)")
            return 1


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(no message)"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="onnxcam", message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, help="Show Python tracebacks instead of one-line errors (anywhere on the line).")
def main(debug):
    """Grad-CAM and friends computed inside ONNX models by ONNX Runtime itself."""


# ---------------------------------------------------------------------------------------- layers

@main.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("--output", "output", metavar="NAME", help="The model output to explain (default: the only [N, classes] one).")
@click.option("--keep-probabilities", is_flag=True, help="Differentiate the Softmax/Sigmoid output, not its logits.")
@click.option("--size", nargs=2, type=int, metavar="H W", default=None,
              help="Input size to measure the layers at, for models with a dynamic one (default 224 224).")
@click.option("--op", "ops", multiple=True, metavar="OP", help="Only layers produced by this op (e.g. Relu, Conv); repeatable.")
@click.option("--min-size", "min_size", type=int, metavar="S", default=None,
              help="Only layers whose spatial size (height and width) is at least S.")
@click.option("--grep", "pattern", metavar="TEXT", help="Only layers whose tensor or node name contains TEXT.")
def layers(model, output, keep_probabilities, size, ops, min_size, pattern):
    """List the layers a CAM can target, with their size at the input size; auto choice marked *."""
    from .cam.augment import check_reserved_names
    from .cam.layer_sizes import measured_shapes
    from .cam.layers import layers as find_layers
    from .io.pipeline import table
    from .modelio import load_model

    if min_size is not None and min_size < 1:
        raise UsageError(f"--min-size must be at least 1, got {min_size}")
    proto = load_model(model)
    check_reserved_names(proto, str(model))  # an augmented model's layers are the original's: list those
    found = find_layers(proto, output=output, keep_probabilities=keep_probabilities, name=str(model))
    if not found:
        raise UsageError(f"{model}: no 4-D activation feeds the score; nothing to explain with a CAM")
    shapes, (h, w) = measured_shapes(proto, [info.name for info in found], size, label=str(model))
    del proto
    wanted_ops = {o.lower() for o in ops}
    rows = []
    for info in found:
        shape = shapes.get(info.name, info.shape)
        spatial = _spatial_size(shape)
        if wanted_ops and info.op.lower() not in wanted_ops:
            continue
        if min_size is not None and (spatial is None or min(spatial) < min_size):
            continue
        if pattern and pattern not in info.name and pattern not in info.node:
            continue
        rows.append(("*" if info.auto else "", info.name, info.node or "-", info.op, _shape(shape),
                     "x".join(map(str, spatial)) if spatial else "?"))
    if rows:
        click.echo(table(rows, ("", "tensor", "node", "op", "shape", "h x w")))
    shown = f"{len(rows)} of {len(found)}" if len(rows) != len(found) else f"{len(found)}"
    where = (f"at input size {h}x{w} pixels (--size to change)" if shapes else
             "with their declared shapes (one run on zeros did not work to measure them)")
    click.echo(f"\n{shown} candidate layer(s) {where}; * = the one --layer auto picks")
    why = next((info.reason for info in found if info.auto and getattr(info, "reason", None)), None)
    if why:
        click.echo(f"auto: {why}")


def _spatial_size(shape):
    """(h, w) of a [N, C, h, w] feature map (or None when unknown). Token sequences: (tokens,)."""
    if shape is None:
        return None
    dims = tuple(shape)
    if len(dims) == 4 and all(isinstance(d, int) for d in dims[2:]):
        return dims[2], dims[3]
    if len(dims) == 3 and isinstance(dims[1], int):
        return (dims[1],)
    return None


def _shape(shape) -> str:
    if shape is None:
        return "?"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


# --------------------------------------------------------------------------------------- augment

@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              metavar="OUT.onnx", help="Where to write the augmented model (never the input).")
@click.option("--layer", "layer", multiple=True, metavar="NAME",
              help="Target tensor; repeat for several layers (their maps are fused). Default: auto.")
@click.option("--method", default="gradcam", show_default=True, metavar="METHOD",
              help=METHOD_HELP)
@click.option("--output", "output", metavar="NAME", help="The model output to explain.")
@click.option("--vjp", is_flag=True, help="Expose the raw activation and gradient instead of a CAM.")
@click.option("--portable", is_flag=True,
              help="Backward convolutions get their own weight copies (for OpenVINO; costs memory).")
@score_options
def augment(model, out, layer, method, output, vjp, portable, keep_probabilities, counterfactual, target,
            target_options, layout, token_grid):
    """Write a copy of MODEL that also outputs the CAM (inputs/outputs documented in the README)."""
    from .cam.augment import augment as do_augment
    from .errors import OutputError
    from .modelio import _same_file, input_files, load_model, save_model

    spec = make_spec(layer, method, output, keep_probabilities, counterfactual, target, target_options, vjp=vjp,
                     layout=layout, token_grid=token_grid)
    refuse = input_files(model) if out.exists() else []
    if any(_same_file(out, other) for other in refuse):
        raise OutputError(f"{out}: refusing to overwrite the input model or its data; choose another output path")
    proto = load_model(model)
    # The CLI loaded this copy itself: edited in place, the weights are never held twice.
    augmented = do_augment(proto, spec=spec, name=str(model), portable=portable, inplace=True)
    save_model(augmented, out, refuse=refuse)
    meta = {p.key: p.value for p in augmented.metadata_props}
    click.echo(f"wrote {out} (method {meta.get('onnxcam.method', method)}, "
               f"layer {meta.get('onnxcam.layers', '?')}, output {meta.get('onnxcam.output', '?')})")


# --------------------------------------------------------------------------------------- explain

@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="IMAGE_OR_DIR...")
@click.option("-o", "--out-dir", "out_dir", default="onnxcam-out", show_default=True, type=click.Path(path_type=Path),
              help="Folder for the overlays, maps and summary.jsonl (created if needed).")
@click.option("--class", "class_index", type=int, metavar="K", help="Explain class K (default: the top class).")
@click.option("--top-k", "top_k", type=int, metavar="K", help="Explain each of the K top classes (one overlay each).")
@click.option("--method", default="gradcam", show_default=True, metavar="METHOD",
              help=METHOD_HELP)
@click.option("--layer", "layer", multiple=True, metavar="NAME", help="Target tensor (repeatable). Default: auto.")
@click.option("--output", "output", metavar="NAME", help="The model output to explain.")
@click.option("--preset", type=click.Choice(PRESET_NAMES), default=None,
              help="Input normalisation. Default: the model's own metadata, else imagenet.")
@click.option("--size", nargs=2, type=int, metavar="H W", default=None,
              help="Input size for models with a dynamic one (default 224 224).")
@click.option("--resize", type=click.Choice(("direct", "crop")), default="direct", show_default=True,
              help="direct: stretch to the input size; crop: shorter side then centre crop (224/256).")
@click.option("--bgr", is_flag=True, default=None, help="Feed channels in BGR order (the caffe preset implies it).")
@click.option("--labels", "labels_path", type=click.Path(path_type=Path), metavar="FILE",
              help="Class names, one per line (or JSON). Default: ImageNet for 1000-class models.")
@click.option("--batch-size", default=8, show_default=True, type=int, metavar="B")
@click.option("--provider", metavar="P", help="ONNX Runtime execution provider: cpu, cuda, tensorrt.")
@click.option("--alpha", default=0.5, show_default=True, type=float, metavar="A", help="Heatmap opacity in the overlay.")
@click.option("--colormap", default="jet", show_default=True, metavar="NAME", help="OpenCV colormap (jet, turbo, inferno...).")
@click.option("--max-pixels", default=None, type=int, metavar="N",
              help="Refuse images larger than N pixels (default 100 megapixels).")
@score_options
@click.option("--input", "extra_inputs", multiple=True, metavar="NAME=FILE.npy",
              help="Feed a run-time input from a .npy file (onnxcam_mask, onnxcam_reference, onnxcam_box, "
                   "a model's second input...); repeatable.")
@click.option("--save-npy", "save_npy", type=click.Choice(("none", "float16", "float32")), default="float32",
              show_default=True, help="The raw map at the photo's resolution: float32, float16 (half the size) or none.")
@click.option("--report", is_flag=True, help="Also write index.html: every map side by side, with the options used.")
@click.option("--overwrite", is_flag=True, help="Replace files of an earlier run in the output folder (default: refuse).")
@click.option("--engine", type=click.Choice(("local", "ray")), default="local", show_default=True,
              help="local: this process; ray: Ray Data actors (pip install \"onnxcam[ray]\"), one Explainer each.")
@click.option("--ray-address", metavar="ADDR", default=None,
              help="Ray cluster to join (auto, ray://host:10001); default: a local Ray instance.")
@click.option("--actors", default=1, show_default=True, type=int, metavar="K", help="Ray actors (Explainers) at once.")
@click.option("--gpus-per-actor", default=0.0, show_default=True, type=float, metavar="G",
              help="GPUs per Ray actor (CUDA through ONNX Runtime).")
def explain(model, images, out_dir, class_index, top_k, method, layer, output, preset, size, resize, bgr,
            labels_path, batch_size, provider, alpha, colormap, max_pixels, keep_probabilities, counterfactual,
            target, target_options, layout, token_grid, extra_inputs, save_npy, report, overwrite, engine, ray_address,
            actors, gpus_per_actor):
    """Explain photos with MODEL: an overlay PNG and a .npy map per image, class and method, and summary.jsonl."""
    from .io.files import ensure_output_dir
    from .io.images import DEFAULT_MAX_PIXELS, list_images
    from .io.pipeline import PartialRunError, Source, explain_sources, records_table
    from .runtime import Explainer

    if class_index is not None and top_k is not None:
        raise UsageError("give either --class or --top-k, not both")
    if top_k is not None and top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {top_k}")
    if class_index is not None and class_index < 0:
        raise UsageError(f"--class must be a class index >= 0, got {class_index}")
    parquet = len(images) == 1 and str(images[0]).endswith(".parquet")
    if parquet and engine != "ray":
        raise UsageError("a Parquet table of images is read by the Ray engine: add --engine ray")
    found = list_images([] if parquet else images)
    if found.skipped:
        _warn(f"skipped {len(found.skipped)} file(s) that are not images (e.g. {found.skipped[0]})")
    if not found.images and not parquet:
        raise UsageError(f"no images found in {', '.join(map(str, images))}")
    if max_pixels is not None and max_pixels < 1:
        raise UsageError(f"--max-pixels must be at least 1, got {max_pixels}")
    inputs = load_inputs(extra_inputs)
    from .install import duplicate_ort_message
    duplicate = duplicate_ort_message()
    if duplicate:
        _warn(duplicate)
    spec = make_spec(layer, method, output, keep_probabilities, counterfactual, target, target_options,
                     layout=layout, token_grid=token_grid)
    if engine == "ray":
        from . import ray as on_ray

        try:
            records = on_ray.explain(model, images[0] if len(images) == 1 else list(images), out_dir, spec=spec,
                                     actors=actors, gpus_per_actor=gpus_per_actor, address=ray_address,
                                     providers=[provider] if provider else None, batch_size=batch_size, preset=preset,
                                     size=size, resize=resize, bgr=bgr, labels_path=labels_path,
                                     class_index=class_index, top_k=top_k, alpha=alpha, colormap=colormap,
                                     max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels, inputs=inputs,
                                     on_warning=_warn, save_npy=save_npy, overwrite=overwrite, report=report)
        except PartialRunError as exc:  # what succeeded is written: show it, then fail
            click.echo(records_table(exc.records))
            raise
        click.echo(records_table(records))
        click.echo(f"\nwrote {len(records)} overlay(s) and map(s), {Path(out_dir) / 'summary.jsonl'} and "
                   f"{Path(out_dir) / 'summary.parquet'} (Ray, {actors} actor(s))"
                   + (f"; report: {Path(out_dir) / 'index.html'}" if report else ""))
        return
    explainer = Explainer(model, spec=spec, providers=[provider] if provider else None)
    n_classes = getattr(explainer, "n_classes", None)
    if class_index is not None and n_classes and class_index >= n_classes:
        raise UsageError(f"class index {class_index} is out of range: {model} has {n_classes} classes; use 0..{n_classes - 1}")
    if top_k is not None and n_classes and top_k > n_classes:
        raise UsageError(f"--top-k {top_k} is more than the {n_classes} classes {model} has; use --top-k 1..{n_classes}")
    created = not Path(out_dir).exists()
    ensure_output_dir(out_dir)
    failure = None
    try:
        records = explain_sources(explainer, [Source.from_path(p) for p in found.images], out_dir, preset=preset,
                                  size=size, resize=resize, bgr=bgr, labels_path=labels_path, class_index=class_index,
                                  top_k=top_k, batch_size=batch_size, alpha=alpha, colormap=colormap,
                                  max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels,
                                  inputs=inputs, on_warning=_warn, progress=progress_bar, save_npy=save_npy,
                                  overwrite=overwrite, report=report, on_info=click.echo,
                                  protected=[pair.partition("=")[2] for pair in extra_inputs])
    except PartialRunError as exc:  # what succeeded is written: show it, then fail
        records, failure = exc.records, exc
    except BaseException:
        if created:
            _remove_if_empty(out_dir)  # a failed run leaves no empty folder behind
        raise
    click.echo(records_table(records))
    kinds = "overlay(s)" + ("" if save_npy == "none" else " and map(s)")
    click.echo(f"\nwrote {len(records)} {kinds} and {Path(out_dir) / 'summary.jsonl'}"
               + (f"; report: {Path(out_dir) / 'index.html'}" if report else ""))
    if failure is not None:
        raise failure


def _remove_if_empty(folder) -> None:
    try:
        Path(folder).rmdir()
    except OSError:
        pass


def make_spec(layer, method, output, keep_probabilities, counterfactual, target, target_options, vjp=False,
              layout="auto", token_grid=None):
    """The ExplainSpec the options describe (shared by augment and explain)."""
    from .spec import ExplainSpec

    return ExplainSpec(methods=method, layers=tuple(layer) or "auto", output=output,
                       keep_probabilities=keep_probabilities, counterfactual=counterfactual, target=target,
                       target_options=parse_options(target_options), vjp=vjp, layout=layout or "auto",
                       token_grid=tuple(token_grid) if token_grid else None)


def progress_bar(total: int):
    """A progress bar on stderr when it is a terminal, else a silent stand-in."""
    if _stderr_is_tty():
        return click.progressbar(length=total, label="explaining", file=sys.stderr)
    import contextlib

    class _Silent:
        def update(self, n):
            pass
    return contextlib.nullcontext(_Silent())


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def parse_options(pairs) -> dict:
    """KEY=VALUE strings to a dict; values read as int, float, none/true/false, or kept as text."""
    options = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--target-option wants KEY=VALUE, got {pair!r}")
        options[key.strip()] = _option_value(text.strip())
    return options


def _option_value(text):
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def load_inputs(pairs) -> dict:
    """NAME=FILE.npy strings to arrays, with one-line errors; each file is checked before it is
    read (a FIFO would block, /dev/zero never end)."""
    import io

    import numpy as np

    from .io.files import read_user_file

    inputs = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--input wants NAME=FILE.npy, got {pair!r}")
        data = read_user_file(path, 2 ** 31, UsageError, f"--input {name} file", "give a smaller array")
        try:
            inputs[name] = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--input {name}: cannot read {path} as a .npy array ({exc})") from None
    return inputs


# --------------------------------------------------------------------------------------- methods

@main.command()
def methods():
    """List the explanation methods, with what each needs."""
    from .cam.methods import METHODS_REGISTRY
    from .io.pipeline import table

    rows = []
    for m in METHODS_REGISTRY.values():
        needs = m.needs
        parts = [p for p, on in (("A", needs.activation), ("G", needs.gradient),
                                 (f"dS/dx ({needs.rule_mode})", needs.input_gradient),
                                 ("bias gradients", needs.bias_gradients), (f"own score {needs.seed}", needs.seed),
                                 ("re-runs", needs.reruns)) if on]
        parts += [f"uses {u}" for u in needs.uses]
        if needs.samples:
            parts.append(f"{needs.samples} samples" + (" (A, G at layers)" if needs.layers else " (dS/dx)"))
        rows.append((m.name, m.kind + (" ±" if m.signed else ""), ", ".join(parts), m.doc[:90]))
    click.echo(table(rows, ("method", "kind", "needs", "what")))


# ------------------------------------------------------------------------------------------ demo

@main.command()
@click.option("-o", "--out-dir", "out_dir", default="onnxcam-demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--method", default="gradcam", show_default=True, metavar="METHOD",
              help=METHOD_HELP)
@click.option("--provider", metavar="P", help="ONNX Runtime execution provider: cpu, cuda, tensorrt.")
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where the exported EfficientNet-Lite0 lives (default: ~/.cache/onnxcam/).")
def demo(out_dir, method, provider, model_path):
    """Explain three photos from scikit-image with EfficientNet-Lite0 (exported on first use)."""
    from .demo import run_demo

    run_demo(out_dir, method=method, provider=provider, model_path=model_path)


from .evaluate.cli import evaluate_command; main.add_command(evaluate_command)  # noqa: E402,E702

if __name__ == "__main__":  # pragma: no cover
    main()
