"""`onnxcam evaluate --report` and `onnxcam.evaluate(..., report=True)`: index.html with the options,
the metric tables (escaped) and the plots, opened in headless Chromium (tests/chromium_check.py) as
tests/test_report.py does for `explain --report`; an earlier index.html is refused as explain does."""

from __future__ import annotations

import json
import os
import re
from urllib.parse import unquote

import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnxcam
from chromium_check import check_page, chromium
from evaluate_models import SIZE, positive_images, region_masks, region_model
from onnxcam.cli import main
from onnxcam.errors import OutputError, UsageError

needs_chromium = pytest.mark.skipif(chromium() is None and not os.environ.get("ONNXCAM_REQUIRE_CHROMIUM"),
                                    reason="no chromium on PATH (.ci/run installs it)")
PLOTS = ("metrics.png", "curves_hirescam.png", "curves_gradcam.png")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate_report")
    model = root / "region.onnx"
    onnx.save(region_model(region_masks()), str(model))
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b & <c>"):  # a name the page must escape
        cv2.imwrite(str(photos / f"{name}.png"), rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    out = root / "out"
    args = ["evaluate", str(model), str(photos), "--method", "hirescam,gradcam", "--steps", "8", "--preset", "unit",
            "--sanity-stages", "1", "-o", str(out), "--report"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "report: " in result.output
    return {"root": root, "model": model, "photos": photos, "out": out, "args": args}


def test_page_holds_options_tables_and_plots(run):
    out = run["out"]
    page = (out / "index.html").read_text()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4
    for option in ("model", "methods", "metrics", "steps", "deletion_baseline", "seed", "onnxcam_version"):
        assert f"<th>{option}</th>" in page
    for plot in PLOTS:
        assert f'src="{plot}"' in page
    links = re.findall(r'(?:src|href)="([^"#]+)"', page)
    assert links and all((out / unquote(link)).is_file() for link in links)  # relative, and all there
    assert "b &amp; &lt;c&gt;.png" in page and "b & <c>" not in page  # escaped
    assert "<script" not in page and 'class="image"' not in page  # no overlays: sections only
    # the per-image table shows each record's deletion AUC as written to metrics.jsonl
    for r in records:
        assert f"<td>{r['deletion_auc']:.3f}</td>" in page
    summary = json.loads((out / "summary.json").read_text())
    assert f"<td>{summary['gradcam']['insertion_auc']:.3f}</td>" in page


@needs_chromium
def test_page_loads_in_headless_chromium(run):
    result = check_page(run["out"] / "index.html")
    assert result.console_errors == []
    assert result.images == len(PLOTS) and result.broken_images == []
    shot = cv2.imdecode(np.frombuffer(result.screenshot, np.uint8), cv2.IMREAD_COLOR)
    assert shot is not None and shot.shape[0] > 300 and shot.shape[1] > 300
    assert shot.std() > 20  # plots and tables, not a blank page


def test_an_earlier_report_is_refused_before_any_work(run):
    before = (run["out"] / "index.html").read_bytes()
    result = CliRunner().invoke(main, run["args"])
    assert result.exit_code == 1 and "index.html: exists" in result.stderr and "--overwrite" in result.stderr
    assert "Traceback" not in result.output and (run["out"] / "index.html").read_bytes() == before
    result = CliRunner().invoke(main, run["args"] + ["--overwrite"])
    assert result.exit_code == 0, result.output


def test_earlier_metrics_are_refused_without_a_report_too(run, tmp_path):
    """Not only index.html: a run without --report must not replace an earlier run's metrics."""
    x = positive_images(2)
    first = onnxcam.evaluate(run["model"], x, methods="hirescam", metrics=["deletion"], steps=4, out_dir=tmp_path)
    kept = {p: open(p, "rb").read() for p in first.written}
    assert str(tmp_path / "metrics.jsonl") in kept
    with pytest.raises(OutputError, match="metrics.jsonl: exists.*--overwrite"):
        onnxcam.evaluate(run["model"], x, methods="hirescam", metrics=["deletion"], steps=4, out_dir=tmp_path)
    assert all(open(p, "rb").read() == data for p, data in kept.items())
    # another method's run into the same folder still writes its metrics over the shared files: refused
    with pytest.raises(OutputError, match="exists"):
        onnxcam.evaluate(run["model"], x, methods="gradcam", metrics=["deletion"], steps=4, out_dir=tmp_path)
    onnxcam.evaluate(run["model"], x, methods="hirescam", metrics=["deletion"], steps=4, out_dir=tmp_path,
                     overwrite=True)


def test_api_report_needs_a_folder_and_writes_the_page(run, tmp_path):
    x = positive_images(2)
    with pytest.raises(UsageError, match="out_dir"):
        onnxcam.evaluate(run["model"], x, methods="hirescam", report=True)
    result = onnxcam.evaluate(run["model"], x, methods="hirescam", metrics=["deletion", "insertion"], steps=4,
                              out_dir=tmp_path, report=True)
    assert str(tmp_path / "index.html") in result.written and (tmp_path / "curves_hirescam.png").is_file()
    with pytest.raises(OutputError, match="exists"):
        onnxcam.evaluate(run["model"], x, methods="hirescam", out_dir=tmp_path, report=True)
    onnxcam.evaluate(run["model"], x, methods="hirescam", metrics=["deletion"], steps=4, out_dir=tmp_path,
                     report=True, overwrite=True)
