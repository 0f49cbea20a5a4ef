"""Input-space methods: maps at the input's resolution read from the gradient at the input."""

from __future__ import annotations

from .maps import NORMALISE_EPS
from .registry import Needs, map_method


@map_method("saliency", Needs(input_gradient=True))
def saliency(ctx):
    """Saliency (Simonyan et al. 2014): max over channels of |dS/dx|, as captum's Saliency with
    abs=True reduced for display; scaled per image by its maximum to [0, 1]."""
    e = ctx.emit
    magnitude = e.reduce("ReduceMax", e.op("Abs", ctx.input_gradient()), [1], keepdims=True)
    top = e.reduce("ReduceMax", magnitude, [1, 2, 3], keepdims=True)
    return e.op("Div", magnitude, e.op("Add", top, e.scalar(NORMALISE_EPS, magnitude)))
