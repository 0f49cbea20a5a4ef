"""Preprocess images into the float32 [N, 3, H, W] .npy batch the C++ example reads, exactly as
`onnxcam explain` would (onnxcam's reader and Preprocessor: same resize, preset and layout).

    python make_batch.py BATCH.npy IMAGE... [--preset symmetric] [--size 224 224]
"""

import argparse

import numpy as np

from onnxcam.io.images import read_image
from onnxcam.io.preprocess import PRESETS, Preprocessor


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("batch", help="the .npy file to write")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--preset", default="imagenet", choices=sorted(PRESETS))
    parser.add_argument("--size", nargs=2, type=int, default=(224, 224), metavar=("H", "W"))
    args = parser.parse_args()
    batch, _ = Preprocessor(size=tuple(args.size), preset=args.preset).batch(read_image(p) for p in args.images)
    np.save(args.batch, batch.astype(np.float32))


if __name__ == "__main__":
    main()
