"""Gemm, MatMul and Einsum VJP rules against torch float64 autograd."""

import numpy as np
import pytest
import torch
from onnx import helper

from harness import make_model, ort_vjp, rel_err, torch_vjp

WORST = {}


def _check(model, arrays, names, fn, tol=1e-9, family="linalg"):
    y_shape = fn(*[torch.tensor(np.asarray(a, np.float64)) for a in arrays]).shape
    seed = np.random.default_rng(11).standard_normal(y_shape)
    grads, y = ort_vjp(model, dict(zip(names, arrays)), names, "y", seed)
    refs, y_ref = torch_vjp(fn, arrays, seed)
    assert rel_err(y, y_ref) < 1e-9
    for name, gx, ref in zip(names, grads, refs):
        err = rel_err(gx, ref)
        WORST[family] = max(WORST.get(family, 0.0), err)
        assert err < tol, (name, err)


def _rand(*shape, seed=0):
    return np.random.default_rng(seed + len(shape) * 7 + sum(shape)).standard_normal(shape)


# ------------------------------------------------------------------ Gemm
@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (3, 5), (5,), (1, 5), (3, 1), ()])
def test_gemm(opset, trans_a, trans_b, c_shape):
    alpha, beta = 0.75, -1.25  # exact in the float32 attributes
    a = _rand(*((4, 3) if trans_a else (3, 4)))
    b = _rand(*((5, 4) if trans_b else (4, 5)), seed=1)
    arrays, names = [a, b], ["a", "b"]
    if c_shape is not None:
        arrays.append(_rand(*c_shape, seed=2) if c_shape else np.asarray(0.4))
        names.append("c")
    node = helper.make_node("Gemm", names, ["y"], alpha=alpha, beta=beta, transA=trans_a, transB=trans_b)
    model = make_model([node], dict(zip(names, arrays)), ["y"], opset=opset)

    def fn(a_, b_, c_=None):
        y = alpha * ((a_.T if trans_a else a_) @ (b_.T if trans_b else b_))
        return y if c_ is None else y + beta * c_
    _check(model, arrays, names, fn, family="Gemm")


def test_gemm_dynamic_batch_weights_constant():
    a, w, c = _rand(6, 4), _rand(5, 4, seed=1), _rand(5, seed=2)
    node = helper.make_node("Gemm", ["a", "w", "c"], ["y"], transB=1)
    model = make_model([node], {"a": a}, ["y"], {"w": w, "c": c}, opset=13, dynamic_batch=True)
    _check(model, [a], ["a"], lambda a_: a_ @ torch.tensor(w).T + torch.tensor(c), family="Gemm")


# ------------------------------------------------------------------ MatMul
MATMUL_SHAPES = [
    ((3, 4), (4, 5)),
    ((2, 3, 4), (4, 5)),
    ((3, 4), (2, 4, 5)),
    ((4,), (4, 5)),
    ((4,), (2, 4, 5)),
    ((2, 3, 4), (4,)),
    ((4,), (4,)),
    ((2, 1, 3, 4), (5, 4, 6)),
    ((1, 3, 4), (2, 4, 5)),
    ((2, 5, 3, 4), (2, 5, 4, 6)),
]


@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=str)
@pytest.mark.parametrize("opset", [11, 13, 17])
def test_matmul(shapes, opset):
    a, b = _rand(*shapes[0]), _rand(*shapes[1], seed=1)
    node = helper.make_node("MatMul", ["a", "b"], ["y"])
    model = make_model([node], {"a": a, "b": b}, ["y"], opset=opset)
    _check(model, [a, b], ["a", "b"], lambda x, w: x @ w, family="MatMul")


@pytest.mark.parametrize("opset", [11, 17])
def test_matmul_dynamic_dims(opset):
    """Attention scores Q @ Kᵀ with batch and sequence symbolic, and a constant weight."""
    q, k, w = _rand(2, 3, 7, 4), _rand(2, 3, 4, 7, seed=1), _rand(7, 5, seed=2)
    nodes = [helper.make_node("MatMul", ["q", "k"], ["s"]), helper.make_node("MatMul", ["s", "w"], ["y"])]
    model = make_model(nodes, {"q": q, "k": k}, ["y"], {"w": w}, opset=opset)
    dims = {"q": ["N", None, "S", None], "k": ["N", None, None, "S"]}
    for vi in model.graph.input:
        for i, d in enumerate(dims.get(vi.name, [])):
            if d:
                vi.type.tensor_type.shape.dim[i].dim_param = d
    wt = torch.tensor(w)
    _check(model, [q, k], ["q", "k"], lambda q_, k_: (q_ @ k_) @ wt, family="MatMul")


def test_matmul_broadcast_with_unknown_operand_dim():
    """A's batch dim is a symbol that is 1 at run time while B's is 2: summed at run time."""
    a, b = _rand(1, 3, 4), _rand(2, 4, 5, seed=1)
    model = make_model([helper.make_node("MatMul", ["a", "b"], ["y"])], {"a": a, "b": b}, ["y"], opset=13)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "M"
    _check(model, [a, b], ["a", "b"], lambda x, w: x @ w, family="MatMul")


# ------------------------------------------------------------------ Einsum
EINSUMS = [
    ("ij,jk->ik", [(3, 4), (4, 5)]),
    ("ij,jk", [(3, 4), (4, 5)]),  # implicit output
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
    ("bhqd,bhkd->bhqk", [(2, 3, 5, 4), (2, 3, 6, 4)]),
    ("bij->bi", [(2, 3, 4)]),
    ("bij->jb", [(2, 3, 4)]),
    ("ij->", [(3, 4)]),
    ("i,j->ij", [(3,), (4,)]),
    ("bi,bi->b", [(3, 4), (3, 4)]),
    ("bij,jk->bik", [(2, 3, 4), (4, 5)]),
    ("bn,nd->bd", [(2, 6), (6, 3)]),
    ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)]),
    ("bchw,bc->bhw", [(2, 3, 4, 5), (2, 3)]),
    ("bij,bkl->bil", [(2, 3, 4), (2, 5, 6)]),  # j and k summed out of each operand alone
    ("...ij,...jk->...ik", [(2, 3, 4, 5), (2, 3, 5, 6)]),
    # ellipsis broadcast over size-1 axes (ORT refuses ellipses of different ranks)
    ("...ij,...jk->...ik", [(2, 1, 4, 5), (1, 3, 5, 6)]),
    ("...ij,...jk->...ik", [(2, 3, 4, 5), (1, 1, 5, 6)]),
    ("b...d,d->b...", [(2, 3, 4, 5), (5,)]),
]


@pytest.mark.parametrize("eq,shapes", EINSUMS, ids=[e for e, _ in EINSUMS])
@pytest.mark.parametrize("opset", [12, 13, 17])
def test_einsum(eq, shapes, opset):
    arrays = [_rand(*s, seed=i) for i, s in enumerate(shapes)]
    names = [f"x{i}" for i in range(len(arrays))]
    node = helper.make_node("Einsum", names, ["y"], equation=eq)
    model = make_model([node], dict(zip(names, arrays)), ["y"], opset=opset)
    _check(model, arrays, names, lambda *ts: torch.einsum(eq, *ts), family="Einsum")


def test_einsum_dynamic_batch_constant_weight():
    x, w = _rand(3, 4, 5), _rand(5, 6, seed=1)
    model = make_model([helper.make_node("Einsum", ["x", "w"], ["y"], equation="bsd,de->bse")],
                       {"x": x}, ["y"], {"w": w}, opset=13, dynamic_batch=True)
    _check(model, [x], ["x"], lambda t: torch.einsum("bsd,de->bse", t, torch.tensor(w)), family="Einsum")


def test_einsum_diagonal_refused():
    x = _rand(3, 3)
    model = make_model([helper.make_node("Einsum", ["x"], ["y"], equation="ii->i")], {"x": x}, ["y"], opset=13)
    with pytest.raises(Exception, match="repeated index"):
        ort_vjp(model, {"x": x}, ["x"], "y", np.ones(3))


def test_report_worst():
    print("worst relative errors:", WORST)
