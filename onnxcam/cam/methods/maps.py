"""The shared map pipeline: what every layer method's raw map goes through, and the scalings of
input-resolution maps. pytorch-grad-cam's order: ReLU, per-image min-max, bilinear resize to the
input (half-pixel centres, as cv2.INTER_LINEAR), mean over layers, min-max again."""

from __future__ import annotations

from onnx import TensorProto

NORMALISE_EPS = 1e-7  # pytorch-grad-cam's scale_cam_image


def normalise(emit, cam):
    """Per-image min-max to [0, 1] as pytorch-grad-cam: (x - min) / (max(x - min) + 1e-7)."""
    shifted = emit.op("Sub", cam, emit.reduce("ReduceMin", cam, [1, 2, 3], keepdims=True))
    top = emit.reduce("ReduceMax", shifted, [1, 2, 3], keepdims=True)
    return emit.op("Div", shifted, emit.op("Add", top, emit.scalar(NORMALISE_EPS, cam)))


def scale_by_max_abs(emit, m):
    """Per-image m / (max |m| + eps): [-1, 1] with the sign and the zero level kept."""
    top = emit.reduce("ReduceMax", emit.op("Abs", m), [1, 2, 3], keepdims=True)
    return emit.op("Div", m, emit.op("Add", top, emit.scalar(NORMALISE_EPS, m)))


def upsample(emit, cam, image):
    """Bilinear resize to the input's spatial size with half-pixel centres (cv2.INTER_LINEAR)."""
    import numpy as np

    h_axis, w_axis = image.spatial_axes
    height, width = image.shape[h_axis], image.shape[w_axis]
    small = emit.static_shape(cam)
    if (small is not None and len(small) == 4 and all(isinstance(d, int) and d > 0 for d in (height, width, *small[2:]))
            and height % small[2] == 0 and width % small[3] == 0):
        # Whole-number factors: constant scales say exactly what the sizes would (ONNX Runtime
        # derives the same scale from them), without reading the batch size at run time.
        scales = emit.const(np.array([1, 1, height // small[2], width // small[3]], np.float32), TensorProto.FLOAT)
        return emit.resize_full(cam, scales=scales, mode="linear", coordinate_transformation_mode="half_pixel")
    image_dims = emit.dims(image.name)
    cam_dims = emit.dims(emit.set_info(cam, TensorProto.FLOAT, [None, 1, None, None]))
    sizes = emit.shape_of([cam_dims[0], 1, image_dims[h_axis], image_dims[w_axis]])
    return emit.resize(cam, sizes, mode="linear", coordinate_transformation_mode="half_pixel")


def layer_maps(emit, raw_maps, image):
    """Raw per-layer maps [N, 1, h_l, w_l] -> (fused map [N, 1, H, W], stacked per-layer maps
    [N, L, H, W] or None for one layer)."""
    cams = [upsample(emit, normalise(emit, emit.op("Relu", raw)), image) for raw in raw_maps]
    stacked = cams[0] if len(cams) == 1 else emit.op("Concat", *cams, axis=1)
    # pytorch-grad-cam's multi-layer aggregation, also applied to one layer: relu, mean, rescale.
    # The resized maps are already >= 0, and the mean of one map is itself: only the rescale is left.
    mean = stacked if len(cams) == 1 else emit.reduce("ReduceMean", stacked, [1], keepdims=True)
    return normalise(emit, mean), (stacked if len(cams) > 1 else None)
