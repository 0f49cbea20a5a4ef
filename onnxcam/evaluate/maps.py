"""Maps to evaluate: computed through the public Explainer, or given from outside as arrays.

Evaluation never looks inside the augmenter: a method is a name handed to `onnxcam.Explainer`, so
every method the Explainer accepts — today's and those added later — is evaluated the same way.
A map from anywhere else (another library, a saved .npy) is just a float array [N, H, W] at the
model input's resolution.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

from ..errors import UsageError


class MapSource:
    """Explainers made once per (method, layer) and reused for every image and every class."""

    def __init__(self, model, layer="auto", target: str = "class", target_options: Optional[dict] = None,
                 output: Optional[str] = None, providers=None, batch_size: Optional[int] = None):
        self.model, self.layer, self.target = model, layer, target
        self.target_options, self.output, self.providers = target_options, output, providers
        self.batch_size = batch_size
        self._explainers: Dict[Tuple[str, str], object] = {}

    def explainer(self, method: str, model=None):
        key = (method, str(self.layer))
        if model is not None:  # a changed model (sanity checks): never cached
            return self._make(method, model)
        if key not in self._explainers:
            self._explainers[key] = self._make(method, self.model)
        return self._explainers[key]

    def _make(self, method, model):
        from ..runtime import Explainer

        return Explainer(model, layer=self.layer, method=method, output=self.output, providers=self.providers,
                         target=self.target, target_options=self.target_options)

    def maps(self, method: str, x: np.ndarray, class_index=None, model=None) -> Tuple[np.ndarray, np.ndarray]:
        """(cam float32 [N, H, W] in [0, 1], class_index int64 [N])."""
        result = self.explainer(method, model)(x, class_index=class_index, batch_size=self.batch_size)
        return result.cam, result.class_index


def check_maps(maps, n: int, size: Tuple[int, int], name: str = "maps") -> np.ndarray:
    """An outside map array as float64 [N, H, W]; one clear error when it does not fit the images."""
    maps = np.asarray(maps)
    if maps.ndim == 2 and n == 1:
        maps = maps[None]
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.ndim != 3 or maps.shape[0] != n or tuple(maps.shape[1:]) != tuple(size):
        raise UsageError(f"{name}: expected one map per image of shape [{n}, {size[0]}, {size[1]}] (the model "
                         f"input's resolution), got {list(maps.shape)}")
    if not np.issubdtype(maps.dtype, np.number):
        raise UsageError(f"{name}: maps must be numbers, got {maps.dtype}")
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float64)
    if not np.all(np.isfinite(maps)):
        raise UsageError(f"{name}: maps contain NaN or Inf")
    return maps
