"""The CAM side of onnxcam: target layers, in-graph CAM methods, and the augmenter."""
