"""Planning: read the declarations of every requested method and decide what to build, once.

One plan for one augmented model: which methods to build (the requested ones, and the ones they
use, each once, in dependency order), whether target layers are needed at all, and which
gradients to differentiate in which rule mode. The augmenter then runs one backward pass per
rule mode, covering every layer and the input any method asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

from ..autodiff.registry import STANDARD, rule_modes
from ..errors import UsageError
from .methods import LAYER, Method, get_method

LAYERS, INPUT, BIASES = "layers", "input", "biases"  # gradient targets, resolved to tensor names by the augmenter
SAMPLE_KINDS = ("noise", "path")  # Needs.samples: built by the methods through cam/sampling.py


@dataclass
class Plan:
    requested: Tuple[str, ...]
    methods: List[Method]  # to build, dependencies first
    needs_layers: bool = False
    needs_activations: bool = False
    gradients: Dict[str, List[str]] = field(default_factory=dict)  # rule mode -> [LAYERS, INPUT, BIASES]
    seeded: List[str] = field(default_factory=list)  # methods' own scores (cam/seeds.py): one pass each, at LAYERS
    reruns: bool = False  # some method re-runs (part of) the graph on masked copies (cam/reruns.py)
    gradient_means_only: bool = False  # every reader of the layers' gradients reads only their spatial mean

    def wants(self, what: str) -> bool:
        """Whether any backward pass differentiates `what` (LAYERS, INPUT or BIASES)."""
        return any(what in entries for entries in self.gradients.values())

    def targets(self, mode: str, layers: Sequence[str], image_input: str, biases: Sequence[str] = ()) -> List[str]:
        """The tensors to differentiate in `mode`."""
        names: List[str] = []
        for what in self.gradients.get(mode, []):
            names.extend({LAYERS: list(layers), INPUT: [image_input], BIASES: list(biases)}[what])
        return list(dict.fromkeys(names))


def plan(method_names: Sequence[str]) -> Plan:
    ordered: List[Method] = []
    visiting: set = set()

    def visit(name: str, chain: Tuple[str, ...]):
        if any(m.name == name for m in ordered):
            return
        if name in visiting:
            raise UsageError(f"method {name!r} uses itself through {' -> '.join(chain)}")
        visiting.add(name)
        method = get_method(name)
        for used in method.needs.uses:
            visit(used, chain + (used,))
        visiting.discard(name)
        ordered.append(method)

    for name in method_names:
        visit(name, (name,))
    result = Plan(tuple(method_names), ordered)
    readers = [m.needs for m in ordered if m.needs.gradient and not m.needs.seed]
    result.gradient_means_only = bool(readers) and all(needs.gradient_mean for needs in readers)
    modes = rule_modes()
    for method in ordered:
        needs = method.needs
        if needs.samples not in (None,) + SAMPLE_KINDS:
            raise UsageError(f"method {method.name!r} asks for {needs.samples!r} samples; kinds are "
                             f"{', '.join(SAMPLE_KINDS)}")
        result.reruns = result.reruns or needs.reruns
        if needs.rule_mode not in modes:
            raise UsageError(f"method {method.name!r} asks for rule mode {needs.rule_mode!r}; "
                             f"modes are {', '.join(modes)}")
        if method.kind == LAYER or needs.activation or needs.gradient or needs.layers:
            result.needs_layers = True
        if needs.activation:
            result.needs_activations = True
        if needs.gradient and needs.seed:
            result.needs_layers = True
            if needs.seed not in result.seeded:
                result.seeded.append(needs.seed)
        elif needs.gradient:
            _add(result.gradients, STANDARD, LAYERS)
        if needs.bias_gradients:
            _add(result.gradients, STANDARD, BIASES)
        if needs.input_gradient:
            _add(result.gradients, needs.rule_mode, INPUT)
    return result


def _add(table: Dict[str, List[str]], mode: str, what: str) -> None:
    entries = table.setdefault(mode, [])
    if what not in entries:
        entries.append(what)
