"""Writing an Evaluation out: a terminal table, metrics.jsonl, metrics.csv, summary.json, PNG plots
and, when asked, the HTML report (index.html, by onnxcam.io.report).

Plots are drawn with OpenCV (already a dependency): per method, the mean deletion and insertion
curves over the images (`curves_<method>.png`), and one bar chart of every method's mean metrics
(`metrics.png`). Every file is written atomically. Evaluation keeps no overlays or maps, so the
report holds the options, the metric tables and the plots, with no per-image grid.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from ..io.files import atomic_write_bytes

# column, header, which way is better (for the table and the bar chart)
COLUMNS = (
    ("deletion_auc", "deletion↓", -1), ("insertion_auc", "insertion↑", 1),
    ("road_morf", "ROAD MoRF↓", -1), ("road_lerf", "ROAD LeRF↑", 1), ("road_combined", "ROAD comb.↑", 1),
    ("relative_drop", "avg drop %↓", -1), ("increase_in_confidence", "increase %↑", 1),
    ("pointing_game", "pointing↑", 1), ("energy_pointing_game", "energy↑", 1), ("top_k_precision", "top-k↑", 1),
    ("localisation_iou", "loc. IoU↑", 1), ("class_sensitivity_pearson", "class corr.↓", -1),
    ("sanity_spearman", "sanity ρ↓", -1), ("sanity_ssim", "sanity SSIM↓", -1),
)
PERCENT = {"relative_drop", "increase_in_confidence"}


def summary_table(evaluation) -> str:
    summary = evaluation.summary()
    present = [c for c in COLUMNS if any(c[0] in m for m in summary.values())]
    headers = ["method", "images"] + [c[1] for c in present]
    rows = []
    for method, means in summary.items():
        row = [method, str(means["images"])]
        for key, _, _ in present:
            value = means.get(key)
            row.append("" if value is None else f"{100 * value:.1f}" if key in PERCENT else f"{value:.3f}")
        rows.append(row)
    cells = [headers] + rows
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


FIXED_FILES = ("metrics.jsonl", "metrics.csv", "summary.json", "metrics.png")


def planned_files(names: Sequence[str], report: bool) -> List[str]:
    """The file names a run over these methods/maps may write (a superset of what it writes)."""
    return (["index.html"] if report else []) + list(FIXED_FILES) + [f"curves_{_safe(name)}.png" for name in names]


def write_all(evaluation, out_dir, report: bool = False) -> List[Path]:
    """Every file of the run into out_dir; index.html last (and only with report=True) so that it
    links only to files that exist. The caller has refused an earlier run's files already."""
    out = Path(out_dir)
    written = [write_jsonl(evaluation, out / "metrics.jsonl"), write_csv(evaluation, out / "metrics.csv"),
               atomic_write_bytes(out / "summary.json", (json.dumps(_json_ready(evaluation.summary()), indent=2)
                                                         + "\n").encode())]
    for method in evaluation.methods():
        png = curves_plot(evaluation, method)
        if png is not None:
            written.append(_write_png(out / f"curves_{_safe(method)}.png", png))
    bars = bar_chart(evaluation)
    if bars is not None:
        written.append(_write_png(out / "metrics.png", bars))
    if report:
        written.append(write_html(evaluation, out, [p.name for p in written if p.suffix == ".png"]))
    return written


def write_html(evaluation, out_dir, plots: List[str]) -> Path:
    """index.html: the run's options, the mean metrics per method, every image's metrics, the plots."""
    from ..io.report import Section, write_report

    curves = [(name, name[len("curves_"):-len(".png")]) for name in plots if name.startswith("curves_")]
    bars = [(name, "mean metrics per method") for name in plots if name == "metrics.png"]
    files = " · ".join(f'<a href="{name}">{name}</a>' for name in ("metrics.csv", "metrics.jsonl", "summary.json"))
    sections = [Section("Metrics (mean over images)", metrics_table(evaluation, per_image=False)
                        + f"<p><small>all values: {files}</small></p>", bars)]
    if curves:
        sections.append(Section("Deletion and insertion curves (mean over images)", images=curves))
    sections.append(Section("Metrics per image", metrics_table(evaluation, per_image=True)))
    return write_report(out_dir, [], evaluation.options, extra_sections=sections, title="onnxcam evaluation")


def metrics_table(evaluation, per_image: bool) -> str:
    """An HTML table of the metrics in COLUMNS (every name and value escaped): the means per method,
    or one row per image x method."""
    e = lambda text: html.escape(str(text), quote=True)  # noqa: E731
    if per_image:
        rows = [([r.get("image", ""), r["method"], r.get("class_index", "")], r) for r in evaluation.records]
        first = ["image", "method", "class"]
    else:
        rows = [([method, means["images"]], means) for method, means in evaluation.summary().items()]
        first = ["method", "images"]
    present = [c for c in COLUMNS if any(c[0] in values for _, values in rows)]
    head = "".join(f"<th>{e(h)}</th>" for h in first + [c[1] for c in present])
    body = []
    for names, values in rows:
        cells = [f"<td>{e(n)}</td>" for n in names]
        for key, _, _ in present:
            value = values.get(key)
            if isinstance(value, bool):
                value = float(value)
            cells.append("<td></td>" if _missing(value) or not isinstance(value, (int, float)) else
                         f"<td>{100 * value:.1f}</td>" if key in PERCENT else f"<td>{value:.3f}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return ('<table class="options" style="border-collapse:collapse"><tr>' + head + "</tr>" + "".join(body)
            + "</table>")


def write_jsonl(evaluation, path) -> Path:
    text = "".join(json.dumps(_json_ready(r), ensure_ascii=False) + "\n" for r in evaluation.records)
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_csv(evaluation, path) -> Path:
    """One row per image x method, scalar metrics only (curves and stages are in metrics.jsonl)."""
    keys = ["image", "method", "layer", "class_index"] + evaluation.metric_keys()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    for record in evaluation.records:
        writer.writerow({k: "" if _missing(record.get(k)) else record.get(k) for k in keys})
    return atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _json_ready(value):
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN
    return value


def _ascii(header: str) -> str:
    """OpenCV's Hershey fonts draw ASCII only."""
    return header.replace("↓", " (low)").replace("↑", " (high)").replace("ρ", "rho")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def _write_png(path, bgr: np.ndarray) -> Path:
    import cv2

    ok, data = cv2.imencode(".png", bgr)
    return atomic_write_bytes(path, data.tobytes())


# ----------------------------------------------------------------------------------------- plots

_COLOURS = [(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148), (75, 86, 140),
            (194, 119, 227), (127, 127, 127), (34, 189, 188), (207, 190, 23)]  # tab10, BGR


def curves_plot(evaluation, method: str):
    """Mean deletion and insertion curves of one method, side by side (BGR image), or None."""
    rows = [r for r in evaluation.records if r["method"] == method]
    panels = []
    for key, title in (("deletion_curve", "deletion"), ("insertion_curve", "insertion")):
        curves = [r[key] for r in rows if key in r]
        if not curves:
            continue
        mean = np.mean(np.asarray(curves, dtype=np.float64), axis=0)
        area = float(np.mean([r[key.replace("curve", "auc")] for r in rows]))
        panels.append(_line_panel(mean, f"{method}: {title} (AUC {area:.3f}, {len(curves)} images)"))
    return np.concatenate(panels, axis=1) if panels else None


def _line_panel(curve: np.ndarray, title: str, size=(420, 320)) -> np.ndarray:
    import cv2

    w, h = size
    img = np.full((h, w, 3), 255, np.uint8)
    left, right, top, bottom = 50, 15, 35, 40
    x0, x1, y0, y1 = left, w - right, top, h - bottom
    cv2.rectangle(img, (x0, y0), (x1, y1), (0, 0, 0), 1)
    high = max(1.0, float(np.nanmax(curve))) if np.isfinite(curve).any() else 1.0
    low = min(0.0, float(np.nanmin(curve))) if np.isfinite(curve).any() else 0.0
    for t in range(5):
        v = low + (high - low) * t / 4
        y = int(round(y1 - (y1 - y0) * t / 4))
        cv2.line(img, (x0 - 4, y), (x0, y), (0, 0, 0), 1)
        cv2.putText(img, f"{v:.2f}", (4, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
        x = int(round(x0 + (x1 - x0) * t / 4))
        cv2.line(img, (x, y1), (x, y1 + 4), (0, 0, 0), 1)
        cv2.putText(img, f"{t / 4:.2f}", (x - 12, y1 + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    n = len(curve)
    xs = x0 + (x1 - x0) * np.arange(n) / max(n - 1, 1)
    ys = y1 - (y1 - y0) * (np.nan_to_num(curve, nan=low) - low) / max(high - low, 1e-12)
    points = np.stack([xs, ys], axis=1).round().astype(np.int32)
    fill = np.concatenate([points, [[int(xs[-1]), y1], [int(xs[0]), y1]]]).astype(np.int32)
    overlay = img.copy()
    cv2.fillPoly(overlay, [fill], (230, 200, 160))
    img = cv2.addWeighted(overlay, 0.5, img, 0.5, 0)
    cv2.polylines(img, [points], False, _COLOURS[0], 2, cv2.LINE_AA)
    cv2.putText(img, title, (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "fraction of pixels", (x0 + 110, h - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1,
                cv2.LINE_AA)
    return img


def bar_chart(evaluation, panel=(230, 200)):
    """One small panel per metric, one bar per method (BGR image), or None when nothing to draw."""
    import cv2

    summary: Dict[str, Dict[str, float]] = evaluation.summary()
    methods = list(summary)
    metrics = [c for c in COLUMNS if any(c[0] in m for m in summary.values())]
    if not metrics or not methods:
        return None
    pw, ph = panel
    cols = min(4, len(metrics))
    rows = -(-len(metrics) // cols)
    legend_h = 22 * (1 + (len(methods) - 1) // 3)
    img = np.full((rows * ph + legend_h, cols * pw, 3), 255, np.uint8)
    for m, (key, header, _) in enumerate(metrics):
        ox, oy = (m % cols) * pw, (m // cols) * ph
        scale = 100.0 if key in PERCENT else 1.0
        values = [scale * summary[meth].get(key, float("nan")) for meth in methods]
        finite = [v for v in values if math.isfinite(v)]
        low, high = min(0.0, *finite) if finite else 0.0, max(scale, *finite) if finite else scale
        x0, x1, y0, y1 = ox + 30, ox + pw - 10, oy + 30, oy + ph - 25
        cv2.putText(img, _ascii(header), (ox + 8, oy + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        zero = int(round(y1 - (y1 - y0) * (0 - low) / (high - low)))
        cv2.line(img, (x0, zero), (x1, zero), (0, 0, 0), 1)
        width = (x1 - x0) / len(methods)
        for j, v in enumerate(values):
            if not math.isfinite(v):
                continue
            y = int(round(y1 - (y1 - y0) * (v - low) / (high - low)))
            bx0, bx1 = int(x0 + j * width + 3), int(x0 + (j + 1) * width - 3)
            cv2.rectangle(img, (bx0, min(y, zero)), (bx1, max(y, zero)), _COLOURS[j % len(_COLOURS)], -1)
            cv2.putText(img, f"{v:.2f}", (bx0, max(y, zero) + 14 if v < 0 else min(y, zero) - 3),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.33, (0, 0, 0), 1, cv2.LINE_AA)
    for j, method in enumerate(methods):
        lx, ly = 10 + (j % 3) * (cols * pw // 3), rows * ph + 15 + 22 * (j // 3)
        cv2.rectangle(img, (lx, ly - 9), (lx + 12, ly + 1), _COLOURS[j % len(_COLOURS)], -1)
        cv2.putText(img, method, (lx + 18, ly), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    return img
