"""Scores of a method's own, differentiated in a backward pass of their own (cam/plan.py `seeded`).

A seed builder returns the cotangent of the score tensor (the logits [N, classes]) for a scalar
score per image that is not the target's. Finer-CAM's (pytorch-grad-cam 1.5's FinerWeightedTarget):

    F(z) = sum_k p_k (z_c - alpha z_k) / (sum_k p_k + 1e-9),   p = softmax(z),

k over the comparison classes: the classes whose logits are nearest to the explained class c's
(sorted by |z_j - z_c|; positions 1, 2, 3 by default, position 0 being c itself). p is not
detached in pytorch-grad-cam, so its gradient is part of dF/dz; in closed form, with
P = sum_k p_k, U = sum_k p_k d_k, d_j = z_c - alpha z_j and m_j = [j is compared]:

    dU/dz_j = m_j p_j (d_j - alpha) - p_j U + [j = c] P,   dP/dz_j = m_j p_j - p_j P,
    dF/dz_j = (dU/dz_j (P + eps) - U dP/dz_j) / (P + eps)^2.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence

from ..errors import UsageError
from .targets.base import arange, one_hot

FINER_EPS = 1e-9
SEEDS: Dict[str, Callable] = {}


def seed_builder(name: str):
    def register(fn):
        SEEDS[name] = fn
        return fn
    return register


def build_seed(name: str, emit, score_tensor: str, chosen, options: dict) -> str:
    if name not in SEEDS:
        raise UsageError(f"unknown method score {name!r}")
    return SEEDS[name](emit, score_tensor, chosen, **options)


@seed_builder("finer")
def finer(emit, z, chosen, alpha: float = 1.0, comparison_categories: Sequence[int] = (1, 2, 3)):
    shape = emit.info(z).shape
    if shape is None or len(shape) != 2:
        raise UsageError("finercam compares classes: it needs a [N, classes] score (the class target)")
    classes = shape[1]
    positions = [int(c) for c in comparison_categories]
    if isinstance(classes, int):  # as pytorch-grad-cam: positions past the class count are dropped
        positions = [c for c in positions if c < classes]
    if not positions or min(positions) < 1:
        raise UsageError("finercam: comparison_categories are positions >= 1 in the similarity order "
                         f"(0 is the explained class itself) and below the class count; got {list(comparison_categories)}")
    c = chosen.class_index
    classes = emit.dims(z)[1]
    own = one_hot(emit, c, classes, emit.dtype(z))  # [N, classes]
    z_c = emit.reduce("ReduceSum", emit.op("Mul", z, own), [1], keepdims=True)
    distance = emit.op("Abs", emit.op("Sub", z, z_c))
    # c itself first even when another class ties with it (argsort would keep the lower index).
    distance = emit.op("Sub", distance, own)
    k = max(positions) + 1
    _, order = emit.op("TopK", distance, emit.ints([k]), outputs=2, axis=1, largest=0, sorted=1)
    picked = emit.op("Gather", order, emit.ints(positions), axis=1)  # [N, len(positions)]
    mask = emit.reduce("ReduceSum", one_hot_rows(emit, picked, classes, emit.dtype(z)), [1], keepdims=False)
    p = emit.op("Softmax", z, axis=1) if emit.opset >= 13 else _softmax_last(emit, z)
    d = emit.op("Sub", z_c, emit.op("Mul", z, emit.scalar(alpha, z)))
    mp = emit.op("Mul", mask, p)
    P = emit.reduce("ReduceSum", mp, [1], keepdims=True)
    U = emit.reduce("ReduceSum", emit.op("Mul", mp, d), [1], keepdims=True)
    dU = emit.op("Add", emit.op("Sub", emit.op("Mul", mp, emit.op("Sub", d, emit.scalar(alpha, z))), emit.op("Mul", p, U)),
                 emit.op("Mul", own, P))
    dP = emit.op("Sub", mp, emit.op("Mul", p, P))
    denominator = emit.op("Add", P, emit.scalar(FINER_EPS, z))
    numerator = emit.op("Sub", emit.op("Mul", dU, denominator), emit.op("Mul", U, dP))
    return emit.op("Div", numerator, emit.op("Mul", denominator, denominator))


def one_hot_rows(emit, indices, classes, dtype):
    """int64 [N, k] -> [N, k, classes] one-hot (Equal against a Range: scatter-free)."""
    span = emit.unsqueeze(arange(emit, classes), [0, 1])
    return emit.cast(emit.op("Equal", emit.unsqueeze(indices, [2]), span), dtype)


def _softmax_last(emit, z):
    shifted = emit.op("Sub", z, emit.reduce("ReduceMax", z, [1], keepdims=True))
    e = emit.op("Exp", shifted)
    return emit.op("Div", e, emit.reduce("ReduceSum", e, [1], keepdims=True))
