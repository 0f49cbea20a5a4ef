"""The Explainer: augments a model once, holds one ONNX Runtime session, explains numpy batches."""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import onnx

from .cam.augment import (CAM_OUTPUT, CLASS_INPUT, CLASS_OUTPUT, LAYER_CAMS_OUTPUT, SCORE_OUTPUT, augment,
                          method_output)
from .cam.inputs import image_input
from .cam.methods import get_method
from .cam.targets import INPUT_METADATA_PREFIX
from .errors import InputError, ModelLoadError, NonFiniteError, OnnxcamError, UnsupportedModelError
from .modelio import load_model, weight_bytes
from .providers import choose_providers
from .spec import ExplainSpec


@dataclass
class ExplainResult:
    cam: np.ndarray  # float32 [N, H, W]: the first method's map
    class_index: np.ndarray  # int64 [N]
    score: np.ndarray  # float32 [N]
    outputs: Dict[str, np.ndarray] = field(default_factory=dict)  # the model's own outputs
    layer_cams: Optional[np.ndarray] = None  # [N, L, H, W] when several layers
    extras: Dict[str, np.ndarray] = field(default_factory=dict)  # target outputs (onnxcam_box_index...)
    cams: Dict[str, np.ndarray] = field(default_factory=dict)  # method -> its map [N, H, W]
    method_layer_cams: Dict[str, np.ndarray] = field(default_factory=dict)  # method -> [N, L, H, W]


class Explainer:
    """Explain batches with one augmented model and one session (thread-safe: ORT's run is).

    What to explain is an ExplainSpec (`spec`) or the same keyword arguments as `augment`
    (method may name several methods: one model, one run, one map each)."""

    def __init__(self, model, layer=None, method=None, output: Optional[str] = None,
                 providers: Optional[Sequence[str]] = None, keep_probabilities: Optional[bool] = None,
                 counterfactual: Optional[bool] = None, threads: Optional[int] = None, target: Optional[str] = None,
                 target_options: Optional[dict] = None, token_grid=None, activation_layout_hint: Optional[str] = None,
                 method_options: Optional[dict] = None, spec: Optional[ExplainSpec] = None):
        import onnxruntime as ort

        spec = ExplainSpec.build(spec, methods=method, layers=layer, output=output,
                                 keep_probabilities=keep_probabilities, counterfactual=counterfactual, target=target,
                                 target_options=target_options, token_grid=token_grid,
                                 layout=activation_layout_hint, method_options=method_options)
        if spec.vjp:
            raise InputError("the Explainer computes maps; build a vjp-mode model with onnxcam.augment(..., vjp=True)")
        self.spec = spec
        original = load_model(model)
        label = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
        self.label = label or "model"
        image = image_input(original, self.label)
        self.input_name, self.layout, self.input_shape = image.name, image.layout, tuple(image.shape)
        self.channels = image.channels
        self._np_dtype = onnx.helper.tensor_dtype_to_np_dtype(image.dtype)
        self.original_outputs = [o.name for o in original.graph.output]
        # A model loaded here is ours to edit: no copy of its weights.
        augmented = augment(original, spec=spec, name=self.label, inplace=not isinstance(model, onnx.ModelProto))
        del original
        self.metadata = {p.key: p.value for p in augmented.metadata_props}
        self.methods: List[str] = list(spec.methods)
        self.method = ",".join(self.methods)
        # Methods whose maps keep a sign ([-1, 1]); the others are in [0, 1].
        self.signed_methods = tuple(m for m in self.methods if get_method(m).signed)
        self.layers: List[str] = [l for l in self.metadata["onnxcam.layers"].split(",") if l]
        self.output_name: str = self.metadata["onnxcam.output"]
        self.choices = {key[len(INPUT_METADATA_PREFIX):]: json.loads(value) for key, value in self.metadata.items()
                        if key.startswith(INPUT_METADATA_PREFIX)}
        self._method_outputs = {m: method_output(CAM_OUTPUT, m) for m in self.methods} if len(self.methods) > 1 else {}
        self._method_layer_outputs = {m: method_output(LAYER_CAMS_OUTPUT, m) for m in self.methods}
        declared = {o.name for o in augmented.graph.output}
        standard = (set(self.original_outputs) | {CAM_OUTPUT, CLASS_OUTPUT, SCORE_OUTPUT, LAYER_CAMS_OUTPUT}
                    | set(self._method_outputs.values()) | set(self._method_layer_outputs.values()))
        self._method_layer_outputs = {m: n for m, n in self._method_layer_outputs.items() if n in declared}
        self.extra_outputs = [o.name for o in augmented.graph.output if o.name not in standard]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        tune_session_options(augmented, options)
        self.providers = choose_providers(providers)
        self.session = _session(augmented, options, self.providers, self.label)
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
        fixed = self._fixed_batch
        if fixed and n != fixed:
            return self._in_fixed_chunks(x, classes, inputs, fixed)
        if batch_size and n > batch_size:
            def part(v, i):
                return v[i:i + batch_size] if np.ndim(v) and np.shape(v)[0] == n else v
            parts = [self(x[i:i + batch_size], None if classes is None else classes[i:i + batch_size],
                          inputs={k: part(v, i) for k, v in (inputs or {}).items()})
                     for i in range(0, n, batch_size)]
            return _concat(parts)
        feeds = {self.input_name: x}
        feeds.update(self._extra_feeds(inputs, n))
        if classes is not None:
            feeds[CLASS_INPUT] = classes
        feeds.update(self._automatic_choices(feeds, n))
        names = (self.original_outputs + [CAM_OUTPUT, CLASS_OUTPUT, SCORE_OUTPUT] + self.extra_outputs
                 + list(self._method_outputs.values()) + list(self._method_layer_outputs.values()))
        has_layers = any(o.name == LAYER_CAMS_OUTPUT for o in self.session.get_outputs())
        if has_layers:
            names.append(LAYER_CAMS_OUTPUT)
        names = list(dict.fromkeys(names))
        try:
            values = dict(zip(names, self.session.run(names, feeds)))
        except Exception as exc:
            raise InputError(f"ONNX Runtime rejected the input: {str(exc).splitlines()[0]}") from None
        cams = {m: values[o] for m, o in self._method_outputs.items()} or {self.methods[0]: values[CAM_OUTPUT]}
        for cam in [values[CAM_OUTPUT]] + list(cams.values()):
            if not np.all(np.isfinite(cam)):
                raise self._non_finite(values, cam)
        if not np.all(np.isfinite(values[SCORE_OUTPUT])):  # a finite map of a NaN score means nothing
            raise self._non_finite(values, values[SCORE_OUTPUT].reshape(-1, 1))
        return ExplainResult(cam=values[CAM_OUTPUT], class_index=values[CLASS_OUTPUT], score=values[SCORE_OUTPUT],
                             outputs={k: values[k] for k in self.original_outputs},
                             layer_cams=values.get(LAYER_CAMS_OUTPUT),
                             extras={k: values[k] for k in self.extra_outputs}, cams=cams,
                             method_layer_cams={m: values[o] for m, o in self._method_layer_outputs.items()})

    @property
    def _fixed_batch(self) -> Optional[int]:
        """The batch size the model was exported with, when it is fixed (1, 4...), else None."""
        b = self.input_shape[0] if self.input_shape else None
        return b if isinstance(b, int) and b > 0 else None

    def _in_fixed_chunks(self, x, classes, inputs, fixed: int) -> ExplainResult:
        """A fixed-batch model explains any number of images: chunks of its batch size, the last
        one padded with copies of its last image (their results are dropped)."""
        n = x.shape[0]

        def chunk(v, i):
            if not (np.ndim(v) and np.shape(v)[0] == n):
                return v  # one value for every image
            part = np.asarray(v[i:i + fixed])
            missing = fixed - part.shape[0]
            return np.concatenate([part, np.repeat(part[-1:], missing, axis=0)]) if missing else part

        parts = []
        for i in range(0, n, fixed):
            part = self(chunk(x, i), None if classes is None else chunk(classes, i),
                        inputs={k: chunk(v, i) for k, v in (inputs or {}).items()})
            parts.append(_first(part, min(fixed, n - i)))
        return _concat(parts)

    def _automatic_choices(self, feeds, n: int) -> Dict[str, np.ndarray]:
        """The automatic value of every run-time choice input the caller left out (the model's
        metadata records them; an input with none, like onnxcam_reference, must be given)."""
        filled = {}
        for name in (i.name for i in self.session.get_inputs()):
            if name in feeds or name == self.input_name:
                continue
            choice = self.choices.get(name)
            if choice is None:
                raise InputError(f"the explained model needs input {name!r}; pass it with inputs={{{name!r}: ...}} "
                                 "(CLI: --input NAME=FILE.npy)")
            shape = [n if d == "batch" else int(d) for d in choice["shape"]]
            filled[name] = np.full(shape, choice["fill"], dtype=np.dtype(choice["dtype"]))
        return filled

    def _non_finite(self, values, cam) -> NonFiniteError:
        """Why the map is not finite (the input was checked finite): the model's own output, its
        score, or only the gradients."""
        images = [int(i) for i in np.nonzero(~np.isfinite(cam.reshape(cam.shape[0], -1)).all(axis=1))[0]]
        where = f"image(s) {', '.join(map(str, images[:8]))} of the batch"
        for name in [self.output_name] + self.original_outputs:
            value = values.get(name)
            if value is not None and np.issubdtype(np.asarray(value).dtype, np.floating) \
                    and not np.all(np.isfinite(value)):
                return NonFiniteError(f"{self.label}: the model's own output {name!r} is NaN/Inf for {where} although "
                                      "the input is finite; check the model's weights (run it alone in onnxruntime)")
        score = values.get(SCORE_OUTPUT)
        if score is not None and not np.all(np.isfinite(score)):
            return NonFiniteError(f"{self.label}: the score of the explained class is NaN/Inf for {where}; "
                                  "check the model's weights")
        return NonFiniteError(f"{self.label}: the gradients overflow to NaN/Inf for {where} although the model's "
                              f"outputs are finite; try another layer (onnxcam layers MODEL) or method")

    def _extra_feeds(self, inputs, n: int) -> Dict[str, np.ndarray]:
        """Cast extra feeds to the types the augmented model declares; unknown names are errors.
        A per-image choice given once ([1] or a scalar) applies to every image of the batch."""
        session = self.session
        declared = {i.name: i for i in list(session.get_inputs()) + list(session.get_overridable_initializers())}
        feeds = {}
        for name, value in (inputs or {}).items():
            if name == self.input_name:
                raise InputError(f"inputs= names the image input {name!r}: the images are the batch itself "
                                 "(CLI: the IMAGE arguments), not an extra input")
            if name not in declared:
                raise InputError(f"the explained model has no input {name!r}; inputs are {', '.join(declared)}")
            ort_type = declared[name].type  # "tensor(float16)"...
            dtype = np.dtype(_ORT_TYPES.get(ort_type[7:-1], ort_type[7:-1]))
            value = np.ascontiguousarray(np.asarray(value, dtype=dtype))
            if self.choices.get(name, {}).get("shape") == ["batch"] and value.size == 1:
                value = np.full(n, value.reshape(-1)[0], dtype=dtype)
            feeds[name] = value
        return feeds

    def _check_input(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 4:
            raise InputError(f"input {self.input_name!r} must be a 4-D batch ({self.layout}); got shape {x.shape}")
        for axis, d in enumerate(self.input_shape):
            if axis > 0 and isinstance(d, int) and d > 0 and x.shape[axis] != d:  # a fixed batch is chunked
                raise InputError(f"input {self.input_name!r} expects shape {self.input_shape} ({self.layout}); "
                                 f"got {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"input {self.input_name!r} must be floating point; got {x.dtype}")
        if x.dtype == np.float64 and self._np_dtype != np.float64:
            import warnings
            warnings.warn(f"onnxcam: input {self.input_name!r} is {x.dtype}; converted to {np.dtype(self._np_dtype)}, "
                          "the model's input type (values beyond its precision are rounded; pass "
                          f"{np.dtype(self._np_dtype)} to skip the copy)", PrecisionWarning, stacklevel=3)
        x = np.ascontiguousarray(x, dtype=self._np_dtype)
        if not np.all(np.isfinite(x)):
            raise InputError(f"input {self.input_name!r} contains NaN or Inf values")
        return x

    def _check_classes(self, class_index, n) -> Optional[np.ndarray]:
        if class_index is None:
            return None
        raw = np.asarray(class_index)
        if raw.dtype == np.bool_ or not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)):
            raise InputError(f"class_index must be an int or a sequence of ints; got {raw.dtype} {class_index!r:.60}")
        if np.issubdtype(raw.dtype, np.floating):  # 1.7 must not quietly become class 1, nor -1.5 the top class
            flat = raw.reshape(-1)
            bad = flat[~np.isfinite(flat) | (flat != np.round(flat)) | (np.abs(flat) > 2**62)]
            if bad.size:
                raise InputError(f"class index {bad[0]!r} is not an integer; give whole class numbers "
                                 "(or -1 for the top class)")
        classes = raw.astype(np.int64).reshape(-1)
        if classes.size == 1 and n != 1:
            classes = np.full(n, classes[0], np.int64)
        if classes.shape != (n,):
            raise InputError(f"class_index must be one int or {n} ints; got shape {classes.shape}")
        bad = classes[(classes < -1) | ((classes >= self.n_classes) if self.n_classes else False)]
        if bad.size:
            limit = f"0..{self.n_classes - 1}" if self.n_classes else ">= 0"
            raise InputError(f"class index {int(bad[0])} is out of range: use {limit}, or -1 for the top class")
        return classes


_LARGE_WEIGHT = 32 * 2**20


def tune_session_options(proto: onnx.ModelProto, options) -> None:
    """Session settings an augmented model wants (for users who build their own sessions too).

    ORT keeps a pre-packed copy of a constant Gemm/MatMul weight beside the original when another
    node (the backward Gemm) reads it as well: VGG16's 400 MB classifier would be held twice."""
    if _shares_large_matmul_weight(proto):
        options.add_session_config_entry("session.disable_prepacking", "1")


def _shares_large_matmul_weight(proto: onnx.ModelProto) -> bool:
    """Is a large initializer read by a Gemm/MatMul and by some other node as well?"""
    import numpy as np
    large = {t.name for t in proto.graph.initializer
             if int(np.prod(t.dims, dtype=np.int64)) * 4 >= _LARGE_WEIGHT}
    readers: Dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            if name in large:
                readers.setdefault(name, []).append(node.op_type)
    return any(len(ops) > 1 and {"Gemm", "MatMul"} & set(ops) for ops in readers.values())


# Above this much weight, the session is built from a temporary file with external data instead
# of serialised bytes: bytes + proto + runtime copy would hold the weights three times at once
# (measured: ResNet-50's Explainer peaks at 1.10x plain inference's RSS this way, 1.7x with bytes).
_IN_MEMORY_LIMIT = 32 * 2**20


def _session(proto: onnx.ModelProto, options, providers, label: str = "model"):
    """An ONNX Runtime session for the augmented model (consumed: large weights are moved out).

    A model whose IR version is newer than this onnxruntime reads (onnx >= 1.23 writes IR 14 by
    default; onnxruntime 1.31 reads up to 13) is run with the IR version lowered to the runtime's
    maximum when that is safe: its opsets and element types all existed at that IR version, so the
    lowered copy means exactly the same thing. Otherwise the error says what to do.
    """
    import onnxruntime as ort

    if weight_bytes(proto) < _IN_MEMORY_LIMIT:
        return _with_ir_fallback(
            lambda p: ort.InferenceSession(p.SerializeToString(), options, providers=providers), proto, label)
    from .io.files import temporary_directory
    # Created inside its cleanup scope and removed on any exit; the CLI turns SIGTERM/SIGHUP into
    # exceptions so that this runs then too.
    with temporary_directory("onnxcam-") as tmp:
        path = os.path.join(tmp, "augmented.onnx")
        # Tensor by tensor to the data file: no 2 GB limit, no second copy of the weights in memory.
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location="augmented.onnx.data", size_threshold=1024)
        graph_only = onnx.load(path, load_external_data=False)

        def from_file(p):
            if p is not graph_only:
                onnx.save_model(p, path)
            return ort.InferenceSession(path, options, providers=providers)
        return _with_ir_fallback(from_file, graph_only, label)


def _with_ir_fallback(make_session, proto, label):
    try:
        return make_session(proto)
    except Exception as exc:
        first = _first_line(exc)
        newest = _max_ir_version(first)
        if newest is None:
            raise OnnxcamError(f"{label}: ONNX Runtime could not load the augmented model: {first}") from None
    lowered = lowered_ir_copy(proto, newest)
    if lowered is None:
        raise ModelLoadError(_ir_message(label, proto.ir_version, newest)) from None
    try:
        return make_session(lowered)
    except Exception as exc:
        raise OnnxcamError(f"{label}: ONNX Runtime could not load the augmented model (IR version lowered from "
                           f"{proto.ir_version} to {newest}): {_first_line(exc)}") from None


def _first_line(exc) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    # ORT prefixes messages with the C++ source location and signature: keep what follows it.
    match = re.search(r"\)\s+(\S.*)$", line) if "onnxruntime::" in line else None
    return match.group(1) if match else line


_IR_PATTERN = re.compile(r"Unsupported model IR version:\s*(\d+),\s*max supported IR version:\s*(\d+)")


def _max_ir_version(message: str) -> Optional[int]:
    match = _IR_PATTERN.search(message)
    return int(match.group(2)) if match else None


@functools.lru_cache(maxsize=None)
def onnxruntime_max_ir_version() -> Optional[int]:
    """The newest IR version the installed onnxruntime reads (13 for 1.31, 14 for 1.32), or None
    when its error message no longer says: read off a one-node model labelled with IR 1000."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [value],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    probe.ir_version = 1000
    try:
        ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:
        return _max_ir_version(_first_line(exc))
    return None


def _ir_message(label, ir_version, newest) -> str:
    import onnxruntime as ort
    return (f"{label}: IR version {ir_version} is newer than onnxruntime {ort.__version__} reads (up to {newest}) "
            f"and cannot be lowered safely; upgrade onnxruntime, or re-save the model with ir_version <= {newest} "
            "(onnx.helper.make_model(..., ir_version=N) or model.ir_version = N) if it uses no newer features")


# Element types that appeared after IR version 8 (float8, 4-, 2- and 6-bit): a model using one
# cannot be relabelled to an older IR version.
_CLASSIC_TYPES = set(range(0, 17))


def lowered_ir_copy(proto: onnx.ModelProto, ir_version: int) -> Optional[onnx.ModelProto]:
    """A copy of `proto` labelled with `ir_version`, or None when it uses something newer."""
    from onnx.helper import find_min_ir_version_for

    try:
        needed = find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    except Exception:
        return None
    if needed > ir_version or any(t not in _CLASSIC_TYPES for t in _element_types(proto)):
        return None
    lowered = onnx.ModelProto()
    lowered.CopyFrom(proto)
    lowered.ir_version = ir_version
    return lowered


def _element_types(proto: onnx.ModelProto):
    """Every tensor element type the model names (weights, inputs, outputs, value infos, Cast targets)."""
    from .modelio import _all_tensors

    for tensor in _all_tensors(proto):
        yield tensor.data_type
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            yield from _value_types(vi.type)
        for node in graph.node:
            for attr in node.attribute:
                if attr.name in ("to", "dtype", "output_dtype") and attr.type == onnx.AttributeProto.INT:
                    yield attr.i
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


def _value_types(type_proto):
    which = type_proto.WhichOneof("value")
    if which in ("tensor_type", "sparse_tensor_type"):
        yield getattr(type_proto, which).elem_type
    elif which in ("sequence_type", "optional_type"):
        yield from _value_types(getattr(type_proto, which).elem_type)
    elif which == "map_type":
        yield type_proto.map_type.key_type
        yield from _value_types(type_proto.map_type.value_type)


_ORT_TYPES = {"float": "float32", "double": "float64", "bool": "bool"}


class PrecisionWarning(UserWarning):
    """The input was converted to a narrower float type (float64 photos for a float32 model)."""


def _first(result: ExplainResult, k: int) -> ExplainResult:
    """The results of the first k images of a batch (drops a padded chunk's copies): every array
    field, and every array in a dict field, cut along the batch axis."""
    from dataclasses import fields

    def cut(v):
        return v[:k] if isinstance(v, np.ndarray) and v.ndim else v
    values = {}
    for f in fields(result):
        v = getattr(result, f.name)
        values[f.name] = {n: cut(a) for n, a in v.items()} if isinstance(v, dict) else cut(v)
    return ExplainResult(**values)


def _concat(parts: List[ExplainResult]) -> ExplainResult:
    layer_cams = None if parts[0].layer_cams is None else np.concatenate([p.layer_cams for p in parts])
    return ExplainResult(cams={k: np.concatenate([p.cams[k] for p in parts]) for k in parts[0].cams},
                         method_layer_cams={k: np.concatenate([p.method_layer_cams[k] for p in parts])
                                            for k in parts[0].method_layer_cams},
                         cam=np.concatenate([p.cam for p in parts]),
                         class_index=np.concatenate([p.class_index for p in parts]),
                         score=np.concatenate([p.score for p in parts]),
                         outputs={k: np.concatenate([p.outputs[k] for p in parts]) for k in parts[0].outputs},
                         layer_cams=layer_cams,
                         extras={k: np.concatenate([p.extras[k] for p in parts]) for k in parts[0].extras})
