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
    extras: Dict[str, np.ndarray] = field(default_factory=dict)  # target outputs (onnxcam_box_index...)


class Explainer:
    """Explain batches with one augmented model and one session (thread-safe: ORT's run is)."""

    def __init__(self, model, layer="auto", method: str = "gradcam", output: Optional[str] = None,
                 providers: Optional[Sequence[str]] = None, keep_probabilities: bool = False,
                 counterfactual: bool = False, threads: Optional[int] = None, target: str = "class",
                 target_options: Optional[dict] = None):
        import onnxruntime as ort

        original = load_model(model)
        self.augmented = augment(original, layer=layer, method=method, output=output,
                                 keep_probabilities=keep_probabilities, counterfactual=counterfactual,
                                 target=target, target_options=target_options)
        meta = {p.key: p.value for p in self.augmented.metadata_props}
        self.method = method
        self.layers: List[str] = meta["onnxcam.layers"].split(",")
        self.output_name: str = meta["onnxcam.output"]
        image = image_input(original)
        self.input_name, self.layout, self.input_shape = image.name, image.layout, tuple(image.shape)
        self.channels = image.channels
        self._np_dtype = onnx.helper.tensor_dtype_to_np_dtype(image.dtype)
        self.original_outputs = [o.name for o in original.graph.output]
        standard = set(self.original_outputs) | {CAM_OUTPUT, CLASS_OUTPUT, SCORE_OUTPUT, LAYER_CAMS_OUTPUT}
        self.extra_outputs = [o.name for o in self.augmented.graph.output if o.name not in standard]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.providers = choose_providers(providers)
        try:
            self.session = _session(self.augmented, options, self.providers)
        except Exception as exc:
            raise OnnxcamError(f"ONNX Runtime could not load the augmented model: {str(exc).splitlines()[0]}") from None
        self.n_classes = self._output_classes()

    def _output_classes(self) -> Optional[int]:
        for o in self.session.get_outputs():
            if o.name == self.output_name and len(o.shape) == 2 and isinstance(o.shape[1], int):
                return o.shape[1]
        return None

    def __call__(self, x: np.ndarray, class_index: Union[None, int, Sequence[int], np.ndarray] = None,
                 batch_size: Optional[int] = None, inputs: Optional[Dict[str, np.ndarray]] = None) -> ExplainResult:
        """`inputs`: extra feeds by name, e.g. the target inputs onnxcam_box / onnxcam_step (int64 [N]),
        onnxcam_mask (float [N or 1, H, W]), onnxcam_reference (float [N or 1, D])."""
        x = self._check_input(x)
        n = x.shape[0]
        classes = self._check_classes(class_index, n)
        if batch_size and n > batch_size:
            def part(v, i):
                return v[i:i + batch_size] if np.ndim(v) and np.shape(v)[0] == n else v
            parts = [self(x[i:i + batch_size], None if classes is None else classes[i:i + batch_size],
                          inputs={k: part(v, i) for k, v in (inputs or {}).items()})
                     for i in range(0, n, batch_size)]
            return _concat(parts)
        feeds = {self.input_name: x}
        feeds.update(self._extra_feeds(inputs))
        if classes is not None:
            feeds[CLASS_INPUT] = classes
        names = self.original_outputs + [CAM_OUTPUT, CLASS_OUTPUT, SCORE_OUTPUT] + self.extra_outputs
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
                             layer_cams=values.get(LAYER_CAMS_OUTPUT),
                             extras={k: values[k] for k in self.extra_outputs})

    def _extra_feeds(self, inputs) -> Dict[str, np.ndarray]:
        """Cast extra feeds to the types the augmented model declares; unknown names are errors."""
        session = self.session
        declared = {i.name: i for i in list(session.get_inputs()) + list(session.get_overridable_initializers())}
        feeds = {}
        for name, value in (inputs or {}).items():
            if name not in declared:
                raise InputError(f"the explained model has no input {name!r}; inputs are {', '.join(declared)}")
            ort_type = declared[name].type  # "tensor(float16)"...
            dtype = np.dtype(_ORT_TYPES.get(ort_type[7:-1], ort_type[7:-1]))
            feeds[name] = np.ascontiguousarray(np.asarray(value, dtype=dtype))
        return feeds

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


def _session(proto: onnx.ModelProto, options, providers):
    """A session from memory, or, past protobuf's 2 GB limit, from a temporary file with external
    data (removed once the session holds the weights)."""
    import onnxruntime as ort

    if proto.ByteSize() < 2**31 - 1:
        return ort.InferenceSession(proto.SerializeToString(), options, providers=providers)
    import tempfile
    from pathlib import Path
    from .modelio import save_model
    with tempfile.TemporaryDirectory(prefix="onnxcam-") as tmp:
        path = save_model(proto, Path(tmp) / "augmented.onnx")
        return ort.InferenceSession(str(path), options, providers=providers)


_ORT_TYPES = {"float": "float32", "double": "float64", "bool": "bool"}


def _concat(parts: List[ExplainResult]) -> ExplainResult:
    layer_cams = None if parts[0].layer_cams is None else np.concatenate([p.layer_cams for p in parts])
    return ExplainResult(cam=np.concatenate([p.cam for p in parts]),
                         class_index=np.concatenate([p.class_index for p in parts]),
                         score=np.concatenate([p.score for p in parts]),
                         outputs={k: np.concatenate([p.outputs[k] for p in parts]) for k in parts[0].outputs},
                         layer_cams=layer_cams,
                         extras={k: np.concatenate([p.extras[k] for p in parts]) for k in parts[0].extras})
