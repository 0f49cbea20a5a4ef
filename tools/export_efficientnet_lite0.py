"""Export the demo model, EfficientNet-Lite0, to ONNX (a thin wrapper around onnxcam.demo_export).

    python tools/export_efficientnet_lite0.py [OUT.onnx]

Without an argument the model goes to the user cache (~/.cache/onnxcam/efficientnet-lite0.onnx,
or $ONNXCAM_CACHE), where `onnxcam demo` looks for it.
"""

import os
import sys

# Run from a checkout without installing: make the package beside tools/ importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from onnxcam.demo_export import default_model_path, export

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else default_model_path()
    print(export(out))
