"""Methods as small registered functions, each with a declaration of what it needs.

The augmenter reads the declarations of every requested method first (see cam/plan.py), builds
each need once — one backward pass per rule mode, covering every layer and the input that any
method asks for — and only then calls the methods. A method never builds its own backward pass.

Two kinds of method:
- layer methods (the Grad-CAM family): ``fn(emit, A, G, **options) -> raw map [N, 1, h, w]``
  from one target layer's activation A and gradient G (both float32 [N, C, h, w]; G is None for
  a method declaring ``Needs(activation=True)`` only, and then no backward pass is built for it:
  Eigen-CAM); layer methods that re-run the model also get the context (``fn(ctx, layer, A, G)``,
  see ``layer_method(..., with_context=True)``); the shared CAM
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
    gradient_mean: bool = False  # reads only mean_ij dS/dA (Grad-CAM's weights): see cam/gradient_mean.py
    input_gradient: bool = False  # dS/dx at the image input
    rule_mode: str = STANDARD  # the backward pass `input_gradient` comes from (guided, deconvnet...)
    samples: Optional[str] = None  # "noise" or "path": gradients over input samples folded into the batch
    layers: bool = False  # reads the target layers of those samples (cam/sampling.py), not of x itself
    reruns: bool = False  # forward re-runs of (part of) the graph on masked copies (cam/reruns.py)
    bias_gradients: bool = False  # dS/d(output) of every bias-carrying Conv/BatchNormalization (FullGrad)
    seed: Optional[str] = None  # a score of the method's own (cam/seeds.py): its own backward pass
    uses: Tuple[str, ...] = ()  # other methods whose maps this one combines (built once, shared)


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable
    kind: str  # LAYER or MAP
    needs: Needs
    signed: bool = False  # the map keeps a sign ([-1, 1]); CAMs are in [0, 1]
    options: Tuple[str, ...] = ()  # keyword options (map methods; layer methods after A, G)
    doc: str = field(default="", compare=False)
    with_context: bool = False  # a layer method called as fn(ctx, layer, A, G, **options)


METHODS_REGISTRY: Dict[str, Method] = {}


LAYER_NEEDS = Needs(activation=True, gradient=True)


def layer_method(name: str, needs: Needs = LAYER_NEEDS, with_context: bool = False):
    """Register ``fn(emit, A, G, **options)`` as a CAM method weighing one layer's channels.

    `needs` says what it reads (default A and G; ``Needs(activation=True)`` alone: G is None and
    no backward pass is built for it). `with_context`: the method is called as
    ``fn(ctx, layer, A, G, **options)`` (methods that re-run the model need the context)."""
    def register(fn):
        skip = 4 if with_context else 3
        METHODS_REGISTRY[name] = Method(name, fn, LAYER, needs, options=_options(fn, skip), doc=_summary(fn),
                                        with_context=with_context)
        return fn
    return register


def map_method(name: str, needs: Needs, signed: bool = False):
    """Register ``fn(ctx, **options)`` returning a map at the input's resolution."""
    def register(fn):
        METHODS_REGISTRY[name] = Method(name, fn, MAP, needs, signed, _options(fn, 1), _summary(fn))
        return fn
    return register


def family(module: str) -> Tuple[str, ...]:
    """The methods a family module registered (e.g. family("gradient_cams"))."""
    return tuple(m.name for m in METHODS_REGISTRY.values() if m.fn.__module__.rsplit(".", 1)[-1] == module)


def get_method(name: str) -> Method:
    if name not in METHODS_REGISTRY:
        import difflib
        close = difflib.get_close_matches(name, list(METHODS_REGISTRY), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"unknown method {name!r}{hint} Methods: {', '.join(METHODS_REGISTRY)}")
    return METHODS_REGISTRY[name]


def _options(fn, skip: int) -> Tuple[str, ...]:
    """The keyword options of `fn`: its parameters after the `skip` positional ones."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    return tuple(p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD)


def _summary(fn) -> str:
    return (inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " ")
