"""The HTML report (`explain --report`, io/report.py): built from a real run on a tiny model, then
opened in headless Chromium (tests/chromium_check.py): no console errors, every image decodes, a
screenshot with something on it. The same check is shown to fail on a report with a missing image,
so it cannot pass vacuously."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from urllib.parse import quote, unquote

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from chromium_check import check_page, chromium
from onnxcam.cli import main
from onnxcam.io.report import Section, write_report
from ux_models import save, tiny_classifier, write_photo

# CI (.ci/run) installs Chromium and sets ONNXCAM_REQUIRE_CHROMIUM: there a missing browser fails.
needs_chromium = pytest.mark.skipif(chromium() is None and not os.environ.get("ONNXCAM_REQUIRE_CHROMIUM"),
                                    reason="no chromium on PATH (.ci/run installs it)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    model = save(tiny_classifier(preset="unit"), root / "tiny.onnx")
    photos = root / "photos"
    photos.mkdir()
    for i in range(3):
        write_photo(photos / f"p{i} & <x>.png" if i == 2 else photos / f"p{i}.png", 60 + 10 * i, 80, seed=i)
    out = root / "out"
    result = CliRunner().invoke(main, ["explain", str(model), str(photos), "-o", str(out), "--report",
                                       "--method", "gradcam,layercam", "--top-k", "2", "--layer", "r1",
                                       "--layer", "r2", "--size", "32", "32"])
    assert result.exit_code == 0, result.output
    return {"root": root, "out": out, "model": model, "photos": photos}


def _sources(page: str):
    return re.findall(r'(?:src|href)="([^"#]+)"', page)


def test_report_is_one_offline_page_with_relative_links(run):
    out = run["out"]
    page = (out / "index.html").read_text()
    records = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 2 * 2 * 3  # images x classes x methods x (fused + 2 layers)
    links = _sources(page)
    assert links and not any(re.match(r"[a-z]+:", link) or link.startswith("/") for link in links)  # relative
    for link in links:
        assert (out / unquote(link)).is_file(), link
    for r in records:  # every overlay is in the grid, by its thumbnail, linked to the full PNG
        assert quote(Path(r["overlay"]).name) in page and quote(r["thumbnail"]) in page
    assert page.count('loading="lazy"') == len(records) + 3  # every grid image and photo is lazy
    assert "<script" not in page and "http" not in page.split("</style>")[1]
    assert "p2 &amp; &lt;x&gt;.png" in page  # names are escaped
    thumb = cv2.imread(str(out / records[0]["thumbnail"]))
    assert max(thumb.shape[:2]) <= 256
    for option in ("model_sha256", "preset", "resize", "layers", "methods", "counterfactual", "onnxcam_version"):
        assert f"<th>{option}</th>" in page
    assert page.count('<ol class="top">') == 3 and "p = " in page


@needs_chromium
def test_report_loads_in_headless_chromium(run):
    result = check_page(run["out"] / "index.html")
    assert result.console_errors == []
    assert result.images == 3 * 2 * 2 * 3 + 3 and result.broken_images == []
    shot = cv2.imdecode(np.frombuffer(result.screenshot, np.uint8), cv2.IMREAD_COLOR)
    assert shot is not None and shot.shape[0] > 500 and shot.shape[1] > 500
    assert shot.std() > 20  # photos and heatmaps, not a blank page
    assert (shot.reshape(-1, 3).max(axis=1).astype(int) - shot.reshape(-1, 3).min(axis=1)).max() > 100  # colour


@needs_chromium
def test_the_chromium_check_catches_a_missing_image(run, tmp_path):
    broken = tmp_path / "copy"
    shutil.copytree(run["out"], broken)
    victim = sorted((broken / "thumbs").iterdir())[0]
    victim.unlink()
    result = check_page(broken / "index.html")
    assert result.broken_images == [f"thumbs/{victim.name}"]
    assert any("Failed to load resource" in e and victim.name in e for e in result.console_errors)


def test_write_report_takes_summary_dicts_and_extra_sections(run, tmp_path):
    """The API other commands (evaluate) call: records read back from summary.jsonl, no
    thumbnails yet (they are made from the overlays), an extra section with a plot."""
    records = [json.loads(line) for line in (run["out"] / "summary.jsonl").read_text().splitlines()]
    out = tmp_path / "eval"
    out.mkdir()
    for r in records:
        r["thumbnail"] = r["photo_thumbnail"] = None
        shutil.copy(r["overlay"], out / Path(r["overlay"]).name)
        r["overlay"] = str(out / Path(r["overlay"]).name)
    cv2.imwrite(str(out / "plot.png"), np.full((40, 60, 3), 200, np.uint8))
    page = write_report(out, records, {"model": "m.onnx"}, title="evaluation",
                        extra_sections=[Section("Deletion curves", "<p>AUC 0.42</p>", [("plot.png", "deletion")])])
    text = page.read_text()
    assert "<h2>Deletion curves</h2><p>AUC 0.42</p>" in text and 'src="plot.png"' in text
    assert len(list((out / "thumbs").iterdir())) == len(records)
    if chromium() is not None:
        result = check_page(page)
        assert result.console_errors == [] and result.broken_images == [] and result.images == len(records) + 1


def test_report_refuses_to_overwrite(run):
    result = CliRunner().invoke(main, ["explain", str(run["model"]), str(run["photos"] / "p0.png"), "-o",
                                       str(run["out"]), "--report"])
    assert result.exit_code == 1 and "exists" in result.stderr and "--overwrite" in result.stderr


def test_a_page_of_sections_only(tmp_path):
    """An evaluate run may have plots and no overlays: the page still holds its options and sections."""
    cv2.imwrite(str(tmp_path / "curve.png"), np.full((30, 50, 3), 90, np.uint8))
    page = write_report(tmp_path, [], {"model": "m.onnx", "methods": ["gradcam", "layercam"]},
                        extra_sections=[Section("Insertion", images=[(str(tmp_path / "curve.png"), "insertion")])])
    text = page.read_text()
    assert "<td>gradcam, layercam</td>" in text and 'src="curve.png"' in text and 'class="image"' not in text
