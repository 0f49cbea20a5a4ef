"""VJP rules, one module per family; importing this package registers all of them."""

from . import (elementwise, activations, conv_pool, shape_ops, reduction, normalization, linalg,  # noqa: F401
               resize, recurrent, control_flow)
from . import modes  # noqa: F401  (alternative rules for modified backward passes)
