"""Explanation methods, one module per family; importing this package registers all of them.

- gradient_cams: the Grad-CAM family, channel weightings of (A, G) at target layers.
- input_space: maps at the input's resolution from the input gradient (saliency...).
- sampled: averages over noisy copies or integration paths (SmoothGrad, Integrated Gradients,
  Smooth Grad-CAM++, Integrated Grad-CAM), built through cam/sampling.py.
"""

from .context import MethodContext  # noqa: F401
from .registry import LAYER, MAP, METHODS_REGISTRY, Method, Needs, get_method, layer_method, map_method  # noqa: F401
from . import gradient_cams, input_space, sampled  # noqa: F401

METHODS = tuple(METHODS_REGISTRY)
