"""Reading photos with OpenCV into 8-bit RGB, with clear errors and a bound on memory.

Every image comes back as uint8 RGB [H, W, 3] whatever is on disk: grayscale is replicated,
alpha is dropped (as PIL's convert("RGB") does, which is what most training pipelines saw),
palette images are expanded, 16-bit images are scaled to 8 bits, EXIF orientation is applied.
Truncated PNG and JPEG files are caught before the decoder sees them, and the pixel count is read
from the file header where the format allows, so a decompression bomb is refused before it is
decoded.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ImageError
from .files import read_user_file

# 100 megapixels: a 3-channel uint8 copy is 300 MB, the float32 copy made on the way is 1.2 GB.
DEFAULT_MAX_PIXELS = 100_000_000

IMAGE_EXTENSIONS = frozenset({
    ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".jp2", ".gif",
})


@dataclass
class ImageList:
    """The images found in the paths given on the command line, and the files passed over."""

    images: list = field(default_factory=list)
    skipped: list = field(default_factory=list)


def list_images(paths) -> ImageList:
    """Expand files and folders into image files.

    A file named explicitly is always taken (it fails later if it is no image); in a folder, files
    whose extension is not an image format are skipped and counted. Folders are read in sorted
    order, not recursively; hidden files are ignored.
    """
    found = ImageList()
    for raw in paths:
        path = Path(os.fspath(raw))
        if path.is_dir():
            for child in sorted(path.iterdir()):
                if child.name.startswith(".") or child.is_dir():
                    continue
                # A FIFO, socket or device (or a dangling link) named like a photo is no photo:
                # reading a FIFO would block forever, a device never end.
                if child.suffix.lower() in IMAGE_EXTENSIONS and _is_regular(child):
                    found.images.append(child)
                else:
                    found.skipped.append(child)
        elif path.exists():
            found.images.append(path)
        else:
            raise ImageError(f"{path}: no such file or directory")
    return found


def read_image(path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read `path` as uint8 RGB [H, W, 3]; raise ImageError naming the file if that is impossible."""
    path = Path(os.fspath(path))
    data = read_file_bytes(path, max_file_bytes(max_pixels))
    return decode_image(data, path, max_pixels)


def decode_image(data: bytes, name, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG...) as uint8 RGB [H, W, 3]; errors name `name`."""
    import cv2

    path = name
    if not data:
        raise ImageError(f"{path}: the file is empty (0 bytes)")
    truncated = _truncation(data)
    if truncated:
        raise ImageError(f"{path}: {truncated}; the file is damaged or was cut short")
    size = header_size(data)
    if size is not None:
        _check_pixels(path, size[0], size[1], max_pixels)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise ImageError(f"{path}: not an image OpenCV can read (unknown format or damaged file)")
    _check_pixels(path, image.shape[1], image.shape[0], max_pixels)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _is_regular(path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


# The most bytes per pixel an image file can need (4 channels of 32-bit floats in a TIFF), plus
# room for metadata (EXIF thumbnails, ICC profiles): a larger file is no image within the limit.
_MAX_BYTES_PER_PIXEL = 16
_METADATA_ALLOWANCE = 64 * 2**20


def max_file_bytes(max_pixels: int | None) -> int | None:
    """The largest file an image of at most `max_pixels` can be; None: no limit."""
    return None if max_pixels is None else max_pixels * _MAX_BYTES_PER_PIXEL + _METADATA_ALLOWANCE


def read_file_bytes(path, limit: int | None) -> bytes:
    """The bytes of an image file: a regular file within `limit` bytes, checked before reading."""
    return read_user_file(path, limit, ImageError, "image file", "raise --max-pixels if you trust the file")


def _check_pixels(path, width, height, max_pixels) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{path}: the image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(f"{path}: {width}x{height} pixels is {_pixels(width * height)}, over the limit of "
                         f"{_pixels(max_pixels)} (--max-pixels counts pixels); raise it with --max-pixels "
                         "if you trust the file")


def _pixels(count: int) -> str:
    """A pixel count with its unit: "24.0 megapixels (24,000,000 pixels)", "1,000 pixels"."""
    if count >= 100_000:
        return f"{count / 1e6:.1f} megapixels ({count:,} pixels)"
    return f"{count:,} pixels"


def _truncation(data: bytes) -> str | None:
    """Why a PNG or JPEG is evidently incomplete, or None. Other formats are left to the decoder."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        # The last chunk of every complete PNG is IEND (length 0, type, CRC), 12 bytes.
        if b"IEND" not in data[-64:]:
            return "PNG ends before its IEND chunk"
    elif data.startswith(b"\xff\xd8"):
        # The end-of-image marker cannot occur inside entropy-coded data (0xFF is byte-stuffed),
        # so a JPEG cut short has none near its end; some writers pad a few bytes after it.
        if b"\xff\xd9" not in data[-4096:]:
            return "JPEG ends before its end-of-image marker"
    return None


def header_size(data: bytes):
    """(width, height) read from a PNG, JPEG, GIF, BMP, WebP, PNM or TIFF header without decoding, else None."""
    try:
        if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", data[6:10])
        if data.startswith(b"BM") and len(data) >= 26:
            width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp_size(data)
        if data.startswith(b"\xff\xd8"):
            return _jpeg_size(data)
        if data[:1] == b"P" and data[1:2] in b"123456" and len(data) > 2:
            return _pnm_size(data)
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(data)
    except (struct.error, ValueError, IndexError):
        return None
    return None


def _jpeg_size(data: bytes):
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        # Start-of-frame markers C0-CF, except DHT (C4), JPG (C8) and DAC (CC), carry the size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        i += 2 + length
    return None


def _pnm_size(data: bytes):
    """PBM/PGM/PPM: 'P6', whitespace and #-comments, width, height."""
    fields, i = [], 2
    while len(fields) < 2 and i < min(len(data), 4096):
        c = data[i:i + 1]
        if c == b"#":
            while i < len(data) and data[i:i + 1] not in (b"\n", b"\r"):
                i += 1
        elif c.isdigit():
            j = i
            while j < len(data) and data[j:j + 1].isdigit():
                j += 1
            fields.append(int(data[i:j]))
            i = j
            continue
        elif not c.isspace():
            return None
        i += 1
    return tuple(fields) if len(fields) == 2 else None


def _tiff_size(data: bytes):
    """ImageWidth (256) and ImageLength (257) from the first IFD of a TIFF."""
    order = "<" if data[:2] == b"II" else ">"
    (offset,) = struct.unpack(order + "I", data[4:8])
    (count,) = struct.unpack(order + "H", data[offset:offset + 2])
    size = {}
    for k in range(min(count, 512)):
        entry = data[offset + 2 + 12 * k: offset + 14 + 12 * k]
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag in (256, 257):
            value = struct.unpack(order + ("H" if kind == 3 else "I"), entry[8:10] if kind == 3 else entry[8:12])[0]
            size[tag] = value
    return (size[256], size[257]) if len(size) == 2 else None


def _webp_size(data: bytes):
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
        return width, height
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    return None
