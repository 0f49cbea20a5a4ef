"""Concrete shapes of candidate layers at one input size, measured by running the model once.

Shape inference often leaves exported models' feature maps symbolic ([unk__183, 1280, unk__191,
unk__192]); what a user needs to pick a layer is its real spatial size (7x7 vs 14x14) at the
size the images will be fed. One ONNX Runtime run of the model on zeros, with the candidates
exposed as outputs, gives exactly that.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..autodiff.shapes import _info_from_value_info
from ..io.preprocess import input_size
from .inputs import image_input


def measured_shapes(model: onnx.ModelProto, names: Sequence[str], size: Optional[Tuple[int, int]] = None,
                    label: str = "model") -> Tuple[Dict[str, Tuple[int, ...]], Tuple[int, int]]:
    """({tensor: shape} for `names`, (height, width) fed): the image input at its static size, else
    `size`, else 224x224 (as `onnxcam explain` feeds it); batch 1 unless the model fixes it. Tensors
    the run cannot produce are left out (the caller keeps the symbolic shape)."""
    import onnxruntime as ort

    image = image_input(model, label)
    hw = input_size(image.shape, image.layout, size)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feeds = {vi.name: _zeros(vi, image, hw) for vi in _real_inputs(model)}
        values = session.run(list(names), feeds)
    except Exception:
        return {}, hw
    return {name: tuple(int(d) for d in np.shape(v)) for name, v in zip(names, values)}, hw


def _real_inputs(model):
    inits = {i.name for i in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def _zeros(vi, image, hw) -> np.ndarray:
    info = _info_from_value_info(vi)
    dtype = helper.tensor_dtype_to_np_dtype(info.dtype or TensorProto.FLOAT)
    dims = list(info.shape or ())
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in dims]
    if vi.name == image.name:
        h_axis, w_axis = image.spatial_axes
        shape[h_axis], shape[w_axis] = hw
        c_axis = 1 if image.layout == "NCHW" else 3
        if not (isinstance(dims[c_axis], int) and dims[c_axis] > 0):
            shape[c_axis] = 3
    return np.zeros(shape, dtype=dtype)
