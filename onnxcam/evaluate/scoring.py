"""The plain model, scored in batches: every perturbation metric's forward passes go through here.

One ONNX Runtime session of the *original* model (never the augmented one: perturbed images need
no gradient), reused for every curve, fed `batch_size` images per run so that memory stays bounded
whatever the number of steps. A score is one number per image: by default the probability of the
explained class (softmax of the logits, or the output itself when the model already ends in a
Softmax), as Petsiuk et al. and Chattopadhay et al. use; `score="logit"` takes the raw output as
pytorch-grad-cam's ClassifierOutputTarget does. Other targets pass `score_fn(outputs, classes)`.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Iterable, Iterator, Optional, Sequence

import numpy as np
import onnx

from ..errors import InputError, OnnxcamError, UnsupportedModelError, UsageError
from ..modelio import load_model
from ..providers import choose_providers

SCORES = ("probability", "logit")
DEFAULT_BATCH = 32

ScoreFn = Callable[[Dict[str, np.ndarray], np.ndarray], np.ndarray]


class ScoreModel:
    """`scores(x, classes)` -> float64 [N]: the explained class's score for each image of x."""

    def __init__(self, model, output: Optional[str] = None, score: str = "probability",
                 batch_size: int = DEFAULT_BATCH, providers: Optional[Sequence[str]] = None,
                 score_fn: Optional[ScoreFn] = None, threads: Optional[int] = None):
        import onnxruntime as ort

        if score not in SCORES:
            raise UsageError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {batch_size}")
        self.proto = load_model(model)
        self.label = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "model"
        self.score, self.batch_size, self.score_fn = score, batch_size, score_fn
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.session = _plain_session(self.proto, options, choose_providers(providers), self.label)
        image = self._image_input()
        self.input_name, self.input_shape = image.name, tuple(image.shape)
        # The channel axis is the one of size 1, 3 or 4 (as onnxcam.cam.inputs decides for the Explainer).
        self.layout = "NHWC" if image.shape[1] not in (1, 3, 4) and image.shape[3] in (1, 3, 4) else "NCHW"
        self.spatial_axes = (2, 3) if self.layout == "NCHW" else (1, 2)
        self._dtype = np.float16 if image.type == "tensor(float16)" else np.float64 \
            if image.type == "tensor(double)" else np.float32
        self.output_name = output or self._only_class_output(score_fn is not None)
        self.forward_passes = 0  # images run, for the benchmark and the tests

    def _image_input(self):
        """The first 4-D floating-point input, read from the session (no look inside the graph)."""
        for node_arg in self.session.get_inputs():
            if len(node_arg.shape) == 4 and node_arg.type in ("tensor(float)", "tensor(float16)", "tensor(double)"):
                return node_arg
        raise UnsupportedModelError(f"{self.label}: the model has no 4-D floating-point input (an image batch)")

    def _only_class_output(self, custom: bool) -> str:
        names = [o.name for o in self.session.get_outputs()]
        two_d = [o.name for o in self.session.get_outputs() if len(o.shape) == 2]
        if len(two_d) == 1 or custom:
            return (two_d or names)[0]
        raise UsageError(f"{self.label}: cannot tell which output holds the class scores ({', '.join(names)}); "
                         "name it with output=... (--output NAME)")

    # ------------------------------------------------------------------------------------ running

    def outputs(self, x: np.ndarray) -> Dict[str, np.ndarray]:
        """All outputs of one batch (at most batch_size images: the caller chunks)."""
        x = np.ascontiguousarray(x, dtype=self._dtype)
        try:
            values = self.session.run(None, {self.input_name: x})
        except Exception as exc:
            raise InputError(f"{self.label}: ONNX Runtime rejected the input: {str(exc).splitlines()[0]}") from None
        self.forward_passes += len(x)
        return {o.name: v for o, v in zip(self.session.get_outputs(), values)}

    def class_scores(self, x: np.ndarray) -> np.ndarray:
        """[N, K] float64: probabilities (score="probability") or raw outputs, batched."""
        parts = [self._class_scores(self.outputs(x[i:i + self.batch_size])) for i in range(0, len(x), self.batch_size)]
        return np.concatenate(parts)

    def _class_scores(self, outputs) -> np.ndarray:
        values = np.asarray(outputs[self.output_name], dtype=np.float64)
        if values.ndim != 2:
            raise UsageError(f"{self.label}: output {self.output_name!r} has shape {values.shape}, not "
                             "[N, classes]; give score_fn= for other targets")
        if self.score == "logit" or _is_probability(values):
            return values
        e = np.exp(values - values.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def scores(self, x: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """The explained score of each image of x (any length; run batch_size at a time)."""
        return self.scores_of(iter_batches(x, classes, self.batch_size))

    def scores_of(self, batches: Iterable) -> np.ndarray:
        """Scores of (images, classes) batches from a generator: perturbed images are made batch by batch."""
        out = []
        for images, classes in batches:
            outputs = self.outputs(images)
            if self.score_fn is not None:
                out.append(np.asarray(self.score_fn(outputs, classes), dtype=np.float64).reshape(-1))
            else:
                table = self._class_scores(outputs)
                out.append(table[np.arange(len(classes)), classes])
        return np.concatenate(out) if out else np.zeros(0)

    # --------------------------------------------------------------------------------- layout help

    def spatial_size(self, x: np.ndarray) -> tuple:
        return tuple(x.shape[a] for a in self.spatial_axes)

    def pixel_mask(self, mask: np.ndarray) -> np.ndarray:
        """A [H, W] (or [N, H, W]) mask broadcastable against images in the model's layout."""
        if self.layout == "NCHW":
            return mask[..., None, :, :]
        return mask[..., :, :, None]


def iter_batches(x: np.ndarray, classes: np.ndarray, batch_size: int) -> Iterator:
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size], classes[i:i + batch_size]


def _is_probability(values: np.ndarray) -> bool:
    """Rows already in [0, 1] summing to 1: the model ends in a Softmax."""
    return bool(np.all(values >= 0) and np.all(values <= 1) and np.allclose(values.sum(axis=1), 1.0, atol=1e-3))


def _plain_session(proto: onnx.ModelProto, options, providers, label: str):
    """A session of the unchanged model; an IR version newer than onnxruntime reads is lowered when safe."""
    import onnxruntime as ort

    from ..runtime import lowered_ir_copy

    try:
        return ort.InferenceSession(proto.SerializeToString(), options, providers=providers)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "IR version" in first:
            import re

            match = re.search(r"max supported IR version:\s*(\d+)", first)
            lowered = lowered_ir_copy(proto, int(match.group(1))) if match else None
            if lowered is not None:
                return ort.InferenceSession(lowered.SerializeToString(), options, providers=providers)
        raise OnnxcamError(f"{label}: ONNX Runtime could not load the model: {first}") from None
