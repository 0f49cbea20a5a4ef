"""`onnxcam.evaluate(...)`: every metric for every image x method, as records.

Images are photos (paths: read and preprocessed by onnxcam.io, maps mapped back onto the photo for
the box/mask metrics) or a ready batch in the model's layout (maps stay at input resolution). Maps
come from the Explainer by method name, or from outside (`maps={"name": array [N, H, W]}`). The
images are handled `batch_size` at a time, so memory stays bounded on long lists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from ..errors import OutputError, UsageError
from . import class_sensitivity as sensitivity_metric
from . import confidence as confidence_metric
from . import localisation, perturbation, road as road_metric, sanity as sanity_metric
from .maps import MapSource, check_maps
from .scoring import DEFAULT_BATCH, ScoreModel

METRICS = ("deletion", "insertion", "road", "confidence", "pointing", "localisation", "class_sensitivity", "sanity")
# Metrics that need no ground truth; "pointing" and "localisation" join when boxes or masks are given.
DEFAULT_METRICS = ("deletion", "insertion", "road", "confidence", "class_sensitivity", "sanity")
GROUND_TRUTH_METRICS = ("pointing", "localisation")


@dataclass
class EvaluationSettings:
    steps: int = 50
    deletion_baseline: str = "zeros"
    insertion_baseline: str = "blur"
    road_percentiles: Sequence[float] = road_metric.PERCENTILES
    road_noise: float = road_metric.NOISE
    pointing_tolerance: float = 0.0
    top_k_fraction: float = 0.1
    wsol_fraction: float = localisation.WSOL_FRACTION
    sanity_stages: Optional[int] = 5
    seed: int = 0

    def check(self) -> None:
        """One clear error for a setting out of range, before any work."""
        problems = []
        if int(self.steps) < 1:
            problems.append(f"steps must be at least 1 (got {self.steps})")
        if self.road_noise < 0:
            problems.append(f"the ROAD noise is a standard deviation >= 0 (got {self.road_noise})")
        if not all(0 < p < 100 for p in self.road_percentiles):
            problems.append(f"ROAD percentiles must lie strictly between 0 and 100 (got {list(self.road_percentiles)})")
        if self.pointing_tolerance < 0:
            problems.append(f"the pointing tolerance is a distance in pixels >= 0 (got {self.pointing_tolerance})")
        if not 0 < self.top_k_fraction <= 1:
            problems.append(f"the top-k fraction must be in (0, 1] (got {self.top_k_fraction})")
        if not 0 < self.wsol_fraction <= 1:
            problems.append(f"the localisation threshold is a fraction of the maximum in (0, 1] "
                            f"(got {self.wsol_fraction})")
        if self.sanity_stages is not None and self.sanity_stages < 1:
            problems.append(f"sanity stages must be at least 1, or None for every layer (got {self.sanity_stages})")
        if problems:
            raise UsageError("; ".join(problems))


@dataclass
class Evaluation:
    records: List[dict] = field(default_factory=list)  # one per image x method
    settings: Optional[EvaluationSettings] = None
    options: Dict[str, object] = field(default_factory=dict)  # what the run used (the report's header)
    written: List[str] = field(default_factory=list)  # files written to out_dir, if one was given

    def metric_keys(self) -> List[str]:
        return scalar_keys(self.records)

    def methods(self) -> List[str]:
        return list(dict.fromkeys(r["method"] for r in self.records))

    def summary(self) -> Dict[str, Dict[str, float]]:
        """Per method, the mean of every scalar metric over the images (NaN-free ones only)."""
        out = {}
        for method in self.methods():
            rows = [r for r in self.records if r["method"] == method]
            means = {"images": len(rows)}
            for key in scalar_keys(rows):
                values = np.array([r[key] for r in rows if r.get(key) is not None], dtype=np.float64)
                values = values[np.isfinite(values)]
                if values.size:
                    means[key] = float(values.mean())
            out[method] = means
        return out


def scalar_keys(rows) -> List[str]:
    keys = []
    for row in rows:
        for key, value in row.items():
            if key not in keys and key not in ("class_index",) and isinstance(value, (int, float, bool)) \
                    and not isinstance(value, str):
                keys.append(key)
    return keys


@dataclass
class _Image:
    name: str
    tensor: np.ndarray
    geometry: object = None  # io.preprocess.Geometry for photos
    shape: tuple = ()  # the photo's (H, W), or the input's


def evaluate(model, images, methods: Union[str, Sequence[str]] = ("gradcam",), maps: Optional[dict] = None,
             metrics: Optional[Sequence[str]] = None, layer="auto", class_index=None, output: Optional[str] = None,
             score: str = "probability", score_fn=None, boxes=None, masks=None, batch_size: int = DEFAULT_BATCH,
             providers=None, preset: Optional[str] = None, size=None, resize: str = "direct", bgr=None,
             target: str = "class", target_options: Optional[dict] = None,
             settings: Optional[EvaluationSettings] = None,
             progress: Optional[Callable[[int], None]] = None, out_dir=None, report: bool = False,
             overwrite: bool = False, **setting_overrides) -> Evaluation:
    """Evaluate maps of `methods` (Explainer method names) and/or outside `maps` on `images`.

    images: paths of photos (or folders), or a float batch [N, ...] in the model's layout.
    metrics: any of METRICS (default DEFAULT_METRICS, plus pointing/localisation with ground truth).
    boxes: {"image name or stem": [[x0, y0, x1, y1], ...]} or the path of such a JSON file.
    masks: a folder of mask images (same stem as the photo), or a boolean array [N, H, W].
    Extra keyword arguments set EvaluationSettings fields (steps=, deletion_baseline=, ...).
    out_dir: also write metrics.jsonl, metrics.csv, summary.json and the plots there (`written`);
    report=True adds index.html (refused over an earlier one unless overwrite=True, as `explain`).
    """
    settings = settings or EvaluationSettings()
    for key, value in setting_overrides.items():
        if not hasattr(settings, key):
            raise UsageError(f"evaluate(): unknown option {key!r}")
        setattr(settings, key, value)
    settings.check()
    methods = [methods] if isinstance(methods, str) else list(methods or [])
    maps = dict(maps or {})
    if not methods and not maps:
        raise UsageError("nothing to evaluate: give at least one method or one map")
    if isinstance(boxes, (str, os.PathLike)):
        boxes = localisation.load_boxes(boxes)
    metrics = _choose_metrics(metrics, has_truth=boxes is not None or masks is not None)
    _check_output(out_dir, report, overwrite, methods + list(maps))  # before the long run
    scorer = ScoreModel(model, output=output, score=score, batch_size=batch_size, providers=providers,
                        score_fn=score_fn)
    source = MapSource(model, layer=layer, target=target, target_options=target_options, output=output,
                       providers=providers, batch_size=batch_size)
    loaders = _image_list(images, scorer, preset, size, resize, bgr)
    evaluation = Evaluation(settings=settings, options=_options(
        model, len(loaders), methods, maps, metrics, layer, class_index, output, score, batch_size, preset, size,
        resize, settings))
    for start in range(0, len(loaders), batch_size):
        chunk = [load() for load in loaders[start:start + batch_size]]
        x = np.stack([item.tensor for item in chunk])
        classes = _classes(class_index, scorer, x, start, len(loaders))
        for method in methods:
            cams, classes_used = source.maps(method, x, classes)
            batch = _Batch(method, np.asarray(cams), np.asarray(classes_used, np.int64), x, chunk, start, scorer,
                           source, settings, boxes, masks)
            evaluation.records.extend(_evaluate_maps(batch, metrics, ",".join(source.explainer(method).layers)))
        for name, given in maps.items():
            cams = check_maps(np.asarray(given)[start:start + len(chunk)], len(chunk), scorer.spatial_size(x), name)
            batch = _Batch(name, cams, np.asarray(classes, np.int64), x, chunk, start, scorer, None, settings,
                           boxes, masks)
            evaluation.records.extend(_evaluate_maps(batch, metrics, ""))
        if progress is not None:
            progress(len(chunk))
    if out_dir is not None:
        from .report import write_all

        evaluation.written = [str(p) for p in write_all(evaluation, out_dir, report=report)]
    return evaluation


def _check_output(out_dir, report: bool, overwrite: bool, names: Sequence[str]) -> None:
    """Refuse a report without a folder, or files of an earlier run in the folder (explain's rule):
    metrics, plots and the page alike, so a second run never replaces a first one's results."""
    if out_dir is None:
        if report:
            raise UsageError("evaluate(report=True) needs out_dir=: the folder for index.html and its plots")
        return
    from ..io.files import ensure_output_dir
    from .report import planned_files

    folder = ensure_output_dir(out_dir)
    earlier = [folder / name for name in planned_files(names, report) if (folder / name).is_file()]
    if earlier and not overwrite:
        more = f", with {len(earlier) - 1} more of its files" if len(earlier) > 1 else ""
        raise OutputError(f"{earlier[0]}: exists (from an earlier run?{more}); choose another --out-dir or pass "
                          "--overwrite to replace the earlier results")


def _options(model, images: int, methods, maps, metrics, layer, class_index, output, score, batch_size, preset,
             size, resize, settings: EvaluationSettings) -> Dict[str, object]:
    """What the run used, for the report's header (plain values only)."""
    from dataclasses import asdict

    from .._version import __version__

    label = str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    chosen = "top" if class_index is None else int(class_index) if np.ndim(class_index) == 0 else "per image"
    options = {"model": label, "images": images, "methods": list(methods), "outside_maps": list(maps),
               "metrics": list(metrics), "layer": layer if isinstance(layer, str) else list(layer), "class": chosen, "output": output or "auto",
               "score": score, "batch_size": batch_size, "preset": preset or "model metadata, else imagenet",
               "size": list(size) if size else "model's", "resize": resize}
    options.update(asdict(settings))
    options["onnxcam_version"] = __version__
    return options


def _choose_metrics(metrics, has_truth: bool) -> tuple:
    if metrics is None:
        return DEFAULT_METRICS + (GROUND_TRUTH_METRICS if has_truth else ())
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise UsageError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    if not has_truth and set(metrics) & set(GROUND_TRUTH_METRICS):
        raise UsageError("pointing and localisation need ground truth: give boxes (--boxes FILE.json) or "
                         "masks (--masks DIR)")
    return metrics


def _classes(class_index, scorer, x, start, total) -> np.ndarray:
    if class_index is None:
        return scorer.class_scores(x).argmax(axis=1) if scorer.score_fn is None else np.full(len(x), -1)
    classes = np.asarray(class_index, dtype=np.int64).reshape(-1)
    if classes.size == 1:
        return np.full(len(x), classes[0], np.int64)
    if classes.size != total:
        raise UsageError(f"class_index: give one class or one per image ({total}), got {classes.size}")
    return classes[start:start + len(x)]


def _image_list(images, scorer, preset, size, resize, bgr) -> List[Callable[[], _Image]]:
    """One loader per image: photos are read and preprocessed only when their chunk comes up, so a
    long list never sits in memory as tensors."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise UsageError(f"images: a batch must be 4-D in the model's layout ({scorer.layout}), got {images.shape}")
        h, w = scorer.spatial_size(images)
        return [lambda i=i: _Image(f"image{i}", np.asarray(images[i], np.float32), None, (h, w))
                for i in range(len(images))]
    from ..io.images import list_images, read_image
    from ..io.preprocess import PRESET_METADATA_KEY, PRESETS, Preprocessor, input_size

    paths = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    found = list_images(paths)
    if not found.images:
        raise UsageError(f"no images found in {', '.join(map(str, paths))}")
    meta = {p.key: p.value for p in scorer.proto.metadata_props}
    preset = preset or (meta.get(PRESET_METADATA_KEY) if meta.get(PRESET_METADATA_KEY) in PRESETS else "imagenet")
    channels = scorer.input_shape[1] if scorer.layout == "NCHW" else scorer.input_shape[3]
    pre = Preprocessor(size=input_size(scorer.input_shape, scorer.layout, size), preset=preset, resize=resize,
                       bgr=bgr, layout=scorer.layout, channels=channels if channels in (1, 3) else 3)

    def load(path):
        photo = read_image(path)
        tensor, geometry = pre(photo)
        return _Image(str(path), tensor, geometry, photo.shape[:2])

    return [lambda p=p: load(p) for p in found.images]


def _region(item: _Image, index: int, boxes, masks):
    """(mask [H, W] in the map's frame, boxes list or None) for one image, or (None, None)."""
    box_list = None
    if boxes is not None:
        box_list = localisation.boxes_for(boxes, item.name) or boxes.get(str(index))
    if masks is not None:
        if isinstance(masks, np.ndarray):
            return np.asarray(masks[index], bool), box_list
        mask = localisation.load_mask(masks, item.name, item.shape)
        if mask is not None:
            return mask, box_list
    if box_list is not None:
        return localisation.box_mask(box_list, item.shape), box_list
    return None, None


@dataclass
class _Batch:
    """One chunk of images and one method's maps: what every metric runner reads."""

    method: str
    cams: np.ndarray  # [N, H, W] at the model input's resolution
    classes: np.ndarray  # [N]
    x: np.ndarray
    items: List[_Image]
    offset: int  # index of the first image in the whole run
    scorer: ScoreModel
    source: Optional[MapSource]  # None for maps given from outside
    settings: EvaluationSettings
    boxes: Optional[dict]
    masks: object


# Each runner returns {record key: [one value per image]}; `evaluate` merges them into the records.

def _deletion(b: _Batch) -> dict:
    result = perturbation.deletion(b.scorer, b.x, b.cams, b.classes, b.settings.steps, b.settings.deletion_baseline)
    return {"deletion_auc": result.auc, "deletion_curve": list(result.curves)}


def _insertion(b: _Batch) -> dict:
    result = perturbation.insertion(b.scorer, b.x, b.cams, b.classes, b.settings.steps,
                                    b.settings.insertion_baseline)
    return {"insertion_auc": result.auc, "insertion_curve": list(result.curves)}


def _road(b: _Batch) -> dict:
    s = b.settings
    morf, lerf = (road_metric.road(b.scorer, b.x, b.cams, b.classes, order, s.road_percentiles, s.road_noise, s.seed)
                  for order in ("morf", "lerf"))
    return {"road_morf": morf.score, "road_lerf": lerf.score, "road_combined": road_metric.road_combined(morf, lerf)}


def _confidence(b: _Batch) -> dict:
    result = confidence_metric.confidence_change(b.scorer, b.x, b.cams, b.classes)
    return {"score": result.original, "drop_in_confidence": result.drop, "relative_drop": result.relative_drop,
            "increase_in_confidence": result.increase}


def _class_sensitivity(b: _Batch) -> dict:
    if b.source is None or b.scorer.score_fn is not None:
        return {}  # needs the Explainer (maps for other classes) and a class table
    result = sensitivity_metric.class_sensitivity(b.source, b.method, b.x, b.scorer)
    return {"class_sensitivity_pearson": result.pearson, "class_sensitivity_spearman": result.spearman}


def _sanity(b: _Batch) -> dict:
    if b.source is None:
        return {}  # needs the Explainer to re-explain the randomised model
    result = sanity_metric.cascading_randomisation(b.source, b.method, b.x, b.cams, b.classes,
                                                   b.settings.sanity_stages, b.settings.seed)
    out = {"sanity_stages": [[{"stage": st.stage, "node": st.node, "op": st.op, "spearman": st.spearman[i],
                               "ssim": st.ssim[i]} for st in result.stages] for i in range(len(b.x))]}
    if result.stages:
        out.update(sanity_spearman=result.stages[-1].spearman, sanity_ssim=result.stages[-1].ssim)
    return out


def _ground_truth(b: _Batch, pointing: bool, boxes_needed: bool) -> dict:
    s = b.settings
    out: Dict[str, list] = {}
    for i, item in enumerate(b.items):
        region, box_list = _region(item, b.offset + i, b.boxes, b.masks)
        if region is None or (boxes_needed and not box_list):
            continue
        cam = item.geometry.to_original(b.cams[i]) if item.geometry is not None else b.cams[i]
        if pointing:
            k = max(1, int(round(s.top_k_fraction * cam.size)))
            values = {"pointing_game": float(localisation.pointing_game(cam, region, s.pointing_tolerance)),
                      "energy_pointing_game": localisation.energy_pointing_game(cam, region),
                      "top_k_precision": localisation.top_k_precision(cam, region, k)}
        else:
            iou = localisation.localisation_iou(cam, box_list, s.wsol_fraction)
            values = {"localisation_iou": iou, "localisation_hit": float(iou >= 0.5)}
        for key, value in values.items():
            out.setdefault(key, [None] * len(b.items))[i] = value
    return out


RUNNERS: Dict[str, Callable[[_Batch], dict]] = {
    "deletion": _deletion, "insertion": _insertion, "road": _road, "confidence": _confidence,
    "class_sensitivity": _class_sensitivity, "sanity": _sanity,
    "pointing": lambda b: _ground_truth(b, pointing=True, boxes_needed=False),
    "localisation": lambda b: _ground_truth(b, pointing=False, boxes_needed=True),
}


def _evaluate_maps(batch: _Batch, metrics, layer: str) -> List[dict]:
    records = [{"image": item.name, "method": batch.method, "layer": layer, "class_index": int(k)}
               for item, k in zip(batch.items, batch.classes)]
    for metric in metrics:
        for key, values in RUNNERS[metric](batch).items():
            for record, value in zip(records, values):
                if value is not None:
                    record[key] = _plain(value)
    return records


def _plain(value):
    """numpy -> JSON-ready Python values (NaN stays a float NaN; the writers turn it into null)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (np.floating, float)):
        return float(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
