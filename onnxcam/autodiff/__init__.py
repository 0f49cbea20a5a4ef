"""Reverse-mode autodiff for ONNX graphs in default-domain operators.

``add_gradients(model, targets, score_tensor, seed=None)`` edits a model so that it also computes
d(sum(seed * score_tensor))/d(target) for each target tensor.
"""

from . import rules  # noqa: F401  (importing the rules registers them: the registry itself imports none)
from .gradients import SEED_INPUT, GradientGraph, add_gradients, default_opset
from .registry import registered_ops

__all__ = ["add_gradients", "GradientGraph", "SEED_INPUT", "default_opset", "registered_ops"]
