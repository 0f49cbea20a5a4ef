"""Methods as small registered functions, each with a declaration of what it needs.

The augmenter reads the declarations of every requested method first (see cam/plan.py), builds
each need once — one backward pass per rule mode, covering every layer and the input that any
method asks for — and only then calls the methods. A method never builds its own backward pass.

Two kinds of method:
- layer methods (the Grad-CAM family): ``fn(emit, A, G) -> raw map [N, 1, h, w]`` from one
  target layer's activation A and gradient G (both float32 [N, C, h, w]); the shared CAM
  pipeline (ReLU, per-image min-max, upsampling, multi-layer fusion: cam/methods/maps.py) does
  the rest, as pytorch-grad-cam's base class does.
- map methods: ``fn(ctx, **options) -> map [N, 1, H, W]`` at the input's resolution, reading
  whatever their declaration asked for from the context (input gradient, other methods' maps...).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

from ...autodiff.registry import STANDARD
from ...errors import UsageError

LAYER, MAP = "layer", "map"


@dataclass(frozen=True)
class Needs:
    """What a method reads. The planner builds each need once for all requested methods."""

    activation: bool = False  # A at every target layer
    gradient: bool = False  # dS/dA at every target layer (standard rules)
    input_gradient: bool = False  # dS/dx at the image input
    rule_mode: str = STANDARD  # the backward pass `input_gradient` comes from (guided, deconvnet...)
    samples: Optional[str] = None  # "noise" or "path": gradients over input samples folded into the batch
    layers: bool = False  # reads the target layers of those samples (cam/sampling.py), not of x itself
    reruns: bool = False  # forward re-runs of (part of) the graph on masked copies
    uses: Tuple[str, ...] = ()  # other methods whose maps this one combines (built once, shared)


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable
    kind: str  # LAYER or MAP
    needs: Needs
    signed: bool = False  # the map keeps a sign ([-1, 1]); CAMs are in [0, 1]
    options: Tuple[str, ...] = ()  # keyword options of a map method
    doc: str = field(default="", compare=False)


METHODS_REGISTRY: Dict[str, Method] = {}


def layer_method(name: str):
    """Register ``fn(emit, A, G)`` as a CAM method weighing one layer's channels."""
    def register(fn):
        METHODS_REGISTRY[name] = Method(name, fn, LAYER, Needs(activation=True, gradient=True),
                                        doc=_summary(fn))
        return fn
    return register


def map_method(name: str, needs: Needs, signed: bool = False):
    """Register ``fn(ctx, **options)`` returning a map at the input's resolution."""
    def register(fn):
        params = list(inspect.signature(fn).parameters.values())[1:]
        options = tuple(p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD)
        METHODS_REGISTRY[name] = Method(name, fn, MAP, needs, signed, options, _summary(fn))
        return fn
    return register


def get_method(name: str) -> Method:
    if name not in METHODS_REGISTRY:
        import difflib
        close = difflib.get_close_matches(name, list(METHODS_REGISTRY), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"unknown method {name!r}{hint} Methods: {', '.join(METHODS_REGISTRY)}")
    return METHODS_REGISTRY[name]


def _summary(fn) -> str:
    return (inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " ")
