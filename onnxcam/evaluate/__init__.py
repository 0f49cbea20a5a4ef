"""Is a map faithful? Metrics that judge explanations, run on the plain model through ONNX Runtime.

Maps come from the public `onnxcam.Explainer` (any method it accepts) or from outside as arrays;
the perturbed images of every metric are scored in batches through one session of the original
model. Each metric is a small function in its own module, with its paper in the docstring:

- perturbation.py       deletion / insertion AUC (Petsiuk et al. 2018)
- road.py               ROAD MoRF / LeRF / combined, noisy linear imputation (Rong et al. 2022)
- confidence.py         average drop / increase in confidence (Chattopadhay et al. 2018)
- localisation.py       pointing game, energy-based pointing game, top-k precision, Grad-CAM's box IoU
- sanity.py             cascading model-parameter randomisation (Adebayo et al. 2018)
- class_sensitivity.py  top vs least likely class (Rebuffi et al. 2020)
- run.py                `evaluate(...)`: all of them for every image x method; report.py writes them out

`onnxcam.evaluate(model, images, methods=[...])` calls `run.evaluate`: this package is callable, so
the function and the package share the name. Submodules load on first use (`onnxcam --version`
stays instant).
"""

import sys as _sys
import types as _types

_LAZY = {"evaluate": "run", "Evaluation": "run", "EvaluationSettings": "run", "METRICS": "run",
         "DEFAULT_METRICS": "run", "ScoreModel": "scoring"}


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(name)


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs):
        from .run import evaluate

        return evaluate(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
