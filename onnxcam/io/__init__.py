"""Everything between files on disk and the Explainer: images in, tensors, overlays and labels out."""

from .images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, list_images, read_image  # noqa: F401
from .labels import label_for, load_labels  # noqa: F401
from .overlay import blend, colorize, write_npy, write_png  # noqa: F401
from .preprocess import PRESETS, Geometry, Preprocessor, input_size  # noqa: F401
