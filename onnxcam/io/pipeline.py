"""Photos in, files out: the loop behind `onnxcam explain` and `onnxcam demo`.

For each photo: read, preprocess (with the geometry kept), run the Explainer in batches, map every
CAM back onto the original photo, write `<stem>_<class>.png` (overlay) and `<stem>_<class>.npy`
(float32 map at the photo's resolution), and collect one summary record; `write_summary` writes
them all as JSON lines. A photo that cannot be read is reported and skipped, the others go on.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import numpy as np

from ..errors import ImageError, UsageError
from .files import atomic_write_bytes
from .images import DEFAULT_MAX_PIXELS, read_image
from .labels import label_for
from .overlay import DEFAULT_ALPHA, DEFAULT_COLORMAP, blend, colormap_id, write_npy, write_png
from .preprocess import Preprocessor

SUMMARY_NAME = "summary.jsonl"


@dataclass
class Source:
    """One photo to explain: a display name, the stem for output files, and a path or the pixels."""

    name: str
    stem: str
    image: Union[str, os.PathLike, np.ndarray]

    @classmethod
    def from_path(cls, path) -> "Source":
        path = Path(os.fspath(path))
        return cls(str(path), path.stem, path)


@dataclass
class Record:
    """One line of summary.jsonl."""

    image: str
    class_index: int
    label: str
    score: float
    probability: Optional[float]
    rank: int
    method: str
    layer: str
    overlay: str
    npy: str


@dataclass
class RunResult:
    records: List[Record] = field(default_factory=list)
    failures: List[ImageError] = field(default_factory=list)


class ExplainRun:
    """Explain photos with one Explainer and write overlays, maps and summary records to `out_dir`."""

    def __init__(self, explainer, preprocessor: Preprocessor, out_dir, labels=None, class_index=None,
                 top_k: Optional[int] = None, batch_size: int = 8, alpha: float = DEFAULT_ALPHA,
                 colormap: str = DEFAULT_COLORMAP, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 on_warning: Callable[[str], None] = lambda message: None, inputs=None):
        if class_index is not None and top_k is not None:
            raise UsageError("give either --class or --top-k, not both")
        if top_k is not None and top_k < 1:
            raise UsageError(f"--top-k must be at least 1, got {top_k}")
        if batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
        if not 0.0 <= alpha <= 1.0:
            raise UsageError(f"--alpha must be between 0 and 1, got {alpha}")
        colormap_id(colormap)  # fail before any work on an unknown colormap
        self.explainer = explainer
        self.pre = preprocessor
        self.out_dir = Path(os.fspath(out_dir))
        self.labels = labels
        self.class_index = class_index
        self.top_k = top_k
        self.batch_size = batch_size
        self.alpha = alpha
        self.colormap = colormap
        self.max_pixels = max_pixels
        self.on_warning = on_warning
        self.inputs = dict(inputs or {})  # extra run-time feeds (target inputs, a model's other inputs)
        self.layer = ",".join(explainer.layers)
        self.method = getattr(explainer, "method", "")
        self._stems = set()

    def run(self, sources: Sequence[Source], progress: Optional[Callable[[int], None]] = None) -> RunResult:
        result = RunResult()
        for start in range(0, len(sources), self.batch_size):
            chunk = sources[start:start + self.batch_size]
            loaded = []
            for source in chunk:
                try:
                    loaded.append((source, self._load(source)))
                except ImageError as exc:
                    result.failures.append(exc)
                    self.on_warning(str(exc))
            if loaded:
                result.records.extend(self._explain_batch(loaded))
            if progress is not None:
                progress(len(chunk))
        return result

    def _load(self, source: Source) -> np.ndarray:
        if isinstance(source.image, np.ndarray):
            image = np.asarray(source.image)
            if image.ndim == 2:
                image = np.repeat(image[:, :, None], 3, axis=2)
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ImageError(f"{source.name}: expected uint8 RGB pixels, got {image.dtype} {image.shape}")
            return image
        return read_image(source.image, max_pixels=self.max_pixels)

    def _explain_batch(self, loaded) -> List[Record]:
        photos = [image for _, image in loaded]
        x, geometries = self.pre.batch(photos)
        first = self._explain(x, self.class_index)
        ranked = [(0, first)]
        if self.top_k is not None and self.top_k > 1:
            logits = self._logits(first)
            order = np.argsort(-logits, axis=1, kind="stable")[:, :self.top_k]
            if not np.array_equal(order[:, 0], first.class_index):
                ranked = [(0, self._explain(x, order[:, 0]))]
            for rank in range(1, order.shape[1]):
                ranked.append((rank, self._explain(x, order[:, rank])))
        records = []
        for i, (source, photo) in enumerate(loaded):
            stem = self._unique_stem(source.stem)
            for rank, res in ranked:
                records.extend(self._write(source, stem, photo, geometries[i], res, i, rank))
        return records

    def _explain(self, x, class_index):
        if not self.inputs:
            return self.explainer(x, class_index=class_index)
        return self.explainer(x, class_index=class_index, inputs=self.inputs)

    def _logits(self, result) -> np.ndarray:
        """The explained output's values [N, classes], for ranking and probabilities."""
        outputs = result.outputs
        name = self.explainer.output_name
        if name in outputs and np.ndim(outputs[name]) == 2:
            return np.asarray(outputs[name], dtype=np.float64)
        two_d = [v for v in outputs.values() if np.ndim(v) == 2]
        if len(two_d) == 1:
            return np.asarray(two_d[0], dtype=np.float64)
        raise UsageError("cannot rank classes for --top-k: the explained output is not a model output of "
                         "shape [N, classes]; use --class instead")

    def _write(self, source, stem, photo, geometry, res, i, rank) -> List[Record]:
        """One overlay, map and record per method (file names carry the method when there are several)."""
        k = int(res.class_index[i])
        cams = res.cams or {self.method: res.cam}
        several = len(cams) > 1
        records = []
        signed_methods = getattr(self.explainer, "signed_methods", ())
        for method, cam in cams.items():
            signed = method in signed_methods  # maps in [-1, 1]: keep the sign, diverging colours
            heat = np.clip(geometry.to_original(cam[i]), -1.0 if signed else 0.0, 1.0).astype(np.float32)
            name = f"{stem}_{k}_{_file_safe(method)}" if several else f"{stem}_{k}"
            png, npy = self.out_dir / f"{name}.png", self.out_dir / f"{name}.npy"
            write_png(png, blend(photo, heat, self.alpha, self.colormap, signed=signed))
            write_npy(npy, heat)
            records.append(Record(image=source.name, class_index=k, label=label_for(self.labels, k),
                                  score=float(res.score[i]), probability=self._probability(res, i, k), rank=rank,
                                  method=method, layer=self.layer, overlay=str(png), npy=str(npy)))
        return records

    def _probability(self, res, i, k) -> Optional[float]:
        try:
            row = self._logits(res)[i]
        except UsageError:
            return None
        if not 0 <= k < row.shape[0]:
            return None
        if np.all(row >= 0) and np.all(row <= 1) and abs(row.sum() - 1) < 1e-3:
            return float(row[k])  # already probabilities
        e = np.exp(row - row.max())
        return float(e[k] / e.sum())

    def _unique_stem(self, stem: str) -> str:
        """Two photos with the same stem (a/x.png, b/x.jpg) must not overwrite each other's outputs."""
        candidate, n = stem, 1
        while candidate in self._stems:
            n += 1
            candidate = f"{stem}-{n}"
        self._stems.add(candidate)
        return candidate


def _file_safe(method: str) -> str:
    """A method name as part of a file name (gradcam++ -> gradcampp)."""
    return method.replace("+", "p").replace("/", "-")


def write_summary(out_dir, records: Sequence[Record], name: str = SUMMARY_NAME) -> Path:
    """All records as JSON lines, written atomically."""
    text = "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in records)
    return atomic_write_bytes(Path(os.fspath(out_dir)) / name, text.encode("utf-8"))


# ---------------------------------------------------------------------- the whole run
def explain_sources(explainer, sources, out_dir, *, preset=None, size=None, resize="direct", bgr=None,
                    labels_path=None, class_index=None, top_k=None, batch_size=8, alpha=DEFAULT_ALPHA,
                    colormap=DEFAULT_COLORMAP, max_pixels=None, inputs=None,
                    on_warning: Callable[[str], None] = lambda message: None, progress=None) -> List[Record]:
    """Preprocess, explain and write; returns the summary records. Shared by `explain` and `demo`.
    `progress(total)` may return a context manager whose value has update(n) (a progress bar)."""
    from .labels import labels_for_model
    from .preprocess import input_size

    preset = preset or model_preset(explainer) or "imagenet"
    shape = input_size(explainer.input_shape, explainer.layout, size)
    pre = Preprocessor(size=shape, preset=preset, resize=resize, bgr=bgr or None, layout=explainer.layout,
                       channels=explainer.channels)
    labels = labels_for_model(labels_path, getattr(explainer, "n_classes", None), on_warning=on_warning)
    many = len(sources) > 1
    run = ExplainRun(explainer, pre, out_dir, labels=labels, class_index=class_index, top_k=top_k,
                     batch_size=batch_size, alpha=alpha, colormap=colormap, max_pixels=max_pixels, inputs=inputs,
                     on_warning=on_warning if many else (lambda message: None))
    if many and progress is not None:
        with progress(len(sources)) as bar:
            result = run.run(sources, progress=bar.update)
    else:
        result = run.run(sources)
    if result.records:
        write_summary(out_dir, result.records)
    if result.failures:
        if not many:
            raise result.failures[0]
        raise ImageError(f"{len(result.failures)} of {len(sources)} images could not be read (see the warnings "
                         f"above); explained the other {len(sources) - len(result.failures)}")
    return result.records


def model_preset(explainer) -> Optional[str]:
    """The preset a model names in its metadata (key onnxcam.preset), if any."""
    from .preprocess import PRESET_METADATA_KEY, PRESETS

    value = getattr(explainer, "metadata", {}).get(PRESET_METADATA_KEY)
    return value if value in PRESETS else None


def records_table(records, files: bool = True) -> str:
    rows = []
    for r in records:
        score = f"{r.score:.3f}" + (f" (p={r.probability:.2f})" if r.probability is not None else "")
        row = [r.image, r.class_index, r.label, score]
        if files:
            row.append(f"{r.overlay}, {Path(r.npy).name}")
        rows.append(row)
    headers = ["image", "class", "label", "score"] + (["files"] if files else [])
    return table(rows, headers)


def table(rows, headers) -> str:
    """Plain aligned columns with a rule under the headers."""
    cells = [tuple(str(c) for c in headers)] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths).rstrip())
    return "\n".join(lines)
