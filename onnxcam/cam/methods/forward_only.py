"""Methods that need no class and no gradient: the first principal component of a layer.

Eigen-CAM (Bany Muhammad & Yeasin 2020) is class-agnostic: the same map for every target and
class choice (the target still picks the reported class and score). It declares the activation
only, so a model explaining only with it has no backward pass at all. Eigen-Grad-CAM
(pytorch-grad-cam's EigenGradCAM) takes the principal component of G * A instead: class-specific,
it needs the gradient.
"""

from __future__ import annotations

from .principal import principal_projection
from .registry import LAYER_NEEDS, Needs, layer_method

RESIDUAL_OUTPUT = "onnxcam_residual"  # + "__<method>": [N, layers], the eigenvector check


def _projection(ctx, method, X, sign, squarings, refinements):
    projection, residual = principal_projection(ctx.emit, X, squarings=squarings, refinements=refinements, sign=sign)
    ctx.diagnostics.setdefault(f"{RESIDUAL_OUTPUT}__{method}", []).append(residual)
    return projection


@layer_method("eigencam", needs=Needs(activation=True), with_context=True)
def eigencam(ctx, layer, A, G, sign="corrected", squarings=10, refinements=4):
    """Eigen-CAM (Bany Muhammad & Yeasin 2020): the projection of the centred activations [h*w, C]
    on their first principal component (pytorch-grad-cam's get_2d_projection), sign-corrected by
    default; no gradient, no class."""
    ctx.known_shape(layer, A)  # the smaller of C and h*w picks the matrix to iterate on
    return _projection(ctx, "eigencam", A, sign, squarings, refinements)


@layer_method("eigen-gradcam", needs=LAYER_NEEDS, with_context=True)
def eigen_gradcam(ctx, layer, A, G, sign="corrected", squarings=10, refinements=4):
    """Eigen-Grad-CAM (pytorch-grad-cam's EigenGradCAM): the first principal component of G * A."""
    e = ctx.emit
    ctx.known_shape(layer, A)
    product = e.set_info(e.op("Mul", G, A), e.dtype(A), e.info(A).shape)
    return _projection(ctx, "eigen-gradcam", product, sign, squarings, refinements)
