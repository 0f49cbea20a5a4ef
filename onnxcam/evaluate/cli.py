"""`onnxcam evaluate MODEL IMAGES... --method m1,m2 -o OUT`: judge explanations on photos.

Registered on the main group by one line in onnxcam/cli.py; the group turns onnxcam errors into
one-line messages and exit codes, so this command only parses options and calls `evaluate`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import UsageError

PRESET_NAMES = ("imagenet", "unit", "symmetric", "caffe", "raw")


def _split(values) -> list:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


@click.command("evaluate")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="IMAGE_OR_DIR...")
@click.option("-o", "--out-dir", "out_dir", default="onnxcam-eval", show_default=True, type=click.Path(path_type=Path),
              help="Folder for metrics.jsonl, metrics.csv, summary.json and the plots.")
@click.option("--method", "methods", multiple=True, metavar="M1,M2",
              help="Methods to evaluate, comma-separated or repeated: any method the Explainer accepts "
                   "(default gradcam).")
@click.option("--map", "outside_maps", multiple=True, metavar="NAME=FILE.npy",
              help="Also evaluate maps made elsewhere: float [N, H, W] at the model input's size, one per image "
                   "in the order given; repeatable.")
@click.option("--metrics", "metrics", multiple=True, metavar="M1,M2",
              help="deletion, insertion, road, confidence, pointing, localisation, class_sensitivity, sanity "
                   "(default: all that need no ground truth, plus pointing/localisation with --boxes/--masks).")
@click.option("--layer", "layer", multiple=True, metavar="NAME", help="Target tensor (repeatable). Default: auto.")
@click.option("--output", "output", metavar="NAME", help="The model output holding the class scores.")
@click.option("--class", "class_index", type=int, metavar="K", help="Explain and score class K (default: top class).")
@click.option("--score", type=click.Choice(("probability", "logit")), default="probability", show_default=True,
              help="What the perturbation metrics read: the class's softmax probability or its logit.")
@click.option("--steps", default=50, show_default=True, type=int, help="Deletion/insertion steps.")
@click.option("--deletion-baseline", type=click.Choice(("zeros", "blur", "mean")), default="zeros", show_default=True)
@click.option("--insertion-baseline", type=click.Choice(("zeros", "blur", "mean")), default="blur", show_default=True)
@click.option("--road-noise", default=0.01, show_default=True, type=float, help="ROAD imputation noise (std).")
@click.option("--sanity-stages", default=5, show_default=True, type=int,
              help="Cascading-randomisation stages, spread over the weight layers from the top (0: all).")
@click.option("--boxes", "boxes", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.json",
              help='Ground-truth boxes: {"image name or stem": [[x0, y0, x1, y1], ...]} in photo pixels.')
@click.option("--masks", "--ground-truth-masks", "masks", type=click.Path(file_okay=False, path_type=Path),
              metavar="DIR", help="Ground-truth mask images (same stem as the photo, nonzero = object).")
@click.option("--pointing-tolerance", default=0.0, show_default=True, type=float, metavar="PX")
@click.option("--wsol-fraction", default=0.15, show_default=True, type=float,
              help="Localisation: keep pixels above this fraction of the map's maximum.")
@click.option("--preset", type=click.Choice(PRESET_NAMES), default=None,
              help="Input normalisation. Default: the model's own metadata, else imagenet.")
@click.option("--size", nargs=2, type=int, metavar="H W", default=None, help="Input size for dynamic models.")
@click.option("--resize", type=click.Choice(("direct", "crop")), default="direct", show_default=True)
@click.option("--batch-size", default=32, show_default=True, type=int, metavar="B",
              help="Images per ONNX Runtime run (bounds memory).")
@click.option("--provider", metavar="P", help="ONNX Runtime execution provider: cpu, cuda, tensorrt.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of ROAD's noise and the randomised weights.")
@click.option("--report", is_flag=True, help="Also write index.html: the options, the metric tables and the plots.")
@click.option("--overwrite", is_flag=True, help="Replace the files of an earlier run in the output folder (default: refuse).")
def evaluate_command(model, images, out_dir, methods, outside_maps, metrics, layer, output, class_index, score, steps,
                     deletion_baseline, insertion_baseline, road_noise, sanity_stages, boxes, masks,
                     pointing_tolerance, wsol_fraction, preset, size, resize, batch_size, provider, seed, report,
                     overwrite):
    """Judge explanations of MODEL on photos: deletion/insertion, ROAD, confidence, sanity checks, class
    sensitivity, and pointing/localisation against --boxes or --masks."""
    import numpy as np

    from ..io.files import ensure_output_dir
    from .report import summary_table
    from .run import evaluate

    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if sanity_stages < 0:
        raise UsageError(f"--sanity-stages must be 0 (every layer) or more, got {sanity_stages}")
    if class_index is not None and class_index < 0:
        raise UsageError(f"--class must be a class index >= 0, got {class_index}")
    maps = {}
    for pair in outside_maps:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--map wants NAME=FILE.npy, got {pair!r}")
        try:
            maps[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--map {name}: cannot read {path} as a .npy array ({exc})") from None
    method_list = _split(methods) or ([] if maps else ["gradcam"])
    kwargs = dict(methods=method_list, maps=maps, metrics=_split(metrics) or None, layer=list(layer) or "auto",
                  class_index=class_index, output=output, score=score, boxes=boxes, masks=masks,
                  batch_size=batch_size, providers=[provider] if provider else None, preset=preset, size=size,
                  resize=resize, steps=steps, deletion_baseline=deletion_baseline,
                  insertion_baseline=insertion_baseline, road_noise=road_noise,
                  sanity_stages=sanity_stages or None, pointing_tolerance=pointing_tolerance,
                  wsol_fraction=wsol_fraction, seed=seed, out_dir=out_dir, report=report, overwrite=overwrite)
    from ..io.images import list_images

    found = list_images(images)
    if found.skipped:
        click.echo(f"onnxcam: warning: skipped {len(found.skipped)} file(s) that are not images "
                   f"(e.g. {found.skipped[0]})", err=True)
    if not found.images:
        raise UsageError(f"no images found in {', '.join(map(str, images))}")
    created = not Path(out_dir).exists()
    ensure_output_dir(out_dir)  # before the long run: an unwritable folder fails first
    try:
        if _stderr_is_tty() and len(found.images) > 1:
            with click.progressbar(length=len(found.images), label="evaluating", file=sys.stderr) as bar:
                result = evaluate(model, found.images, progress=bar.update, **kwargs)
        else:
            result = evaluate(model, found.images, **kwargs)
    except BaseException:
        if created:
            _remove_if_empty(out_dir)  # a failed run leaves no empty folder behind
        raise
    click.echo(summary_table(result))
    click.echo(f"\nwrote {len(result.records)} record(s) to {Path(out_dir) / 'metrics.jsonl'} and "
               f"{len(result.written) - 1} other file(s) in {out_dir}"
               + (f"; report: {Path(out_dir) / 'index.html'}" if report else ""))


def _remove_if_empty(folder) -> None:
    try:
        Path(folder).rmdir()
    except OSError:
        pass


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
