"""The VJP rule registry, keyed by ONNX op type.

A rule is a short function ``rule(ctx, node, grads) -> gradients of the inputs``: ``grads`` holds
the gradient tensor name of each node output (None where that output does not reach the score),
and the rule returns a list aligned with ``node.inputs`` (None where no gradient is needed or
possible; a dict {input index: name} is accepted too). Rules emit nodes through ``ctx.emit``.

Rule modes: a modified backward pass (guided backprop, deconvnet) registers a few rules under a
mode name; every op without such a rule keeps its standard one. The walker asks for a mode and
knows no more: no rule branches on the mode (like JAX's custom_vjp overriding a rule for a region).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import onnx
from onnx import helper


@dataclass
class Rule:
    fn: Callable
    # Indices of inputs that can carry a gradient; None means every floating-point input.
    differentiable: Optional[Tuple[int, ...]] = None


STANDARD = "standard"
_RULES: Dict[str, Rule] = {}
_MODE_RULES: Dict[str, Dict[str, Rule]] = {}  # mode -> op type -> rule that replaces the standard one

# Ops whose outputs carry no gradient although an input is float: their derivative is zero
# almost everywhere (or they only read shapes), so the gradient through them is truly zero.
ZERO_GRADIENT_OPS = frozenset({
    "Shape", "Size", "Floor", "Ceil", "Round", "Sign", "Equal", "Greater", "Less", "GreaterOrEqual",
    "LessOrEqual", "IsNaN", "IsInf", "ArgMax", "ArgMin", "NonZero", "EyeLike", "ConstantOfShape",
    "RandomNormalLike", "RandomUniformLike", "Bernoulli",
})


def vjp(*op_types: str, differentiable: Optional[Sequence[int]] = None, mode: str = STANDARD):
    """Register the decorated function as the VJP rule of `op_types` (in rule mode `mode`)."""
    def register(fn):
        table = _RULES if mode == STANDARD else _MODE_RULES.setdefault(mode, {})
        for op_type in op_types:
            table[op_type] = Rule(fn, None if differentiable is None else tuple(differentiable))
        return fn
    return register


def get_rule(op_type: str, mode: str = STANDARD) -> Optional[Rule]:
    if mode != STANDARD:
        if mode not in _MODE_RULES:
            raise KeyError(f"unknown rule mode {mode!r}; modes are {', '.join(rule_modes())}")
        override = _MODE_RULES[mode].get(op_type)
        if override is not None:
            return override
    return _RULES.get(op_type)


def rule_modes() -> Tuple[str, ...]:
    return (STANDARD,) + tuple(sorted(_MODE_RULES))


def mode_overrides(mode: str) -> Tuple[str, ...]:
    """The op types whose rule `mode` replaces (for documentation and tests)."""
    return tuple(sorted(_MODE_RULES.get(mode, {})))


def registered_ops():
    return sorted(_RULES)


class NodeView:
    """A read-only view of a NodeProto with its attributes decoded, for rules."""

    def __init__(self, proto: onnx.NodeProto):
        self.proto = proto
        self.op = proto.op_type
        self.name = proto.name
        self.inputs = list(proto.input)
        self.outputs = list(proto.output)
        self.attrs = {a.name: helper.get_attribute_value(a) for a in proto.attribute}
        for key, value in list(self.attrs.items()):
            if isinstance(value, bytes):
                self.attrs[key] = value.decode()

    def attr(self, name: str, default=None):
        return self.attrs.get(name, default)

    def input(self, i: int) -> Optional[str]:
        """Input i, or None when absent or given as the empty name."""
        return self.inputs[i] if i < len(self.inputs) and self.inputs[i] else None

    def original_input(self, i: int) -> Optional[str]:
        """Input i's name in the graph (``inputs`` may name float32 copies of float16 tensors)."""
        names = list(self.proto.input)
        return names[i] if i < len(names) and names[i] else None

    def remap(self, mapping: dict) -> "NodeView":
        """Let the rule see other tensors in place of some inputs/outputs (float32 copies)."""
        self.inputs = [mapping.get(n, n) for n in self.inputs]
        self.outputs = [mapping.get(n, n) for n in self.outputs]
        return self


@dataclass
class RuleContext:
    emit: "Emitter"  # noqa: F821
    opset: int
    active: set = field(default_factory=set)  # tensors that depend on a target
    constants: dict = field(default_factory=dict)  # tensor name -> numpy value when known statically
    # (ctx, body graph, {body output: gradient}, [names]) -> {name: gradient or None}, emitted in the
    # current scope: how control-flow rules differentiate a body (the walker provides it).
    body_gradients: Optional[Callable] = None
    opset_imports: list = field(default_factory=list)  # the model's, for shape inference inside bodies
    mode: str = STANDARD  # the rule mode of this backward pass (bodies of control flow inherit it)

    def needs(self, node: NodeView, i: int) -> bool:
        """Does input i of `node` need a gradient (it exists and depends on a target)?"""
        name = node.original_input(i)
        return name is not None and name in self.active

    def value(self, name: Optional[str]):
        """The constant value of a tensor (initializer, Constant node or folded), or None."""
        if name is None:
            return None
        return self.constants.get(name)

    def info(self, name: str):
        return self.emit.info(name)
