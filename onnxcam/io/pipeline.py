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

from ..errors import ImageError, NonFiniteError, OutputError, UsageError
from .files import atomic_write_bytes, check_output_file, file_identity
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
                 on_warning: Callable[[str], None] = lambda message: None, inputs=None, protected=()):
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
        # Files no output may replace: the photos of the run (found in `run`) and what the caller
        # names (the model, a labels file, --input arrays...), compared by identity (links too).
        self._protected = {i for i in map(file_identity, protected) if i is not None}
        self._written = set()  # output paths of this run, so that no two outputs share a name

    def run(self, sources: Sequence[Source], progress: Optional[Callable[[int], None]] = None) -> RunResult:
        """Explain `sources` batch by batch. A photo that cannot be read, or whose model output is
        NaN/Inf, is reported (on_warning) and recorded in `failures`; the others go on."""
        for source in sources:
            if not isinstance(source.image, np.ndarray):
                identity = file_identity(source.image)
                if identity is not None:
                    self._protected.add(identity)
        self._check_summary_path()
        result = RunResult()
        for start in range(0, len(sources), self.batch_size):
            chunk = sources[start:start + self.batch_size]
            loaded = []
            for source in chunk:
                try:
                    loaded.append((source, self._load(source)))
                except ImageError as exc:
                    self._fail(result, exc)
            if loaded:
                self._explain_or_isolate(loaded, result)
            if progress is not None:
                progress(len(chunk))
        return result

    def _explain_or_isolate(self, loaded, result: RunResult) -> None:
        """A batch whose outputs are not finite is explained again photo by photo, so that only the
        photos at fault are left out (with their names), not their batch."""
        try:
            result.records.extend(self._explain_batch(loaded))
            return
        except NonFiniteError as exc:
            if len(loaded) == 1:
                self._fail(result, NonFiniteError(f"{loaded[0][0].name}: {exc}"))
                return
        for item in loaded:
            self._explain_or_isolate([item], result)

    def _fail(self, result: RunResult, exc) -> None:
        result.failures.append(exc)
        self.on_warning(str(exc))

    def _check_summary_path(self) -> None:
        summary = self.out_dir / SUMMARY_NAME
        if file_identity(summary) in self._protected:
            raise OutputError(f"{summary}: is one of the inputs; choose another output directory (-o)")
        check_output_file(summary)

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
        for _, res in ranked:
            self._check_finite(res)
        records = []
        for i, (source, photo) in enumerate(loaded):
            stem = self._unique_stem(source.stem)
            for rank, res in ranked:
                records.append(self._write(source, stem, photo, geometries[i], res, i, rank))
        return records

    def _check_finite(self, res) -> None:
        """The map may be finite while the score or the model's output is not (a NaN that the
        gradient does not see): such a result has no meaningful class or score, refuse it."""
        bad = ~np.isfinite(np.asarray(res.score, dtype=np.float64))
        what = "the explained score"
        output = res.outputs.get(self.explainer.output_name)
        if output is not None and np.issubdtype(np.asarray(output).dtype, np.floating) and np.ndim(output) >= 1:
            rows = ~np.isfinite(np.asarray(output, dtype=np.float64).reshape(len(output), -1)).all(axis=1)
            if rows.any():
                bad, what = bad | rows, f"the model's output {self.explainer.output_name!r}"
        if bad.any():
            raise NonFiniteError(f"{what} is NaN/Inf although the input is finite; nothing was written for this "
                                 "image (check the model on it alone in onnxruntime)")

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

    def _write(self, source, stem, photo, geometry, res, i, rank) -> Record:
        k = int(res.class_index[i])
        heat = np.clip(geometry.to_original(res.cam[i]), 0.0, 1.0).astype(np.float32)
        png, npy = self._output_paths(stem, k)
        write_png(png, blend(photo, heat, self.alpha, self.colormap))
        write_npy(npy, heat)
        return Record(image=source.name, class_index=k, label=label_for(self.labels, k),
                      score=float(res.score[i]), probability=self._probability(res, i, k), rank=rank,
                      method=self.method, layer=self.layer, overlay=str(png), npy=str(npy))

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

    def _output_paths(self, stem: str, k: int):
        """`<stem>_<k>.png` and `.npy`, or `<stem>_<k>-2.png`... when that name is taken by an input of
        the run (explaining photos into their own folder: `cat.png`'s overlay `cat_0.png` would
        replace the photo `cat_0.png`), by another output of this run, or by something that is
        not a regular file."""
        n = 1
        while True:
            suffix = "" if n == 1 else f"-{n}"
            paths = [self.out_dir / f"{stem}_{k}{suffix}{ext}" for ext in (".png", ".npy")]
            if not any(self._taken(p) for p in paths):
                self._written.update(paths)
                return paths
            n += 1

    def _taken(self, path: Path) -> bool:
        if path in self._written:
            return True
        identity = file_identity(path)
        if identity is None:
            return False
        try:
            check_output_file(path)
        except OutputError:
            return True
        return identity in self._protected

    def _unique_stem(self, stem: str) -> str:
        """Two photos with the same stem (a/x.png, b/x.jpg) must not overwrite each other's outputs."""
        candidate, n = stem, 1
        while candidate in self._stems:
            n += 1
            candidate = f"{stem}-{n}"
        self._stems.add(candidate)
        return candidate


def write_summary(out_dir, records: Sequence[Record], name: str = SUMMARY_NAME) -> Path:
    """All records as JSON lines, written atomically. A float that is not finite is written as
    null: a bare NaN is not JSON, and would break every strict reader of the file."""
    text = "".join(json.dumps(_finite_or_null(asdict(r)), ensure_ascii=False, allow_nan=False) + "\n"
                   for r in records)
    return atomic_write_bytes(Path(os.fspath(out_dir)) / name, text.encode("utf-8"))


def _finite_or_null(record: dict) -> dict:
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in record.items()}
