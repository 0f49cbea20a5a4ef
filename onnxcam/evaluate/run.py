"""`onnxcam.evaluate(...)`: every metric for every image x method, as records.

Images are photos (paths: read and preprocessed by onnxcam.io, maps mapped back onto the photo for
the box/mask metrics) or a ready batch in the model's layout (maps stay at input resolution). Maps
come from the Explainer by method name, or from outside (`maps={"name": array [N, H, W]}`). The
images are handled `batch_size` at a time, so memory stays bounded on long lists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from ..errors import UsageError
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


@dataclass
class Evaluation:
    records: List[dict] = field(default_factory=list)  # one per image x method
    settings: Optional[EvaluationSettings] = None

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
             progress: Optional[Callable[[int], None]] = None, **setting_overrides) -> Evaluation:
    """Evaluate maps of `methods` (Explainer method names) and/or outside `maps` on `images`.

    images: paths of photos (or folders), or a float batch [N, ...] in the model's layout.
    metrics: any of METRICS (default DEFAULT_METRICS, plus pointing/localisation with ground truth).
    boxes: {"image name or stem": [[x0, y0, x1, y1], ...]} or the path of such a JSON file.
    masks: a folder of mask images (same stem as the photo), or a boolean array [N, H, W].
    Extra keyword arguments set EvaluationSettings fields (steps=, deletion_baseline=, ...).
    """
    settings = settings or EvaluationSettings()
    for key, value in setting_overrides.items():
        if not hasattr(settings, key):
            raise UsageError(f"evaluate(): unknown option {key!r}")
        setattr(settings, key, value)
    methods = [methods] if isinstance(methods, str) else list(methods or [])
    maps = dict(maps or {})
    if not methods and not maps:
        raise UsageError("nothing to evaluate: give at least one method or one map")
    if isinstance(boxes, (str, os.PathLike)):
        boxes = localisation.load_boxes(boxes)
    metrics = _choose_metrics(metrics, has_truth=boxes is not None or masks is not None)
    scorer = ScoreModel(model, output=output, score=score, batch_size=batch_size, providers=providers,
                        score_fn=score_fn)
    source = MapSource(model, layer=layer, target=target, target_options=target_options, output=output,
                       providers=providers, batch_size=batch_size)
    loaded = _load_images(images, scorer, source if methods else None, preset, size, resize, bgr)
    evaluation = Evaluation(settings=settings)
    for start in range(0, len(loaded), batch_size):
        chunk = loaded[start:start + batch_size]
        x = np.stack([item.tensor for item in chunk])
        classes = _classes(class_index, scorer, x, start, len(loaded))
        for method in methods:
            cams, classes_used = source.maps(method, x, classes)
            evaluation.records.extend(_evaluate_maps(
                method, cams, classes_used, x, chunk, scorer, source, metrics, settings, boxes, masks, start,
                layer=",".join(source.explainer(method).layers)))
        for name, given in maps.items():
            cams = check_maps(np.asarray(given)[start:start + len(chunk)], len(chunk), scorer.spatial_size(x), name)
            evaluation.records.extend(_evaluate_maps(
                name, cams, classes, x, chunk, scorer, None, metrics, settings, boxes, masks, start, layer=""))
        if progress is not None:
            progress(len(chunk))
    return evaluation


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


def _load_images(images, scorer, explainer_source, preset, size, resize, bgr) -> List[_Image]:
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise UsageError(f"images: a batch must be 4-D in the model's layout ({scorer.layout}), got {images.shape}")
        h, w = scorer.spatial_size(images)
        return [_Image(f"image{i}", np.asarray(img, np.float32), None, (h, w)) for i, img in enumerate(images)]
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
    loaded = []
    for path in found.images:
        photo = read_image(path)
        tensor, geometry = pre(photo)
        loaded.append(_Image(str(path), tensor, geometry, photo.shape[:2]))
    return loaded


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


def _evaluate_maps(method, cams, classes, x, chunk, scorer, source, metrics, settings, boxes, masks, offset,
                   layer) -> List[dict]:
    s = settings
    classes = np.asarray(classes, dtype=np.int64)
    cams = np.asarray(cams)
    records = [{"image": item.name, "method": method, "layer": layer, "class_index": int(k)}
               for item, k in zip(chunk, classes)]

    def put(key, values):
        for record, value in zip(records, values):
            record[key] = _plain(value)

    if "deletion" in metrics:
        result = perturbation.deletion(scorer, x, cams, classes, s.steps, s.deletion_baseline)
        put("deletion_auc", result.auc)
        put("deletion_curve", list(result.curves))
    if "insertion" in metrics:
        result = perturbation.insertion(scorer, x, cams, classes, s.steps, s.insertion_baseline)
        put("insertion_auc", result.auc)
        put("insertion_curve", list(result.curves))
    if "road" in metrics:
        morf = road_metric.road(scorer, x, cams, classes, "morf", s.road_percentiles, s.road_noise, s.seed)
        lerf = road_metric.road(scorer, x, cams, classes, "lerf", s.road_percentiles, s.road_noise, s.seed)
        put("road_morf", morf.score)
        put("road_lerf", lerf.score)
        put("road_combined", road_metric.road_combined(morf, lerf))
    if "confidence" in metrics:
        result = confidence_metric.confidence_change(scorer, x, cams, classes)
        put("score", result.original)
        put("drop_in_confidence", result.drop)
        put("relative_drop", result.relative_drop)
        put("increase_in_confidence", result.increase)
    if "class_sensitivity" in metrics and source is not None and scorer.score_fn is None:
        result = sensitivity_metric.class_sensitivity(source, method, x, scorer)
        put("class_sensitivity_pearson", result.pearson)
        put("class_sensitivity_spearman", result.spearman)
    if "sanity" in metrics and source is not None:
        result = sanity_metric.cascading_randomisation(source, method, x, cams, classes, s.sanity_stages, s.seed)
        if result.stages:
            put("sanity_spearman", result.stages[-1].spearman)
            put("sanity_ssim", result.stages[-1].ssim)
        for i, record in enumerate(records):
            record["sanity_stages"] = [{"stage": st.stage, "node": st.node, "op": st.op,
                                        "spearman": _plain(st.spearman[i]), "ssim": _plain(st.ssim[i])}
                                       for st in result.stages]
    if set(metrics) & set(GROUND_TRUTH_METRICS):
        for i, (item, record) in enumerate(zip(chunk, records)):
            region, box_list = _region(item, offset + i, boxes, masks)
            if region is None:
                continue
            cam = item.geometry.to_original(cams[i]) if item.geometry is not None else cams[i]
            if "pointing" in metrics:
                record["pointing_game"] = float(localisation.pointing_game(cam, region, s.pointing_tolerance))
                record["energy_pointing_game"] = localisation.energy_pointing_game(cam, region)
                k = max(1, int(round(s.top_k_fraction * cam.size)))
                record["top_k_precision"] = localisation.top_k_precision(cam, region, k)
            if "localisation" in metrics and box_list:
                iou = localisation.localisation_iou(cam, box_list, s.wsol_fraction)
                record["localisation_iou"] = iou
                record["localisation_hit"] = float(iou >= 0.5)
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
