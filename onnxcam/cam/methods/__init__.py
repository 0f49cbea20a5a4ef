"""Explanation methods, one module per family; importing this package registers all of them.

- gradient_cams: the Grad-CAM family, channel weightings of (A, G) at target layers.
- input_space: maps at the input's resolution from the input gradient (saliency...).
- forward_only: no gradient, no class (Eigen-CAM) and its gradient variant (Eigen-Grad-CAM).
- second_generation: NormGrad, FullGrad, Finer-CAM, CF-CAM.
- perturbation: re-running the model on masked copies (Score-CAM, Group-CAM, Ablation-CAM).
- sampled: averages over noisy copies or integration paths (SmoothGrad, Integrated Gradients,
  Smooth Grad-CAM++, Integrated Grad-CAM), built through cam/sampling.py.
"""

from .context import MethodContext  # noqa: F401
from .registry import LAYER, MAP, METHODS_REGISTRY, Method, Needs, family, get_method, layer_method, map_method  # noqa: F401
from . import gradient_cams, input_space, sampled, forward_only, second_generation, cf_cam, perturbation  # noqa: F401

METHODS = tuple(METHODS_REGISTRY)
