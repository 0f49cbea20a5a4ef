"""ExplainSpec: what to explain and how, in one object from the CLI and the API to the graph builder."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from .errors import UsageError

LAYOUTS = ("auto", "NCHW", "NHWC", "tokens")


@dataclass(frozen=True)
class ExplainSpec:
    """Everything an augmented model is built from.

    methods: method names (the first one is also exposed as ``onnxcam_cam``).
    layers: "auto" or tensor names (several: one map each, plus their fused mean).
    output: the graph output (or tensor) to explain; None = the only [N, classes] output.
    target / target_options: the score definition (cam/targets/) and its options.
    keep_probabilities: differentiate the Softmax/Sigmoid output itself, not its logits.
    counterfactual: negate the gradients (regions that argue against the class).
    layout: "auto", "NCHW", "NHWC" or "tokens" for the target layers' activations.
    token_grid: (extra_tokens, h, w) for token activations when it cannot be inferred.
    method_options: per-method options by method name (samples, steps, baselines...).
    vjp: expose the raw engine (activation and gradient of one tensor) instead of maps.
    """

    methods: Tuple[str, ...] = ("gradcam",)
    layers: Union[str, Tuple[str, ...]] = "auto"
    output: Optional[str] = None
    target: str = "class"
    target_options: Mapping[str, Any] = field(default_factory=dict)
    keep_probabilities: bool = False
    counterfactual: bool = False
    layout: str = "auto"
    token_grid: Optional[Tuple[int, int, int]] = None
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    vjp: bool = False

    def __post_init__(self):
        methods = parse_methods(self.methods)
        object.__setattr__(self, "methods", methods)
        layers = self.layers
        if layers is None or layers == "auto" or list(layers) == ["auto"] or (
                not isinstance(layers, str) and len(layers) == 0):
            layers = "auto"
        elif isinstance(layers, str):
            layers = (layers,)
        else:
            layers = tuple(layers)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "target_options", dict(self.target_options or {}))
        object.__setattr__(self, "method_options", {k: dict(v) for k, v in (self.method_options or {}).items()})
        if self.layout not in LAYOUTS:
            raise UsageError(f"unknown activation layout {self.layout!r}; use one of {', '.join(LAYOUTS)}")
        if self.token_grid is not None:
            grid = tuple(self.token_grid)
            if len(grid) != 3 or not all(isinstance(v, int) and v >= 0 for v in grid) or grid[1] < 1 or grid[2] < 1:
                raise UsageError(f"token grid must be three integers (extra_tokens, h, w) with h, w >= 1; got {self.token_grid}")
            object.__setattr__(self, "token_grid", grid)
        unknown = sorted(set(self.method_options) - set(methods))
        if unknown:
            raise UsageError(f"options given for method {unknown[0]!r}, which is not requested "
                             f"(methods: {', '.join(methods)})")

    @property
    def method(self) -> str:
        """The first (primary) method."""
        return self.methods[0]

    def with_changes(self, **changes) -> "ExplainSpec":
        return replace(self, **changes)

    @classmethod
    def build(cls, spec: Optional["ExplainSpec"] = None, **arguments) -> "ExplainSpec":
        """A spec from keyword arguments (the API's and the CLI's names), on top of `spec` if given.
        Accepts `method` (a name, "a,b", or a list) and `layer` as aliases; None means "default"."""
        aliases = {"method": "methods", "layer": "layers", "activation_layout_hint": "layout"}
        known = {f.name for f in fields(cls)}
        values: Dict[str, Any] = {}
        for key, value in arguments.items():
            key = aliases.get(key, key)
            if key not in known:
                raise TypeError(f"unknown explanation option {key!r}")
            if value is not None:
                values[key] = value
        return replace(spec, **values) if spec is not None else cls(**values)


def parse_methods(methods: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """"a,b" or ["a", "b"] -> ("a", "b"), stripped, without repeats, never empty."""
    if isinstance(methods, str):
        methods = methods.split(",")
    names = tuple(dict.fromkeys(m.strip() for m in methods if m and m.strip()))
    if not names:
        raise UsageError("no method given; name one or more, e.g. --method gradcam,layercam")
    return names
