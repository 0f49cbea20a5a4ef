"""Score definitions, one module per target kind; importing this package registers all of them."""

from .base import CLASS_INPUT, INPUT_METADATA_PREFIX, TARGETS, Target, TargetInput, choices_metadata  # noqa: F401
from . import classifier, detection, segmentation, embedding, sequence  # noqa: F401
from .detection import BOX_COORDS_OUTPUT, BOX_INDEX_OUTPUT, BOX_INPUT  # noqa: F401
from .embedding import REFERENCE_INPUT  # noqa: F401
from .segmentation import MASK_INPUT  # noqa: F401
from .sequence import PATH_OUTPUT, STEP_INPUT  # noqa: F401
