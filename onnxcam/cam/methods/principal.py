"""The first principal component of a feature map, in standard ONNX ops (no SVD op exists).

pytorch-grad-cam's ``get_2d_projection`` reshapes one image's activations to X [h*w, C], centres
the columns, takes the first right-singular vector v of X (numpy SVD) and returns X v as the map.
v is the top eigenvector of the covariance X^T X [C, C]; equivalently X v = sigma u with u the top
eigenvector of the Gram matrix X X^T [h*w, h*w]. We work on whichever of the two is smaller.

The eigenvector, in a fixed number of steps (no data-dependent control flow):
1. M0 = the matrix scaled to unit Frobenius norm; `squarings` times M <- M @ M / ||M @ M||_F:
   M = M0^(2^k) up to scale, in which every eigen-direction but the top one has shrunk by
   (lambda_2 / lambda_1)^(2^k) relative to it (k = 10: a gap of 1 % already leaves 3e-5).
2. The column of M with the largest diagonal entry (M ~ u u^T, so that column is u_j u with
   |u_j| maximal: never orthogonal to u, no start vector to get unlucky with), normalised.
3. `refinements` plain power steps with M0 (they remove the rounding the squarings left).
Convergence check: the relative Rayleigh-quotient residual ||M0 v - rho v|| / rho (rho = v^T M0 v)
is returned alongside; the augmenter exposes it (``onnxcam_residual__<method>``, [N, layers]). It is
~1e-6 when the top eigenvalue is separated, and large exactly when the first component is not
well defined (lambda_1 ~ lambda_2), where numpy's SVD direction is itself arbitrary.

The sign of an eigenvector is arbitrary (numpy's SVD picks one through LAPACK's arithmetic).
`sign="corrected"` (Seg-Eigen-CAM, Chung & Ying 2025, pytorch-grad-cam's
``get_2d_projection_with_sign_correction``): flip the map when |min| > |max|. `sign="raw"`: the
direction as found in step 2 (its largest-magnitude component positive): equal to
pytorch-grad-cam's EigenCAM up to sign.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
from onnx import TensorProto

from ...errors import UsageError

SIGNS = ("corrected", "raw")
TINY = 1e-30  # keeps an all-zero (constant) feature map at a zero map instead of NaN
SHIFT = 1e-7  # identity added to the unit-norm matrix: eigenvalues move by float32 rounding, vectors not at all


def principal_projection(emit, X: str, squarings: int = 10, refinements: int = 4,
                         sign: str = "corrected") -> Tuple[str, str]:
    """X float32 [N, C, h, w] -> (projection [N, 1, h, w], relative residual [N])."""
    if sign not in SIGNS:
        raise UsageError(f"eigen-CAM sign must be one of {', '.join(SIGNS)}; got {sign!r}")
    e = emit
    n, c, h, w = e.dims(X)
    hw = e.d_mul(h, w)
    rows = e.op("Transpose", e.reshape(X, [n, c, hw]), perm=[0, 2, 1])  # [N, hw, C]
    centred = e.op("Sub", rows, e.reduce("ReduceMean", rows, [1], keepdims=True))
    gram = isinstance(hw, int) and (not isinstance(c, int) or hw < c)
    transposed = e.op("Transpose", centred, perm=[0, 2, 1])  # [N, C, hw]
    m0 = e.op("MatMul", centred, transposed) if gram else e.op("MatMul", transposed, centred)
    size = hw if gram else c
    if not isinstance(size, int):
        raise UsageError("eigen-CAM needs the channel count or the spatial size of the layer to be known")
    # Unit norm, then + SHIFT * I: the same eigenvectors, and a zero matrix (constant feature map)
    # becomes a multiple of the identity, whose every direction is an eigenvector: the map comes
    # out zero instead of 0/0, and no later step needs a guard (each normalised power of a PSD
    # matrix whose top eigenvalue is >= SHIFT keeps a norm far from zero).
    m0 = e.op("Div", m0, e.op("Add", _norm(e, m0), e.scalar(TINY, m0)))
    m0 = e.op("Add", m0, e.const(SHIFT * np.eye(size, dtype=np.float32), TensorProto.FLOAT))
    m = m0
    for _ in range(int(squarings)):
        m = _unit(e, e.op("MatMul", m, m))
    diagonal = e.reduce("ReduceSum", e.op("Mul", m, e.const(np.eye(size, dtype=np.float32), TensorProto.FLOAT)),
                        [2], keepdims=False)  # [N, size]
    pick = e.op("ArgMax", diagonal, axis=1, keepdims=1)  # [N, 1]
    picked = e.cast(e.op("Equal", e.unsqueeze(pick, [2]),
                         e.const(np.arange(size, dtype=np.int64).reshape(1, size, 1), TensorProto.INT64)),
                    TensorProto.FLOAT)  # [N, size, 1] one-hot
    v = _unit(e, e.op("MatMul", m, picked))
    for _ in range(int(refinements)):
        v = _unit(e, e.op("MatMul", m0, v))
    mv = e.op("MatMul", m0, v)
    rho = e.reduce("ReduceSum", e.op("Mul", v, mv), [1, 2], keepdims=True)
    residual = e.op("Div", _norm(e, e.op("Sub", mv, e.op("Mul", rho, v))), e.op("Add", rho, e.scalar(TINY, rho)))
    residual = e.reshape(residual, [n])
    if gram:  # X v = X X^T u / ||X^T u||
        xtu = e.op("MatMul", transposed, v)  # [N, C, 1]
        direction = e.op("Div", xtu, e.op("Add", _norm(e, xtu), e.scalar(TINY, xtu)))  # X = 0 -> 0
        projection = e.op("MatMul", centred, direction)
    else:
        projection = e.op("MatMul", centred, v)  # [N, hw, 1]
    projection = e.reshape(projection, [n, 1, h, w])
    if sign == "corrected":
        low = e.reduce("ReduceMin", projection, [1, 2, 3], keepdims=True)
        high = e.reduce("ReduceMax", projection, [1, 2, 3], keepdims=True)
        flip = e.op("Greater", e.op("Abs", low), e.op("Abs", high))
        projection = e.op("Where", flip, e.op("Neg", projection), projection)
    return projection, residual


def _norm(e, x):
    return e.reduce("ReduceL2", x, [1, 2], keepdims=True)


def _unit(e, x):
    """x / ||x|| per image. Two nodes: the chain runs ~20 of these on small matrices, where ONNX
    Runtime's per-node dispatch, not arithmetic, is the cost. Callers make sure x is never zero."""
    return e.op("Div", x, _norm(e, x))
