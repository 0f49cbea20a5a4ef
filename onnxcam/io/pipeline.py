"""Photos in, files out: the loop behind `onnxcam explain` and `onnxcam demo`.

For each photo: read, preprocess (with the geometry kept), run the Explainer in batches, map every
CAM back onto the original photo, write `<stem>_<class>_<method>.png` (overlay) and `.npy` (the map
at the photo's resolution; NaN where a centre crop cut the photo, so "not seen" never reads as "no
evidence"), one more pair per layer `<stem>_<class>_<method>_<layer>` when several layers are
explained, and collect one summary record each. `write_summary` writes them as JSON lines, each
carrying the options of the run (model and its SHA-256, preset, size, resize, layers, method,
counterfactual, onnxcam version). Nothing is overwritten unless asked. A photo that cannot be read
is reported and skipped, the others go on.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .._version import __version__
from ..errors import ImageError, NonFiniteError, OutputError, UsageError
from .files import atomic_write_bytes, check_output_file, file_identity
from .images import DEFAULT_MAX_PIXELS, read_image
from .labels import label_for
from .overlay import DEFAULT_ALPHA, DEFAULT_COLORMAP, blend, colormap_id, write_png
from .preprocess import Preprocessor

SUMMARY_NAME = "summary.jsonl"
NPY_FORMATS = ("none", "float16", "float32")
TOP_CLASSES = 5  # classes with probabilities kept per image (summary and report)
PRESET_SOURCES = ("--preset", "model metadata", "default")


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
class RunOptions:
    """What a run used, written into every summary record and shown in the report."""

    model: str
    model_sha256: Optional[str]
    preset: str
    preset_source: str  # one of PRESET_SOURCES: who chose the preset
    size: Tuple[int, int]
    resize: str
    layers: Tuple[str, ...]
    methods: Tuple[str, ...]
    counterfactual: bool
    target: str
    onnxcam_version: str = __version__

    def as_dict(self) -> dict:
        d = asdict(self)
        d["size"], d["layers"], d["methods"] = list(self.size), list(self.layers), list(self.methods)
        return d


@dataclass
class Record:
    """One line of summary.jsonl: one map (image x class x method x layer) and the run's options."""

    image: str
    class_index: int
    label: str
    score: float
    probability: Optional[float]
    rank: int
    method: str
    layer: str  # the layer of this map, or "fused" for the mean over several layers
    overlay: str
    npy: Optional[str]
    all_zero: bool = False
    thumbnail: Optional[str] = None  # the overlay, small (the report's grid)
    photo_thumbnail: Optional[str] = None  # the photo, small
    top: List[dict] = field(default_factory=list)  # [{"class_index", "label", "probability"}, ...] best first
    options: Dict[str, object] = field(default_factory=dict)  # RunOptions.as_dict()


@dataclass
class RunResult:
    records: List[Record] = field(default_factory=list)
    failures: List[ImageError] = field(default_factory=list)


class PartialRunError(ImageError):
    """Some images could not be read; `records` holds what the others produced (already written)."""

    def __init__(self, message: str, records: List[Record]):
        super().__init__(message)
        self.records = records


class ExplainRun:
    """Explain photos with one Explainer and write overlays, maps and summary records to `out_dir`."""

    def __init__(self, explainer, preprocessor: Preprocessor, out_dir, labels=None, class_index=None,
                 top_k: Optional[int] = None, batch_size: int = 8, alpha: float = DEFAULT_ALPHA,
                 colormap: str = DEFAULT_COLORMAP, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 on_warning: Callable[[str], None] = lambda message: None, inputs=None,
                 on_image_error: Optional[Callable[[str], None]] = None, options: Optional[RunOptions] = None,
                 save_npy: str = "float32", overwrite: bool = False, thumbnails: bool = False,
                 protected=()):
        if class_index is not None and top_k is not None:
            raise UsageError("give either --class or --top-k, not both")
        if top_k is not None and top_k < 1:
            raise UsageError(f"--top-k must be at least 1, got {top_k}")
        n_classes = getattr(explainer, "n_classes", None)
        if top_k is not None and n_classes and top_k > n_classes:
            raise UsageError(f"--top-k {top_k} is more than the {n_classes} classes the model has; "
                             f"use --top-k 1..{n_classes}")
        if batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
        if not 0.0 <= alpha <= 1.0:
            raise UsageError(f"--alpha must be between 0 and 1, got {alpha}")
        if save_npy not in NPY_FORMATS:
            raise UsageError(f"--save-npy must be one of {', '.join(NPY_FORMATS)}, got {save_npy!r}")
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
        self.on_image_error = on_image_error or on_warning
        self.inputs = dict(inputs or {})  # extra run-time feeds (target inputs, a model's other inputs)
        self.layers = list(explainer.layers)
        self.layer_tokens = _unique_tokens(self.layers)  # layer name -> its part of file names
        self.methods = list(getattr(explainer, "methods", None) or [getattr(explainer, "method", "")])
        self.counterfactual = bool(getattr(getattr(explainer, "spec", None), "counterfactual", False))
        self.options = options
        self.save_npy = save_npy
        self.overwrite = overwrite
        self.thumbnails = thumbnails
        self._stems = set()
        self._coincidences = set()
        # Files no output may replace: the photos of the run (found in `run`) and what the caller
        # names (the model, a labels file, --input arrays...), compared by identity (links too).
        self._protected = {i for i in map(file_identity, protected) if i is not None}
        self._written = set()  # output paths of this run, so that no two outputs share a name

    def run(self, sources: Sequence[Source], progress: Optional[Callable[[int], None]] = None) -> RunResult:
        """Explain `sources` batch by batch. A photo that cannot be read, or whose model output is
        NaN/Inf, is reported (on_warning) and recorded in `failures`; the others go on."""
        self.prepare(sources)
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

    def prepare(self, sources: Sequence[Source]) -> None:
        """Protect the photos from being overwritten and check where the summary goes."""
        for source in sources:
            if not isinstance(source.image, np.ndarray):
                identity = file_identity(source.image)
                if identity is not None:
                    self._protected.add(identity)
        self._check_summary_path()

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
        self.on_image_error(str(exc))

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
        self._note_coincidences(first)
        records = []
        for i, (source, photo) in enumerate(loaded):
            stem = self._unique_stem(source.stem)
            top = self._top_classes(first, i)
            photo_thumb = self._photo_thumbnail(stem, photo)
            for rank, res in ranked:
                for record in self._write(source, stem, photo, geometries[i], res, i, rank):
                    record.top, record.photo_thumbnail = top, photo_thumb
                    records.append(record)
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

    def _maps(self, res, i) -> List[Tuple[str, str, np.ndarray]]:
        """(method, layer, map at input resolution) for image i: the fused map per method, and one
        per layer when several layers were explained."""
        cams = res.cams or {self.methods[0]: res.cam}
        out = []
        for method, cam in cams.items():
            per_layer = res.method_layer_cams.get(method)
            if per_layer is None and method == self.methods[0]:
                per_layer = res.layer_cams
            several = per_layer is not None and len(self.layers) > 1
            # a method without layer maps over several layers (an input-space one) names no layer
            only = self.layers[0] if len(self.layers) == 1 and per_layer is None else ""
            out.append((method, "fused" if several else only, cam[i]))
            if several:
                out.extend((method, layer, per_layer[i, j]) for j, layer in enumerate(self.layers))
        return out

    def _write(self, source, stem, photo, geometry, res, i, rank) -> List[Record]:
        """One overlay, map and record per method (and per layer when there are several)."""
        k = int(res.class_index[i])
        label = label_for(self.labels, k)
        probability = self._probability(res, i, k)
        records = []
        several_layers = len(self.layers) > 1
        signed_methods = getattr(self.explainer, "signed_methods", ())
        for method, layer, cam in self._maps(res, i):
            signed = method in signed_methods  # maps in [-1, 1]: keep the sign, diverging colours
            heat = geometry.to_original(cam, outside=np.nan)
            heat = np.clip(heat, -1.0 if signed else 0.0, 1.0).astype(np.float32)  # NaN stays NaN
            name = f"{stem}_{k}_{self._method_token(method)}"
            if several_layers and layer not in ("fused", ""):
                name += f"_{self.layer_tokens[layer]}"
            png, npy = self._output_paths(name)
            all_zero = not bool(np.nanmax(np.abs(heat)) > 0) if np.isfinite(heat).any() else True
            if all_zero:
                self.on_warning(self._zero_map_message(source.name, k, label, method, layer))
            rgb = overlay_image(photo, heat, self.alpha, self.colormap, signed=signed)
            write_png(png, rgb)
            if npy is not None:
                write_map(npy, heat, self.save_npy)
            thumb = self._thumbnail(name, rgb)
            records.append(Record(image=source.name, class_index=k, label=label, score=float(res.score[i]),
                                  probability=probability, rank=rank, method=method, layer=layer, overlay=str(png),
                                  npy=None if npy is None else str(npy), all_zero=all_zero, thumbnail=thumb,
                                  options=self.options.as_dict() if self.options else {}))
        return records

    def _method_token(self, method: str) -> str:
        """The method as written in file names: gradcam++ -> gradcampp; a counterfactual run says so."""
        return _file_safe(method) + ("-counterfactual" if self.counterfactual else "")

    def _output_paths(self, name: str):
        """`<name>.png` and `.npy`, or `<name>-2.png`... when that name is taken by an input of the run
        (explaining photos into their own folder must never replace a photo), by another output of
        this run, or by something that is not a regular file. A file of an earlier run is refused
        unless --overwrite."""
        n = 1
        while True:
            suffix = "" if n == 1 else f"-{n}"
            png = self.out_dir / f"{name}{suffix}.png"
            npy = None if self.save_npy == "none" else self.out_dir / f"{name}{suffix}.npy"
            paths = [p for p in (png, npy) if p is not None]
            if not any(self._taken(p) for p in paths):
                self._claim(*paths)
                return png, npy
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

    def _claim(self, *paths) -> None:
        """Refuse to overwrite a file from an earlier run (or from this one) unless asked to."""
        for path in paths:
            if path is None:
                continue
            if path in self._written:
                raise OutputError(f"{path}: this run would write the file twice; report this as a bug")
            if path.exists() and not self.overwrite:
                raise OutputError(f"{path}: exists (from an earlier run?); choose another --out-dir or pass "
                                  "--overwrite to replace it")
            self._written.add(path)

    def _zero_map_message(self, image, k, label, method, layer) -> str:
        what = f"{image}: the {method} map for class {k} ({label})"
        if layer and layer != "fused":
            what += f" at layer {layer}"
        if self.counterfactual:
            why = ("with --counterfactual this is expected where every cell of the layer argues for the class "
                   "(the negated gradient is <= 0 everywhere, so nothing argues against it); try an earlier "
                   "layer (onnxcam layers MODEL)")
        else:
            why = ("the ReLU at the end of the method removed every cell: the weighted activations are <= 0 "
                   "everywhere (a class the model strongly rejects, or a layer whose gradient is zero); try "
                   "another layer or method")
        return f"{what} is all zero: {why}"

    def _note_coincidences(self, res) -> None:
        """Several methods giving the same map is expected at the layer right before global average
        pooling (the gradient is constant over space there); say so once instead of leaving users
        to think --method does nothing."""
        cams = res.cams or {}
        names = list(cams)
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                pair = (names[a], names[b])
                if pair in self._coincidences:
                    continue
                x, y = cams[names[a]], cams[names[b]]
                if np.nanmax(x) > 0 and np.nanmax(np.abs(x - y)) <= 1e-4:
                    self._coincidences.add(pair)
                    self.on_warning(f"{pair[0]} and {pair[1]} give the same map (within 1e-4) at layer "
                                    f"{','.join(self.layers)}: expected right before global average pooling, where "
                                    "the gradient is the same at every position (see the README, Methods); pick "
                                    "an earlier layer to see them differ")

    def _probability(self, res, i, k) -> Optional[float]:
        probabilities = self._probabilities(res, i)
        if probabilities is None or not 0 <= k < probabilities.shape[0]:
            return None
        return float(probabilities[k])

    def _probabilities(self, res, i) -> Optional[np.ndarray]:
        try:
            row = self._logits(res)[i]
        except UsageError:
            return None
        if np.all(row >= 0) and np.all(row <= 1) and abs(row.sum() - 1) < 1e-3:
            return row  # already probabilities
        e = np.exp(row - row.max())
        return e / e.sum()

    def _top_classes(self, res, i) -> List[dict]:
        if getattr(getattr(self.explainer, "spec", None), "target", "class") != "class":
            return []  # a detector's or an embedding's 2-D output holds no classes to rank
        probabilities = self._probabilities(res, i)
        if probabilities is None:
            return []
        order = np.argsort(-probabilities, kind="stable")[:TOP_CLASSES]
        return [{"class_index": int(c), "label": label_for(self.labels, int(c)),
                 "probability": round(float(probabilities[c]), 6)} for c in order]

    def _photo_thumbnail(self, stem: str, photo) -> Optional[str]:
        return self._thumbnail(f"{stem}_photo", photo)

    def _thumbnail(self, name: str, rgb) -> Optional[str]:
        """A small JPEG for the report (written only when a report is asked for)."""
        if not self.thumbnails:
            return None
        from .report import write_thumbnail

        return str(write_thumbnail(self.out_dir, name, rgb, overwrite=self.overwrite))

    def _unique_stem(self, stem: str) -> str:
        """Two photos with the same stem (a/x.png, b/x.jpg) must not overwrite each other's outputs."""
        candidate, n = stem, 1
        while candidate in self._stems:
            n += 1
            candidate = f"{stem}-{n}"
        if candidate != stem:
            self.on_warning(f"two images are named {stem!r} (in different folders or formats): the files of the later "
                            f"one are named {candidate}_...")
        self._stems.add(candidate)
        return candidate


def overlay_image(photo: np.ndarray, heat: np.ndarray, alpha: float, colormap: str,
                  signed: bool = False) -> np.ndarray:
    """The heatmap blended over the photo; where the map is NaN (cropped away) the photo is shown
    as it is, so the overlay shows which part the model saw. Signed maps use a diverging colormap."""
    blended = blend(photo, np.nan_to_num(heat, nan=0.0), alpha, colormap, signed=signed)
    unseen = np.isnan(heat)
    if unseen.any():
        blended[unseen] = photo[unseen]
    return blended


def write_map(path, heat: np.ndarray, dtype: str = "float32") -> Path:
    """The map as .npy in float32 or float16 (half the size: 3 significant digits), atomically."""
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.asarray(heat, dtype=np.dtype(dtype)), allow_pickle=False)
    return atomic_write_bytes(path, buffer.getvalue())


def _file_safe(name: str) -> str:
    """A method or layer name as part of a file name (gradcam++ -> gradcampp, /a/b:0 -> a-b-0)."""
    text = name.replace("+", "p")
    text = "".join(c if c.isalnum() or c in "-." else "-" for c in text).strip("-.")
    return text or "x"


def _unique_tokens(names) -> Dict[str, str]:
    """File-name-safe tokens for names, distinct even when two names differ only in unsafe
    characters (/a/b and a-b)."""
    tokens: Dict[str, str] = {}
    for name in names:
        token, n = _file_safe(name), 1
        while token in tokens.values():
            n += 1
            token = f"{_file_safe(name)}-{n}"
        tokens[name] = token
    return tokens


def write_summary(out_dir, records: Sequence[Record], name: str = SUMMARY_NAME) -> Path:
    """All records as JSON lines, written atomically. A float that is not finite is written as
    null: a bare NaN is not JSON, and would break every strict reader of the file."""
    text = "".join(json.dumps(_finite_or_null(asdict(r)), ensure_ascii=False, allow_nan=False) + "\n"
                   for r in records)
    return atomic_write_bytes(Path(os.fspath(out_dir)) / name, text.encode("utf-8"))


def file_sha256(path) -> Optional[str]:
    """SHA-256 of a file (the .onnx itself; external data files are not included), None if unreadable."""
    digest = hashlib.sha256()
    try:
        with open(os.fspath(path), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def refuse_earlier_run(out_dir, overwrite: bool, report: bool) -> None:
    """An earlier run's summary (or report) in the output folder: refuse before any work, unless
    --overwrite (re-running with another --method must not replace the first run's summary)."""
    if overwrite:
        return
    out_dir = Path(os.fspath(out_dir))
    for path in [out_dir / SUMMARY_NAME] + ([out_dir / "index.html"] if report else []):
        if path.is_file():  # a FIFO or device there is refused by name when the run checks its outputs
            raise OutputError(f"{path}: exists (from an earlier run?); choose another --out-dir or pass --overwrite "
                              "to replace the earlier results")


def choose_preset(explainer, preset: Optional[str]) -> Tuple[str, str]:
    """(preset, who chose it): the one asked for, else the model's metadata, else imagenet."""
    if preset:
        return preset, "--preset"
    named = model_preset(explainer)
    if named:
        return named, "model metadata"
    return "imagenet", "default"


def preset_note(preset: str, source: str) -> str:
    """One line saying which normalisation the run uses and why (printed by explain)."""
    from .preprocess import PRESETS

    description = PRESETS[preset].description if preset in PRESETS else ""
    if source == "--preset":
        why = "as asked (--preset)"
    elif source == "model metadata":
        why = "named by the model's metadata (onnxcam.preset)"
    else:
        why = "the default: the model names no preset in its metadata"
    return f"preset {preset} ({description}): {why}"


# ---------------------------------------------------------------------- the whole run
def explain_sources(explainer, sources, out_dir, *, preset=None, size=None, resize="direct", bgr=None,
                    labels_path=None, class_index=None, top_k=None, batch_size=8, alpha=DEFAULT_ALPHA,
                    colormap=DEFAULT_COLORMAP, max_pixels=None, inputs=None,
                    on_warning: Callable[[str], None] = lambda message: None, progress=None,
                    save_npy: str = "float32", overwrite: bool = False, report: bool = False,
                    on_info: Callable[[str], None] = lambda message: None, protected=()) -> List[Record]:
    """Preprocess, explain and write; returns the summary records. Shared by `explain` and `demo`.
    `progress(total)` may return a context manager whose value has update(n) (a progress bar).
    With `report`, also writes index.html (io.report). Raises PartialRunError (with the records
    of the images that worked, already written) when some images could not be read or explained.
    `protected`: files no output may replace besides the photos (the model, labels, --input arrays)."""
    out_dir = Path(os.fspath(out_dir))
    pre, labels, options = run_setup(explainer, preset, size, resize, bgr, labels_path, on_warning, on_info)
    many = len(sources) > 1
    run = ExplainRun(explainer, pre, out_dir, labels=labels, class_index=class_index, top_k=top_k,
                     batch_size=batch_size, alpha=alpha, colormap=colormap, max_pixels=max_pixels, inputs=inputs,
                     on_warning=on_warning, on_image_error=on_warning if many else (lambda message: None),
                     options=options, save_npy=save_npy, overwrite=overwrite, thumbnails=report,
                     protected=[p for p in [getattr(explainer, "label", None), labels_path, *protected] if p])
    run.prepare(sources)  # an input where an output would go is refused first, by name
    refuse_earlier_run(out_dir, overwrite, report)
    if many and progress is not None:
        with progress(len(sources)) as bar:
            result = run.run(sources, progress=bar.update)
    else:
        result = run.run(sources)
    if result.records:
        write_summary(out_dir, result.records)
        if report:
            from .report import write_report

            write_report(out_dir, result.records, options.as_dict())
    if result.failures:
        if not many:
            raise result.failures[0]
        raise PartialRunError(f"{len(result.failures)} of {len(sources)} images could not be read or explained (see "
                              f"the warnings above); explained the other {len(sources) - len(result.failures)}",
                              result.records)
    return result.records


def run_setup(explainer, preset, size, resize, bgr, labels_path, on_warning=lambda message: None,
              on_info=lambda message: None):
    """What a run needs besides the images, for one Explainer: the preprocessor (preset from the
    option, else the model's metadata, else imagenet — said, and warned about when defaulted),
    the labels and the run's options. Shared by explain_sources and the Ray actors."""
    from .labels import labels_for_model
    from .preprocess import input_size

    preset, preset_source = choose_preset(explainer, preset)
    on_info(preset_note(preset, preset_source))
    if preset_source == "default":
        on_warning(f"{explainer.label}: the model names no preprocessing preset (metadata onnxcam.preset); using "
                   "imagenet (mean/std). If it was trained otherwise, pass --preset (see README, Preprocessing)")
    shape = input_size(explainer.input_shape, explainer.layout, size)
    pre = Preprocessor(size=shape, preset=preset, resize=resize, bgr=bgr or None, layout=explainer.layout,
                       channels=explainer.channels)
    labels = labels_for_model(labels_path, getattr(explainer, "n_classes", None), on_warning=on_warning)
    return pre, labels, run_options(explainer, preset, preset_source, shape, resize)


def run_options(explainer, preset: str, preset_source: str, size, resize: str) -> RunOptions:
    model = str(getattr(explainer, "label", "model"))
    spec = getattr(explainer, "spec", None)
    return RunOptions(model=model, model_sha256=file_sha256(model) if os.path.isfile(model) else None, preset=preset,
                      preset_source=preset_source, size=tuple(size), resize=resize, layers=tuple(explainer.layers),
                      methods=tuple(getattr(explainer, "methods", None) or [explainer.method]),
                      counterfactual=bool(getattr(spec, "counterfactual", False)),
                      target=str(getattr(spec, "target", "class")))


def model_preset(explainer) -> Optional[str]:
    """The preset a model names in its metadata (key onnxcam.preset), if any."""
    from .preprocess import PRESET_METADATA_KEY, PRESETS

    value = getattr(explainer, "metadata", {}).get(PRESET_METADATA_KEY)
    return value if value in PRESETS else None


def records_table(records, files: bool = True) -> str:
    several_methods = len({r.method for r in records}) > 1
    several_layers = len({r.layer for r in records}) > 1
    rows = []
    for r in records:
        score = f"{r.score:.3f}" + (f" (p={r.probability:.2f})" if r.probability is not None else "")
        row = [r.image, r.class_index, r.label, score]
        if several_methods:
            row.append(r.method)
        if several_layers:
            row.append(r.layer)
        if files:
            row.append(f"{r.overlay}" + (f", {Path(r.npy).name}" if r.npy else ""))
        rows.append(row)
    headers = (["image", "class", "label", "score"] + (["method"] if several_methods else [])
               + (["layer"] if several_layers else []) + (["files"] if files else []))
    return table(rows, headers)


def table(rows, headers) -> str:
    """Plain aligned columns with a rule under the headers."""
    cells = [tuple(str(c) for c in headers)] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths).rstrip())
    return "\n".join(lines)


def _finite_or_null(record: dict) -> dict:
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in record.items()}
