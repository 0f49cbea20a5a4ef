"""What a method reads: the needs the planner built, handed over by name.

A method asking for something its declaration did not name is a bug in that method, caught here
(the planner would not have built it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ...autodiff.registry import STANDARD
from ...errors import UsageError


@dataclass
class MethodContext:
    emit: object
    image: object  # cam.inputs.ImageInput
    layers: List[str]  # target layer names, in order
    activations: Dict[str, str] = field(default_factory=dict)  # layer -> float32 [N, C, h, w]
    gradients: Dict[str, str] = field(default_factory=dict)  # layer -> float32 [N, C, h, w] (standard rules)
    image_nchw: Optional[str] = None  # the input as float32 [N, C, H, W]
    input_gradients: Dict[str, str] = field(default_factory=dict)  # rule mode -> float32 [N, C, H, W]
    maps: Dict[str, str] = field(default_factory=dict)  # method -> its map [N, 1, H, W] (built ones)
    layer_maps: Dict[str, str] = field(default_factory=dict)  # method -> [N, L, H, W] for several layers
    bias_gradients: List[tuple] = field(default_factory=list)  # (dS/d(out) float32 [N, C, h, w], bias [C] name)
    seeded_gradients: Dict[tuple, str] = field(default_factory=dict)  # (seed, layer) -> float32 [N, C, h, w]
    reruns: Optional[object] = None  # cam.reruns.Reruns when a method re-runs the graph
    diagnostics: Dict[str, List[str]] = field(default_factory=dict)  # output name -> one float32 [N] per layer
    # Extra graph outputs methods expose (attributions, completeness residuals): name -> (tensor,
    # ONNX dtype, shape). The augmenter adds them after the maps.
    outputs: Dict[str, tuple] = field(default_factory=dict)
    samplers: Dict[object, object] = field(default_factory=dict)  # cam.sampling: one sampled pass per key
    proto: object = None  # the model being edited (sampled methods add loops and inputs to it)
    analysis: object = None  # the GraphAnalysis of the original graph
    target: object = None  # the Target the target builder chose (cam.targets.base.Target)
    seeded: Optional[str] = None  # the tensor the target's seed is the cotangent of
    seed: Optional[str] = None  # that seed (negated for counterfactual explanations)
    spec: object = None  # the ExplainSpec

    def activation(self, layer: str) -> str:
        return self._need(self.activations, layer, "activation")

    def gradient(self, layer: str, seed: Optional[str] = None) -> str:
        if seed is not None:
            return self._need(self.seeded_gradients, (seed, layer), "seeded gradient")
        return self._need(self.gradients, layer, "gradient")

    def known_shape(self, layer: str, A: str) -> tuple:
        """(C, h, w) of the layer's NCHW activation A as ints, measured by running the model when
        shape inference lost them (models exported with dynamic spatial axes); A's info is updated."""
        e = self.emit
        shape = e.info(A).shape
        if shape and len(shape) == 4 and all(isinstance(d, int) for d in shape[1:]):
            return tuple(shape[1:])
        self.analysis.probe([layer])
        probed = e.info(layer).shape
        if A != layer or not probed or len(probed) != 4 or not all(isinstance(d, int) for d in probed[1:]):
            raise UsageError(f"the shape of layer {layer!r} is unknown and could not be measured; this method "
                             "needs its channel count and spatial size (export the model with a fixed input size)")
        first = shape[0] if shape else "N"
        e.set_info(A, e.dtype(A), (first,) + tuple(probed[1:]))
        return tuple(probed[1:])

    def rerun(self):
        if self.reruns is None:
            raise UsageError("a method re-ran the graph without declaring reruns in its needs")
        return self.reruns

    def input(self) -> str:
        if self.image_nchw is None:
            raise UsageError("a method read the input without declaring it")
        return self.image_nchw

    def input_gradient(self, mode: str = STANDARD) -> str:
        return self._need(self.input_gradients, mode, "input_gradient (rule mode)")

    def expose(self, name: str, tensor: str, dtype: int, shape) -> None:
        """Make `tensor` an extra graph output called `name`."""
        self.outputs[name] = (tensor, dtype, tuple(shape) if shape is not None else None)

    def map_of(self, method: str) -> str:
        return self._need(self.maps, method, "uses")

    @staticmethod
    def _need(table, key, what):
        if key not in table:
            raise UsageError(f"a method read {what} {key!r} without declaring it in its needs")
        return table[key]
