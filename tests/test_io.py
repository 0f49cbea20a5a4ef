"""Image reading, preprocessing presets, the crop/resize geometry round trip, overlays and labels."""

import json
import os

import cv2
import numpy as np
import pytest

from onnxcam.errors import ImageError, OutputError, UsageError
from onnxcam.io import images, labels, overlay, preprocess
from onnxcam.io.files import atomic_write_bytes, ensure_output_dir
from onnxcam.io.preprocess import Geometry, Preprocessor, input_size


def _photo(h=300, w=451):
    """A real photo (skimage's chelsea) when available, else a smooth synthetic RGB image."""
    try:
        from skimage import data
        img = data.chelsea()
        return np.ascontiguousarray(cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA))
    except ImportError:
        yy, xx = np.mgrid[0:h, 0:w]
        return np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (h + w)], -1).astype(np.uint8)


def _write(path, rgb, ext=".png"):
    ok, buf = cv2.imencode(ext, rgb[:, :, ::-1] if rgb.ndim == 3 else rgb)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


# ---------------------------------------------------------------- reading images

def test_read_png_and_jpeg_as_rgb(tmp_path):
    img = _photo(60, 80)
    got = images.read_image(_write(tmp_path / "a.png", img))
    assert got.dtype == np.uint8 and got.shape == (60, 80, 3)
    np.testing.assert_array_equal(got, img)  # PNG is lossless, channel order restored to RGB
    got = images.read_image(_write(tmp_path / "a.jpg", img, ".jpg"))
    assert got.shape == (60, 80, 3)
    assert np.abs(got.astype(int) - img).mean() < 6


def test_grayscale_is_replicated(tmp_path):
    gray = np.tile(np.arange(64, dtype=np.uint8) * 4, (32, 1))
    got = images.read_image(_write(tmp_path / "g.png", gray))
    assert got.shape == (32, 64, 3)
    for c in range(3):
        np.testing.assert_array_equal(got[:, :, c], gray)


def test_rgba_drops_alpha(tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 200, 100, 50, 0  # fully transparent
    ok, buf = cv2.imencode(".png", rgba[:, :, [2, 1, 0, 3]])
    (tmp_path / "a.png").write_bytes(buf.tobytes())
    got = images.read_image(tmp_path / "a.png")
    assert got.shape == (20, 30, 3)
    assert tuple(got[0, 0]) == (200, 100, 50)


def test_16bit_is_scaled_to_8bit(tmp_path):
    g16 = np.linspace(0, 65535, 40 * 50).reshape(40, 50).astype(np.uint16)
    got = images.read_image(_write(tmp_path / "a16.png", g16))
    assert got.dtype == np.uint8 and got.shape == (40, 50, 3)
    np.testing.assert_allclose(got[:, :, 0].astype(int), (g16 >> 8).astype(int), atol=1)


def test_palette_png(tmp_path):
    PIL = pytest.importorskip("PIL.Image")
    img = PIL.new("P", (16, 8))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.putdata([0] * 64 + [1] * 32 + [2] * 32)
    img.save(tmp_path / "p.png")
    got = images.read_image(tmp_path / "p.png")
    assert got.shape == (8, 16, 3)
    assert tuple(got[0, 0]) == (255, 0, 0)
    assert tuple(got[-1, -1]) == (0, 0, 255)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_file_is_an_error_naming_it(tmp_path, ext):
    good = _write(tmp_path / f"full{ext}", _photo(), ext).read_bytes()
    bad = tmp_path / f"half{ext}"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ImageError, match="half"):
        images.read_image(bad)


def test_zero_size_missing_and_not_an_image(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png.*empty"):
        images.read_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match="no such file"):
        images.read_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("this is text, not a picture\n")
    with pytest.raises(ImageError, match="notes.png"):
        images.read_image(tmp_path / "notes.png")


def test_pixel_limit_read_from_the_header(tmp_path):
    path = _write(tmp_path / "big.png", _photo(100, 120))
    assert images.header_size(path.read_bytes()) == (120, 100)
    with pytest.raises(ImageError, match=r"12,000 pixels, over the limit of 11,900 pixels.*--max-pixels"):
        images.read_image(path, max_pixels=100 * 119)
    assert images.read_image(path, max_pixels=100 * 120).shape == (100, 120, 3)
    jpg = _write(tmp_path / "big.jpg", _photo(100, 120), ".jpg")
    assert images.header_size(jpg.read_bytes()) == (120, 100)


def test_list_images_skips_and_counts_non_images(tmp_path):
    _write(tmp_path / "b.png", _photo(10, 10))
    _write(tmp_path / "a.jpg", _photo(10, 10), ".jpg")
    (tmp_path / "readme.txt").write_text("hi")
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")
    (tmp_path / ".hidden.png").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    found = images.list_images([tmp_path])
    assert [p.name for p in found.images] == ["a.jpg", "b.png"]
    assert sorted(p.name for p in found.skipped) == ["model.onnx", "readme.txt"]
    explicit = images.list_images([tmp_path / "readme.txt"])  # named explicitly: taken, fails on read
    assert [p.name for p in explicit.images] == ["readme.txt"]
    with pytest.raises(ImageError, match="nope"):
        images.list_images([tmp_path / "nope"])


# ---------------------------------------------------------------- presets

def _flat(rgb, h=4, w=4):
    return np.full((h, w, 3), rgb, np.uint8)


@pytest.mark.parametrize("name, pixel, expected", [
    ("imagenet", (255, 0, 128), ((1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225)),
    ("unit", (255, 0, 51), (1.0, 0.0, 0.2)),
    ("symmetric", (255, 0, 51), (1.0, -1.0, 51 / 127.5 - 1)),
    ("raw", (255, 0, 51), (255.0, 0.0, 51.0)),
    # BGR order and the mean pixel subtracted in that order: B - 103.939, G - 116.779, R - 123.68
    ("caffe", (200, 100, 50), (50 - 103.939, 100 - 116.779, 200 - 123.68)),
])
def test_presets_numerically(name, pixel, expected):
    x, _ = Preprocessor(size=(4, 4), preset=name)(_flat(pixel))
    assert x.dtype == np.float32 and x.shape == (3, 4, 4)
    np.testing.assert_allclose(x[:, 0, 0], expected, rtol=1e-5, atol=1e-5)


def test_bgr_flag_layout_and_grayscale():
    pix = _flat((10, 20, 30))
    x, _ = Preprocessor(size=(4, 4), preset="raw", bgr=True)(pix)
    np.testing.assert_allclose(x[:, 0, 0], (30, 20, 10))
    x, _ = Preprocessor(size=(4, 6), preset="raw", layout="NHWC")(pix)
    assert x.shape == (4, 6, 3)
    np.testing.assert_allclose(x[0, 0], (10, 20, 30))
    x, _ = Preprocessor(size=(4, 4), preset="unit", channels=1)(_flat((255, 255, 255)))
    assert x.shape == (1, 4, 4)
    np.testing.assert_allclose(x, 1.0, atol=1e-6)
    x, _ = Preprocessor(size=(4, 4), preset="imagenet", channels=1)(_flat((0, 0, 0)))
    np.testing.assert_allclose(x[0, 0, 0], -np.mean([0.485, 0.456, 0.406]) / np.mean([0.229, 0.224, 0.225]),
                               rtol=1e-5)


def test_bad_preprocessing_requests_are_usage_errors():
    with pytest.raises(UsageError, match="did you mean 'imagenet'"):
        Preprocessor(preset="imagenett")
    with pytest.raises(UsageError, match="resize"):
        Preprocessor(resize="stretch")
    with pytest.raises(UsageError, match="4 input channels"):
        Preprocessor(channels=4)


def test_input_size_static_dynamic_and_conflicts():
    assert input_size((1, 3, 299, 299), "NCHW") == (299, 299)
    assert input_size(("N", 224, 192, 3), "NHWC") == (224, 192)
    assert input_size(("N", 3, "H", "W"), "NCHW") == (224, 224)
    assert input_size((None, 3, None, None), "NCHW", size=(320, 256)) == (320, 256)
    assert input_size((1, 3, 224, 224), "NCHW", size=(224, 224)) == (224, 224)
    with pytest.raises(UsageError, match="fixed height of 224"):
        input_size((1, 3, 224, 224), "NCHW", size=(300, 300))


# ---------------------------------------------------------------- geometry

def test_direct_resize_geometry():
    x, geo = Preprocessor(size=(224, 224), preset="raw")(_photo(300, 451))
    assert geo == Geometry((300, 451), (224, 224), (0, 0), (224, 224))
    assert geo.crop_box() == (0, 0, 451, 300)


def test_crop_geometry_matches_torchvision_convention():
    # shorter side 300 -> 256, longer 451 -> 385; centre crop 224 at top 16, left 80
    _, geo = Preprocessor(size=(224, 224), resize="crop")(_photo(300, 451))
    assert geo.resized == (256, 385)
    assert geo.offset == (16, 80)
    x0, y0, x1, y1 = geo.crop_box()
    assert x0 == pytest.approx(80 * 451 / 385) and x1 == pytest.approx(304 * 451 / 385)
    assert y0 == pytest.approx(16 * 300 / 256) and y1 == pytest.approx(240 * 300 / 256)


@pytest.mark.parametrize("resize", ["direct", "crop"])
@pytest.mark.parametrize("shape", [(300, 451), (451, 300), (224, 224), (100, 160)])
def test_geometry_round_trip(resize, shape):
    """A map that is the model input itself, mapped back, reproduces the original image where the model looked."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    smooth = (0.5 + 0.25 * np.sin(xx / 23.0) + 0.25 * np.cos(yy / 31.0))  # values in [0, 1]
    rgb = np.repeat(np.round(smooth * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    x, geo = Preprocessor(size=(224, 224), preset="unit", resize=resize)(rgb)
    back = geo.to_original(x[0])
    assert back.shape == (h, w) and back.dtype == np.float32
    x0, y0, x1, y1 = geo.crop_box()
    inner = np.zeros((h, w), bool)
    inner[int(np.ceil(y0)) + 2:int(y1) - 2, int(np.ceil(x0)) + 2:int(x1) - 2] = True
    err = np.abs(back - rgb[:, :, 0] / 255.0)[inner]
    assert err.mean() < 0.01 and err.max() < 0.06
    if resize == "crop" and (h, w) != (224, 224):
        outside = np.ones((h, w), bool)
        outside[int(y0) - 1:int(np.ceil(y1)) + 1, int(x0) - 1:int(np.ceil(x1)) + 1] = False
        assert outside.any() and np.all(back[outside] == 0)


def test_geometry_maps_a_point_to_the_right_place():
    """A single hot pixel in the model input lands where that pixel came from in the original."""
    _, geo = Preprocessor(size=(224, 224), resize="crop")(_photo(300, 451))
    cam = np.zeros((224, 224), np.float32)
    cam[100, 150] = 1.0
    back = geo.to_original(cam)
    y, x = np.unravel_index(np.argmax(back), back.shape)
    (rh, rw), (top, left) = geo.resized, geo.offset
    assert abs(x - (150 + left + 0.5) * 451 / rw) <= 1.0
    assert abs(y - (100 + top + 0.5) * 300 / rh) <= 1.0


# ---------------------------------------------------------------- overlays and files

def test_overlay_blend_and_colormaps():
    img = np.full((10, 12, 3), 100, np.uint8)
    heat = np.zeros((10, 12), np.float32)
    heat[:, 6:] = 1.0
    out = overlay.blend(img, heat, alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == img.shape
    # JET: 0 -> dark blue, 1 -> dark red (RGB order)
    assert out[0, 0, 2] > out[0, 0, 0] and out[0, -1, 0] > out[0, -1, 2]
    np.testing.assert_array_equal(overlay.blend(img, heat, alpha=0.0), img)
    assert overlay.colorize(heat, "turbo").shape == (10, 12, 3)
    with pytest.raises(UsageError, match="did you mean 'jet'"):
        overlay.colorize(heat, "jt")
    with pytest.raises(UsageError, match="alpha"):
        overlay.blend(img, heat, alpha=1.5)


def test_writers_are_atomic_and_readable(tmp_path):
    rgb = _photo(20, 30)
    overlay.write_png(tmp_path / "o.png", rgb)
    np.testing.assert_array_equal(images.read_image(tmp_path / "o.png"), rgb)
    arr = np.random.default_rng(0).random((20, 30)).astype(np.float32)
    overlay.write_npy(tmp_path / "m.npy", arr)
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), arr)
    assert sorted(os.listdir(tmp_path)) == ["m.npy", "o.png"]  # no temporary files left behind
    assert os.stat(tmp_path / "m.npy").st_mode & 0o044  # not the 0600 of mkstemp


def test_unwritable_directory(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root ignores permissions: make the OS say no
        from onnxcam.io import files
        real_access, real_open = os.access, os.open

        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(files.os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
        monkeypatch.setattr(files.os, "open",  # the temporary file atomic_path creates in the folder
                            lambda p, *a, **k: denied() if str(p).startswith(str(locked)) else real_open(p, *a, **k))
    try:
        with pytest.raises(OutputError, match="not writable"):
            ensure_output_dir(locked)
        with pytest.raises(OutputError):
            atomic_write_bytes(locked / "x.bin", b"1")
    finally:
        locked.chmod(0o700)


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        ensure_output_dir(tmp_path / "f")
    with pytest.raises(OutputError, match="cannot create"):
        ensure_output_dir(tmp_path / "f" / "sub")


# ---------------------------------------------------------------- labels

def test_builtin_imagenet_labels():
    names = labels.load_labels()
    assert len(names) == 1000
    assert names[0] == "tench" and names[999] == "toilet tissue"
    assert names[281:286] == ["tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"]
    assert names[967] == "espresso" and names[388] == "giant panda"
    assert all(n.strip() == n and n for n in names)


def test_label_files(tmp_path):
    (tmp_path / "l.txt").write_text("cat\ndog\n\n")
    assert labels.load_labels(tmp_path / "l.txt") == ["cat", "dog"]
    (tmp_path / "l.json").write_text(json.dumps({"0": ["n01", "tench"], "2": "x"}))
    assert labels.load_labels(tmp_path / "l.json") == ["tench", "", "x"]
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(UsageError, match="not valid JSON"):
        labels.load_labels(tmp_path / "bad.json")
    with pytest.raises(UsageError, match="not found"):
        labels.load_labels(tmp_path / "none.txt")
    assert labels.label_for(["a"], 5) == ""
