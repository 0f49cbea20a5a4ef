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
        _Group.debug = "--debug" in argv[:argv.index("--")] if "--" in argv else "--debug" in argv
        _Group.debug = _Group.debug or os.environ.get("ONNXCAM_DEBUG", "") not in ("", "0")
        code = self._invoke_safely(argv, prog_name or "onnxcam", complete_var, **extra)
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
        except click.Abort:
            _say("error", "aborted")
            return 1
        except KeyboardInterrupt:
            _say("error", "interrupted")
            return 130
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
@click.option("--debug", is_flag=True, help="Show Python tracebacks instead of one-line errors.")
def main(debug):
    """Grad-CAM and friends computed inside ONNX models by ONNX Runtime itself."""


# ---------------------------------------------------------------------------------------- layers

@main.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("--output", "output", metavar="NAME", help="The model output to explain (default: the only [N, classes] one).")
@click.option("--keep-probabilities", is_flag=True, help="Differentiate the Softmax/Sigmoid output, not its logits.")
def layers(model, output, keep_probabilities):
    """List the layers a CAM can target; the automatic choice is marked with *."""
    from .cam.layers import layers as find_layers
    from .io.pipeline import table

    found = find_layers(model, output=output, keep_probabilities=keep_probabilities)
    if not found:
        raise UsageError(f"{model}: no 4-D activation feeds the score; nothing to explain with a CAM")
    rows = [("*" if info.auto else "", info.name, info.op, _shape(info.shape)) for info in found]
    click.echo(table(rows, ("", "tensor", "op", "shape")))
    click.echo(f"\n{len(found)} candidate layer(s); * = the one --layer auto picks")
    why = next((info.reason for info in found if info.auto and info.reason), None)
    if why:
        click.echo(f"auto: {why}")


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
@score_options
def augment(model, out, layer, method, output, vjp, keep_probabilities, counterfactual, target, target_options,
            layout, token_grid):
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
    augmented = do_augment(proto, spec=spec, name=str(model))
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
def explain(model, images, out_dir, class_index, top_k, method, layer, output, preset, size, resize, bgr,
            labels_path, batch_size, provider, alpha, colormap, max_pixels, keep_probabilities, counterfactual,
            target, target_options, layout, token_grid, extra_inputs):
    """Explain photos with MODEL: an overlay PNG and a .npy map per image and class, and summary.jsonl."""
    from .io.files import ensure_output_dir
    from .io.images import DEFAULT_MAX_PIXELS, list_images
    from .io.pipeline import Source, explain_sources, records_table
    from .runtime import Explainer

    if class_index is not None and top_k is not None:
        raise UsageError("give either --class or --top-k, not both")
    if top_k is not None and top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {top_k}")
    if class_index is not None and class_index < 0:
        raise UsageError(f"--class must be a class index >= 0, got {class_index}")
    found = list_images(images)
    if found.skipped:
        _warn(f"skipped {len(found.skipped)} file(s) that are not images (e.g. {found.skipped[0]})")
    if not found.images:
        raise UsageError(f"no images found in {', '.join(map(str, images))}")
    if max_pixels is not None and max_pixels < 1:
        raise UsageError(f"--max-pixels must be at least 1, got {max_pixels}")
    inputs = load_inputs(extra_inputs)
    spec = make_spec(layer, method, output, keep_probabilities, counterfactual, target, target_options,
                     layout=layout, token_grid=token_grid)
    explainer = Explainer(model, spec=spec, providers=[provider] if provider else None)
    n_classes = getattr(explainer, "n_classes", None)
    if class_index is not None and n_classes and class_index >= n_classes:
        raise UsageError(f"class index {class_index} is out of range: {model} has {n_classes} classes; use 0..{n_classes - 1}")
    created = not Path(out_dir).exists()
    ensure_output_dir(out_dir)
    try:
        records = explain_sources(explainer, [Source.from_path(p) for p in found.images], out_dir, preset=preset,
                                  size=size, resize=resize, bgr=bgr, labels_path=labels_path, class_index=class_index,
                                  top_k=top_k, batch_size=batch_size, alpha=alpha, colormap=colormap,
                                  max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels,
                                  inputs=inputs, on_warning=_warn, progress=progress_bar)
    except BaseException:
        if created:
            _remove_if_empty(out_dir)  # a failed run leaves no empty folder behind
        raise
    click.echo(records_table(records))
    click.echo(f"\nwrote {len(records)} overlay(s) and map(s) and {Path(out_dir) / 'summary.jsonl'}")


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
    """NAME=FILE.npy strings to arrays, with one-line errors."""
    import numpy as np

    inputs = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--input wants NAME=FILE.npy, got {pair!r}")
        try:
            inputs[name] = np.load(path, allow_pickle=False)
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
                                 (f"dS/dx ({needs.rule_mode})", needs.input_gradient)) if on]
        parts += [f"uses {u}" for u in needs.uses]
        rows.append((m.name, m.kind, ", ".join(parts), m.doc[:90]))
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


if __name__ == "__main__":  # pragma: no cover
    main()
