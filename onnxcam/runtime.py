"""The Explainer: augments a model once, holds one ONNX Runtime session, explains numpy batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import onnx

from .cam.augment import CAM_OUTPUT, CLASS_INPUT, CLASS_OUTPUT, LAYER_CAMS_OUTPUT, SCORE_OUTPUT, augment
from .cam.inputs import image_input
from .errors import InputError, OnnxcamError
from .modelio import load_model
from .providers import choose_providers


@dataclass
class ExplainResult:
    cam: np.ndarray  # float32 [N, H, W] in [0, 1]
    class_index: np.ndarray  # int64 [N]
    score: np.ndarray  # float32 [N]
    outputs: Dict[str, np.ndarray] = field(default_factory=dict)  # the model's own outputs
    layer_cams: Optional[np.ndarray] = None  # [N, L, H, W] when several layers


class Explainer:
    """Explain batches with one augmented model and one session (thread-safe: ORT's run is)."""

    def __init__(self, model, layer="auto", method: str = "gradcam", output: Optional[str] = None,
                 providers: Optional[Sequence[str]] = None, keep_probabilities: bool = False,
                 counterfactual: bool = False, threads: Optional[int] = None):
        import onnxruntime as ort

        original = load_model(model)
        self.augmented = augment(original, layer=layer, method=method, output=output,
                                 keep_probabilities=keep_probabilities, counterfactual=counterfactual)
        meta = {p.key: p.value for p in self.augmented.metadata_props}
        self.method = method
        self.layers: List[str] = meta["onnxcam.layers"].split(",")
        self.output_name: str = meta["onnxcam.output"]
        image = image_input(original)
        self.input_name, self.layout, self.input_shape = image.name, image.layout, tuple(image.shape)
        self.channels = image.channels
        self._np_dtype = onnx.helper.tensor_dtype_to_np_dtype(image.dtype)
        self.original_outputs = [o.name for o in original.graph.output]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.providers = choose_providers(providers)
        try:
            self.session = ort.InferenceSession(self.augmented.SerializeToString(), options, providers=self.providers)
        except Exception as exc:
            raise OnnxcamError(f"ONNX Runtime could not load the augmented model: {str(exc).splitlines()[0]}") from None
        self.n_classes = self._output_classes()

    def _output_classes(self) -> Optional[int]:
        for o in self.session.get_outputs():
            if o.name == self.output_name and len(o.shape) == 2 and isinstance(o.shape[1], int):
                return o.shape[1]
        return None

    def __call__(self, x: np.ndarray, class_index: Union[None, int, Sequence[int], np.ndarray] = None,
                 batch_size: Optional[int] = None) -> ExplainResult:
        x = self._check_input(x)
        n = x.shape[0]
        classes = self._check_classes(class_index, n)
        if batch_size and n > batch_size:
            parts = [self(x[i:i + batch_size], None if classes is None else classes[i:i + batch_size])
                     for i in range(0, n, batch_size)]
            return _concat(parts)
        feeds = {self.input_name: x}
        if classes is not None:
            feeds[CLASS_INPUT] = classes
        names = self.original_outputs + [CAM_OUTPUT, CLASS_OUTPUT, SCORE_OUTPUT]
        has_layers = any(o.name == LAYER_CAMS_OUTPUT for o in self.session.get_outputs())
        if has_layers:
            names.append(LAYER_CAMS_OUTPUT)
        try:
            values = dict(zip(names, self.session.run(names, feeds)))
        except Exception as exc:
            raise InputError(f"ONNX Runtime rejected the input: {str(exc).splitlines()[0]}") from None
        cam = values[CAM_OUTPUT]
        if not np.all(np.isfinite(cam)):
            raise OnnxcamError("the explanation contains NaN/Inf: the model's own outputs are not finite for this input")
        return ExplainResult(cam=cam, class_index=values[CLASS_OUTPUT], score=values[SCORE_OUTPUT],
                             outputs={k: values[k] for k in self.original_outputs},
                             layer_cams=values.get(LAYER_CAMS_OUTPUT))

    def _check_input(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 4:
            raise InputError(f"input {self.input_name!r} must be a 4-D batch ({self.layout}); got shape {x.shape}")
        for axis, d in enumerate(self.input_shape):
            if isinstance(d, int) and d > 0 and x.shape[axis] != d:
                raise InputError(f"input {self.input_name!r} expects shape {self.input_shape} ({self.layout}); "
                                 f"got {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"input {self.input_name!r} must be floating point; got {x.dtype}")
        x = np.ascontiguousarray(x, dtype=self._np_dtype)
        if not np.all(np.isfinite(x)):
            raise InputError(f"input {self.input_name!r} contains NaN or Inf values")
        return x

    def _check_classes(self, class_index, n) -> Optional[np.ndarray]:
        if class_index is None:
            return None
        classes = np.asarray(class_index, dtype=np.int64).reshape(-1)
        if classes.size == 1 and n != 1:
            classes = np.full(n, classes[0], np.int64)
        if classes.shape != (n,):
            raise InputError(f"class_index must be one int or {n} ints; got shape {classes.shape}")
        bad = classes[(classes < -1) | ((classes >= self.n_classes) if self.n_classes else False)]
        if bad.size:
            limit = f"0..{self.n_classes - 1}" if self.n_classes else ">= 0"
            raise InputError(f"class index {int(bad[0])} is out of range: use {limit}, or -1 for the top class")
        return classes


def _concat(parts: List[ExplainResult]) -> ExplainResult:
    layer_cams = None if parts[0].layer_cams is None else np.concatenate([p.layer_cams for p in parts])
    return ExplainResult(cam=np.concatenate([p.cam for p in parts]),
                         class_index=np.concatenate([p.class_index for p in parts]),
                         score=np.concatenate([p.score for p in parts]),
                         outputs={k: np.concatenate([p.outputs[k] for p in parts]) for k in parts[0].outputs},
                         layer_cams=layer_cams)
