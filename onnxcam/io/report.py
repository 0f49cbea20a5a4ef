"""index.html: one page to compare a run's maps side by side (methods x classes x layers).

The page is a single static HTML file in the output folder with relative links only, no script
and no network access: it opens from a file manager, an archive, or a web server alike. Every
image in the grid is a small JPEG thumbnail in `thumbs/` (lazy loaded, with its size declared so
the page does not jump while loading) that links to the full-size overlay, so a run over hundreds
of photos opens fast.

`write_report(out_dir, records, options, extra_sections=...)` is the one entry point: `explain
--report` calls it with its summary records; other commands (`evaluate`) add their own sections
(plots, tables) with `Section`.
"""

from __future__ import annotations

import html
import os
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import quote

import numpy as np

from .files import atomic_write_bytes

REPORT_NAME = "index.html"
THUMB_DIR = "thumbs"
THUMB_SIDE = 256  # pixels, the longer side of a thumbnail
THUMB_QUALITY = 85


@dataclass(frozen=True)
class Section:
    """A block of the report another command adds: a title, an optional trusted HTML fragment (the
    caller's own markup, inserted as is) and images (path inside out_dir or absolute, caption)."""

    title: str
    html: str = ""
    images: Sequence[Tuple[str, str]] = ()


def write_thumbnail(out_dir, name: str, rgb: np.ndarray, overwrite: bool = True) -> Path:
    """A JPEG of uint8 RGB `rgb` with its longer side at most THUMB_SIDE, as out_dir/thumbs/<name>.jpg.
    Returns the path relative to out_dir."""
    import cv2

    from ..errors import OutputError

    folder = Path(os.fspath(out_dir)) / THUMB_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jpg"
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: exists (from an earlier run?); choose another --out-dir or pass --overwrite")
    rgb = np.asarray(rgb)
    h, w = rgb.shape[:2]
    scale = min(1.0, THUMB_SIDE / max(h, w))
    small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA) \
        if scale < 1.0 else rgb
    bgr = small[:, :, ::-1] if small.ndim == 3 else small
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(bgr), [cv2.IMWRITE_JPEG_QUALITY, THUMB_QUALITY])
    if not ok:
        raise OutputError(f"{path}: OpenCV could not encode the thumbnail")
    atomic_write_bytes(path, data.tobytes())
    return Path(THUMB_DIR) / path.name


def write_report(out_dir, records: Iterable, options: Mapping[str, object],
                 extra_sections: Sequence[Section] = (), title: str = "onnxcam report",
                 name: str = REPORT_NAME) -> Path:
    """Write out_dir/index.html for `records` (pipeline.Record objects or summary.jsonl dicts).

    Per image: the photo, a grid of overlays (rows: the explained classes by rank; columns: method
    and layer), the top classes with probabilities. At the top: the options of the run, then the
    extra sections. Records without thumbnails get them made from their overlay files."""
    out = Path(os.fspath(out_dir))
    rows = [_as_dict(r) for r in records]
    parts = [_HEAD.format(title=_e(title)), f"<h1>{_e(title)}</h1>", _options_table(options)]
    for section in extra_sections:
        parts.append(_section(out, section))
    images = _group(rows, "image")
    if len(images) > 1:
        parts.append('<nav><b>images:</b> ' + " · ".join(
            f'<a href="#img{i}">{_e(Path(image).name)}</a>' for i, image in enumerate(images)) + "</nav>")
    for i, (image, its) in enumerate(images.items()):
        parts.append(_image_block(out, i, image, its))
    parts.append("</body></html>\n")
    return atomic_write_bytes(out / name, "\n".join(parts).encode("utf-8"))


# ---------------------------------------------------------------------- pieces
_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.1em; margin: 0 0 .5em; word-break: break-all; }}
table.options td, table.options th {{ padding: 1px 10px 1px 0; text-align: left; vertical-align: top; }}
table.options td {{ font-family: monospace; word-break: break-all; }}
section.image {{ background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 1em; margin: 1em 0; }}
.row {{ display: flex; gap: 1.5em; flex-wrap: wrap; align-items: flex-start; }}
.side {{ flex: 0 0 200px; }} .side img {{ width: 200px; height: auto; }}
table.grid img {{ width: 200px; height: auto; }}
table.grid {{ border-collapse: collapse; }}
table.grid th {{ font-weight: 600; padding: 2px 6px; text-align: left; vertical-align: bottom; }}
table.grid td {{ padding: 3px; vertical-align: top; }}
table.grid th.class {{ vertical-align: middle; width: 10em; }}
img {{ display: block; border-radius: 3px; }}
.zero {{ color: #b00; font-size: .85em; }}
ol.top {{ margin: 0; padding-left: 1.4em; }}
nav {{ margin: 1em 0; line-height: 1.8; }}
small {{ color: #666; }}
</style></head><body>"""


def _as_dict(record) -> dict:
    return asdict(record) if is_dataclass(record) else dict(record)


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _href(out: Path, path) -> str:
    """A relative, URL-quoted link from the report to `path`."""
    target = Path(os.fspath(path))
    if not target.is_absolute() and not (out / target).exists():
        target = target.resolve()
    relative = os.path.relpath(target.resolve() if target.is_absolute() else out / target, out.resolve())
    return quote(Path(relative).as_posix())


def _group(rows, key) -> Dict[str, List[dict]]:
    groups: Dict[str, List[dict]] = {}
    for row in rows:
        groups.setdefault(str(row.get(key)), []).append(row)
    return groups


def _options_table(options: Mapping[str, object]) -> str:
    cells = []
    for key, value in options.items():
        if isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value)) if key != "size" else " x ".join(map(str, value))
        cells.append(f"<tr><th>{_e(key)}</th><td>{_e(value)}</td></tr>")
    return '<table class="options">' + "".join(cells) + "</table>"


def _section(out: Path, section: Section) -> str:
    figures = "".join(
        f'<figure><a href="{_href(out, path)}"><img src="{_href(out, path)}" loading="lazy" '
        f'alt="{_e(caption)}" style="max-width:480px"></a><figcaption>{_e(caption)}</figcaption></figure>'
        for path, caption in section.images)
    return f'<section class="extra"><h2>{_e(section.title)}</h2>{section.html}<div class="row">{figures}</div></section>'


def _thumb(out: Path, row: dict) -> str:
    """The record's thumbnail, made from its overlay when it has none."""
    if row.get("thumbnail"):
        return row["thumbnail"]
    import cv2

    overlay = Path(row["overlay"])
    path = overlay if overlay.is_absolute() or overlay.exists() else out / overlay
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        return str(row["overlay"])
    stem = Path(row["overlay"]).stem
    return str(write_thumbnail(out, stem, bgr[:, :, ::-1]))


def _size_of(out: Path, relative: str) -> Tuple[Optional[int], Optional[int]]:
    """(width, height) to declare for the thumbnails of one image (they share the photo's shape)."""
    import cv2

    path = Path(relative)
    img = cv2.imread(str(path if path.is_absolute() else out / path), cv2.IMREAD_COLOR)
    if img is None:
        return None, None
    h, w = img.shape[:2]
    scale = min(1.0, THUMB_SIDE / max(h, w))
    return round(w * scale), round(h * scale)


def _img(out: Path, src: str, href: str, alt: str, size) -> str:
    w, h = size
    dims = f' width="{w}" height="{h}"' if w and h else ""
    return (f'<a href="{href}"><img src="{_href(out, src)}" loading="lazy" decoding="async"{dims} '
            f'alt="{_e(alt)}"></a>')


def _image_block(out: Path, index: int, image: str, rows: List[dict]) -> str:
    thumbs = {id(r): _thumb(out, r) for r in rows}
    size = _size_of(out, thumbs[id(rows[0])])
    columns = list(dict.fromkeys((r.get("method", ""), r.get("layer", "")) for r in rows))
    classes = list(dict.fromkeys((r.get("rank", 0), r.get("class_index")) for r in rows))
    several_layers = len({layer for _, layer in columns}) > 1
    head = "".join(f"<th>{_e(method)}" + (f"<br><small>{_e(layer)}</small>" if several_layers else "") + "</th>"
                   for method, layer in columns)
    by_cell = {((r.get("rank", 0), r.get("class_index")), (r.get("method", ""), r.get("layer", ""))): r for r in rows}
    body = []
    for key in classes:
        first = next(r for r in rows if (r.get("rank", 0), r.get("class_index")) == key)
        p = first.get("probability")
        label = f"{_e(first.get('class_index'))} {_e(first.get('label', ''))}" + (
            f"<br><small>p = {p:.3f}</small>" if isinstance(p, (int, float)) else "")
        cells = []
        for column in columns:
            r = by_cell.get((key, column))
            if r is None:
                cells.append("<td></td>")
                continue
            alt = f"{Path(image).name}: {r.get('method')} for class {r.get('class_index')} ({r.get('label', '')})"
            zero = '<div class="zero">all zero</div>' if r.get("all_zero") else ""
            cells.append(f"<td>{_img(out, thumbs[id(r)], _href(out, r['overlay']), alt, size)}{zero}</td>")
        body.append(f'<tr><th class="class">{label}</th>{"".join(cells)}</tr>')
    grid = f'<table class="grid"><tr><th></th>{head}</tr>{"".join(body)}</table>'
    photo = ""
    if rows[0].get("photo_thumbnail"):
        src = rows[0]["photo_thumbnail"]
        photo = (f'<img src="{_href(out, src)}" loading="lazy" decoding="async"'
                 + (f' width="{size[0]}" height="{size[1]}"' if size[0] else "")
                 + f' alt="{_e(Path(image).name)}"><small>photo</small>')
    top = rows[0].get("top") or []
    ranked = "".join(f"<li>{_e(t['class_index'])} {_e(t['label'])} <small>p = {float(t['probability']):.3f}</small></li>"
                     for t in top)
    top_html = f'<p><b>top classes</b></p><ol class="top">{ranked}</ol>' if ranked else ""
    return (f'<section class="image" id="img{index}"><h2>{_e(image)}</h2>'
            f'<div class="row"><div class="side">{photo}{top_html}</div>{grid}</div></section>')
