"""Class sensitivity (Rebuffi, Fong, Ji & Vedaldi, "There and Back Again: Revisiting Backpropagation
Saliency Methods", CVPR 2020, section 5.3): explain each image twice, for the class the model
scores highest and for the class it scores lowest, and correlate the two maps. A map that is about
the class, not just about the image, changes with it: lower correlation is better. The paper
reports the Pearson correlation; the Spearman rank correlation is given as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .similarity import pearson, spearman


@dataclass
class ClassSensitivityResult:
    top_class: np.ndarray  # [N]
    least_class: np.ndarray  # [N]
    pearson: np.ndarray  # [N]
    spearman: np.ndarray  # [N]


def class_sensitivity(source, method: str, x: np.ndarray, scorer) -> ClassSensitivityResult:
    """`source` a MapSource, `scorer` the plain model (which ranks the classes)."""
    table = scorer.class_scores(x)
    top, least = table.argmax(axis=1), table.argmin(axis=1)
    top_maps, _ = source.maps(method, x, top)
    least_maps, _ = source.maps(method, x, least)
    return ClassSensitivityResult(
        top_class=top, least_class=least,
        pearson=np.array([pearson(a, b) for a, b in zip(top_maps, least_maps)]),
        spearman=np.array([spearman(a, b) for a, b in zip(top_maps, least_maps)]))


def map_correlation(top_maps: np.ndarray, least_maps: np.ndarray):
    """(pearson [N], spearman [N]) for maps computed elsewhere."""
    return (np.array([pearson(a, b) for a, b in zip(top_maps, least_maps)]),
            np.array([spearman(a, b) for a, b in zip(top_maps, least_maps)]))
