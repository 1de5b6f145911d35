"""attrib.images: every Pillow mode decodes to hand-computed values, with a record of what was done."""
import colorsys
import json

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from attrib.errors import InputError
from attrib.images import decode, open_image, resize_crop

LUMA = (0.299, 0.587, 0.114)


def stored(image: Image.Image, path) -> Image.Image:
    """``image`` written to ``path`` and read back through :func:`open_image`."""
    image.save(path)
    return open_image(path)


def decoded(image: Image.Image, channels: int) -> tuple[np.ndarray, dict]:
    array, record = decode(image, channels)
    upright = (image.width, image.height) if record["orientation"] >= 5 else (image.height, image.width)
    assert array.dtype == np.float32 and array.shape == (*upright, channels)
    assert 0 <= array.min() and array.max() <= 1
    json.dumps(record)
    return array.astype(np.float64), record


def has_step(record: dict, *words: str) -> bool:
    return any(all(word in step for word in words) for step in record["steps"])


# ---- 8-bit and 1-bit modes ----

def test_bilevel(tmp_path):
    image = stored(Image.fromarray(np.array([[True, False], [False, True]])), tmp_path / "b.png")
    assert image.mode == "1"
    array, record = decoded(image, 3)
    np.testing.assert_array_equal(array[..., 0], [[1, 0], [0, 1]])
    np.testing.assert_array_equal(array[..., 2], array[..., 0])
    assert has_step(record, "1-bit") and has_step(record, "grey replicated")


def test_grey_8bit(tmp_path):
    image = stored(Image.fromarray(np.full((2, 3), 77, np.uint8)), tmp_path / "l.png")
    array, record = decoded(image, 1)
    np.testing.assert_allclose(array, 77 / 255, atol=1e-7)
    assert record["mode"] == "L" and record["size"] == [3, 2] and record["steps"] == ["8-bit values divided by 255"]
    array, record = decoded(image, 3)
    np.testing.assert_allclose(array, 77 / 255, atol=1e-7)
    assert has_step(record, "grey replicated to 3 channels")


def test_rgb_8bit_and_luma(tmp_path):
    pixels = np.zeros((2, 2, 3), np.uint8)
    pixels[...] = (200, 100, 50)
    pixels[1, 1] = (10, 240, 30)
    image = stored(Image.fromarray(pixels), tmp_path / "rgb.png")
    array, record = decoded(image, 3)
    np.testing.assert_allclose(array, pixels / 255, atol=1e-7)
    assert record["stored_range"] == [10.0, 240.0] and record["non_opaque"] is None
    grey, record = decoded(image, 1)
    np.testing.assert_allclose(grey[0, 0, 0], (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255, atol=1e-7)
    np.testing.assert_allclose(grey[..., 0], np.asarray(image.convert("L")) / 255, atol=0.5 / 255 + 1e-7)  # the old path
    assert has_step(record, "ITU-R 601 luma")


def test_rgba_alpha_dropped_colour_kept(tmp_path):
    pixels = np.zeros((2, 2, 4), np.uint8)
    pixels[...] = (30, 60, 90, 255)
    pixels[0, :, 3] = 0  # half the pixels fully transparent, their colour still stored
    image = stored(Image.fromarray(pixels), tmp_path / "rgba.png")
    array, record = decoded(image, 3)
    np.testing.assert_allclose(array, np.broadcast_to(np.array([30, 60, 90]) / 255, (2, 2, 3)), atol=1e-7)
    assert record["non_opaque"] == 0.5 and has_step(record, "alpha dropped", "50%")


def test_grey_alpha(tmp_path):
    pixels = np.array([[[120, 255], [120, 255], [120, 255], [120, 10]]], np.uint8)
    image = stored(Image.fromarray(pixels), tmp_path / "la.png")
    assert image.mode == "LA"
    array, record = decoded(image, 1)
    np.testing.assert_allclose(array, 120 / 255, atol=1e-7)
    assert record["non_opaque"] == 0.25 and has_step(record, "alpha dropped", "25%")


@pytest.mark.parametrize("mode, colour", [("La", (200,)), ("RGBa", (200, 100, 0))])
def test_premultiplied_divided_by_alpha(mode, colour):
    alpha = 128
    premultiplied = [round(value * alpha / 255) for value in colour]  # 100, 50, 0
    pixel = bytes(premultiplied + [alpha])
    transparent = bytes([0] * len(colour) + [0])
    image = Image.frombytes(mode, (2, 1), pixel + transparent)
    array, record = decoded(image, len(colour))
    np.testing.assert_allclose(array[0, 0], np.array(premultiplied) / alpha, atol=1e-7)  # 100/128, not 100/255
    np.testing.assert_allclose(array[0, 0], np.array(colour) / 255, atol=1 / alpha)
    np.testing.assert_array_equal(array[0, 1], 0)
    assert record["non_opaque"] == 1.0 and has_step(record, "premultiplied", "divided by alpha")


def test_palette_without_transparency(tmp_path):
    image = Image.new("P", (2, 2), 1)
    image.putpixel((0, 0), 0)
    image.putpalette([10, 20, 30, 200, 150, 100])
    image = stored(image, tmp_path / "p.png")
    assert image.mode == "P" and "transparency" not in image.info
    array, record = decoded(image, 3)
    np.testing.assert_allclose(array[0, 0], np.array([10, 20, 30]) / 255, atol=1e-7)
    np.testing.assert_allclose(array[1, 1], np.array([200, 150, 100]) / 255, atol=1e-7)
    assert record["non_opaque"] is None and has_step(record, "palette expanded to RGB")
    grey, _ = decoded(image, 1)
    np.testing.assert_allclose(grey[1, 1, 0], np.dot(LUMA, (200, 150, 100)) / 255, atol=1e-7)


def test_palette_with_transparency_gif(tmp_path):
    image = Image.new("P", (2, 2), 0)
    image.putpalette([10, 20, 30, 200, 150, 100])
    image.putpixel((1, 1), 1)
    image.info["transparency"] = 1
    image = stored(image, tmp_path / "p.gif")
    assert image.mode == "P" and image.info["transparency"] == 1
    array, record = decoded(image, 3)
    np.testing.assert_allclose(array[1, 1], np.array([200, 150, 100]) / 255, atol=1e-7)  # transparent, colour kept
    np.testing.assert_allclose(array[0, 0], np.array([10, 20, 30]) / 255, atol=1e-7)
    assert record["non_opaque"] == 0.25 and has_step(record, "palette expanded to RGBA") and has_step(record, "25%")


def test_palette_rgba(tmp_path):
    image = Image.new("P", (2, 1), 0)
    image.putpalette([10, 20, 30, 64, 200, 150, 100, 255], "RGBA")
    image.putpixel((1, 0), 1)
    for candidate in (image, stored(image, tmp_path / "pa.png")):  # in memory (RGBA palette), on disk (tRNS)
        array, record = decoded(candidate, 3)
        np.testing.assert_allclose(array[0], np.array([[10, 20, 30], [200, 150, 100]]) / 255, atol=1e-7)
        assert record["non_opaque"] == 0.5


def test_palette_alpha_mode():
    image = Image.frombytes("PA", (2, 1), bytes([1, 255, 0, 0]))
    image.putpalette([10, 20, 30, 200, 150, 100])
    array, record = decoded(image, 3)
    np.testing.assert_allclose(array[0], np.array([[200, 150, 100], [10, 20, 30]]) / 255, atol=1e-7)
    assert record["mode"] == "PA" and record["non_opaque"] == 0.5


def test_colour_key_transparency(tmp_path):
    image = Image.fromarray(np.array([[0, 100], [100, 255]], np.uint8))
    image.info["transparency"] = 100
    image = stored(image, tmp_path / "key.png")
    array, record = decoded(image, 1)
    np.testing.assert_allclose(array[..., 0], np.array([[0, 100], [100, 255]]) / 255, atol=1e-7)
    assert record["non_opaque"] == 0.5 and has_step(record, "colour key 100")


def test_cmyk(tmp_path):
    image = stored(Image.frombytes("CMYK", (1, 1), bytes([51, 102, 0, 128])), tmp_path / "cmyk.tif")
    array, record = decoded(image, 3)
    c, m, y, k = 51 / 255, 102 / 255, 0, 128 / 255
    np.testing.assert_allclose(array[0, 0], [(1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)], atol=1e-7)
    np.testing.assert_allclose(array[0, 0], np.asarray(image.convert("RGB"))[0, 0] / 255, atol=1 / 255)
    assert has_step(record, "CMYK", "(1 − C)")


def test_ycbcr(tmp_path):
    image = stored(Image.frombytes("YCbCr", (2, 1), bytes([120, 100, 160, 200, 128, 128])), tmp_path / "ycc.tif")
    assert image.mode == "YCbCr"
    array, record = decoded(image, 3)
    y, cb, cr = 120, 100 - 128, 160 - 128
    expected = np.array([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb]) / 255
    np.testing.assert_allclose(array[0, 0], expected, atol=1e-6)
    np.testing.assert_allclose(array[0, 1], 200 / 255, atol=1e-7)  # neutral chroma: grey
    np.testing.assert_allclose(array, np.asarray(image.convert("RGB")) / 255, atol=1 / 255)
    assert has_step(record, "YCbCr", "JFIF")
    grey, record = decoded(image, 1)
    np.testing.assert_allclose(grey[0, :, 0], [120 / 255, 200 / 255], atol=1e-7)  # Y is the luma
    assert has_step(record, "Y (luma)")


def test_lab_against_littlecms(tmp_path):
    rng = np.random.default_rng(0)
    signed = np.stack([rng.integers(20, 240, (6, 6)), rng.integers(-30, 31, (6, 6)), rng.integers(-30, 31, (6, 6))], axis=-1)
    pixels = (signed % 256).astype(np.uint8)  # a* and b* as signed bytes, as TIFF stores them
    pixels[0, 0] = (255, 0, 0)  # L* = 100, a* = b* = 0: white
    pixels[0, 1] = (128, 0, 0)  # neutral grey
    pixels[0, 2] = (138, 81, 70)  # L* 54.1, a* 81, b* 70: sRGB red (54.29, 80.81, 69.89 under D50)
    image = stored(Image.frombytes("LAB", (6, 6), pixels.tobytes()), tmp_path / "lab.tif")
    assert image.mode == "LAB"
    array, record = decoded(image, 3)
    np.testing.assert_allclose(array[0, 0], 1, atol=1e-6)
    lightness = 128 / 255 * 100
    luminance = ((lightness + 16) / 116) ** 3
    np.testing.assert_allclose(array[0, 1], 1.055 * luminance ** (1 / 2.4) - 0.055, atol=1e-6)
    transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB",
                                        flags=ImageCms.Flags.NOOPTIMIZE)
    oracle = np.asarray(ImageCms.applyTransform(image, transform)) / 255
    in_gamut = ((oracle > 0) & (oracle < 1)).all(axis=-1)
    assert in_gamut.sum() >= 20
    np.testing.assert_allclose(array[0, 2], [1, 0, 0], atol=0.005)
    np.testing.assert_allclose(array[in_gamut], oracle[in_gamut], atol=1 / 255)
    assert has_step(record, "L*a*b*", "sRGB") and has_step(record, "clipped")  # the red leaves the gamut


def test_hsv():
    pixels = np.array([[[10, 200, 150], [128, 255, 255], [250, 30, 90], [0, 0, 77]]], np.uint8)
    image = Image.frombytes("HSV", (4, 1), pixels.tobytes())
    array, record = decoded(image, 3)
    expected = [colorsys.hsv_to_rgb(*(pixel / 255)) for pixel in pixels[0]]
    np.testing.assert_allclose(array[0], expected, atol=1e-6)
    np.testing.assert_allclose(array, np.asarray(image.convert("RGB")) / 255, atol=2 / 255)
    assert has_step(record, "HSV converted to RGB")


# ---- high bit depth ----

def test_16bit_png_not_white(tmp_path):
    image = stored(Image.fromarray(np.array([[30000, 0], [65535, 1]], np.uint16)), tmp_path / "g16.png")
    assert image.mode == "I;16"
    array, record = decoded(image, 1)
    np.testing.assert_allclose(array[..., 0], np.array([[30000, 0], [65535, 1]]) / 65535, atol=1e-7)
    old = np.asarray(image.convert("L"), dtype=np.float32) / 255  # the convert-based path: white
    assert old[0, 0] == 1.0 and abs(array[0, 0, 0] - 1.0) > 0.5
    assert record["stored_range"] == [0.0, 65535.0] and has_step(record, "16-bit values divided by 65535")
    rgb, record = decoded(image, 3)
    np.testing.assert_allclose(rgb[0, 0], 30000 / 65535, atol=1e-7)


@pytest.mark.parametrize("mode, dtype", [("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16N", "=u2"), ("I;16", "<u2")])
def test_16bit_byte_orders(mode, dtype, tmp_path):
    values = np.array([[40000, 12345, 7]], dtype=dtype)
    image = Image.frombytes(mode, (3, 1), values.tobytes())
    if mode in ("I;16B", "I;16"):
        image = stored(image, tmp_path / "g16.tif")
        assert image.mode == mode
    array, record = decoded(image, 1)
    np.testing.assert_allclose(array[0, :, 0], np.array([40000, 12345, 7]) / 65535, atol=1e-7)
    assert has_step(record, "16-bit values divided by 65535")


def test_int32_within_16bit(tmp_path):
    image = stored(Image.fromarray(np.array([[0, 30000, 65535]], np.int32)), tmp_path / "i.tif")
    assert image.mode == "I"
    array, record = decoded(image, 1)
    np.testing.assert_allclose(array[0, :, 0], np.array([0, 30000, 65535]) / 65535, atol=1e-7)
    assert has_step(record, "within 0..65535", "divided by 65535")


def test_int32_rescaled(tmp_path):
    image = stored(Image.fromarray(np.array([[-1000, 0, 70000]], np.int32)), tmp_path / "i.tif")
    array, record = decoded(image, 1)
    np.testing.assert_allclose(array[0, :, 0], [0, 1000 / 71000, 1], atol=1e-7)
    assert has_step(record, "-1000..70000 rescaled linearly")
    constant, record = decoded(Image.fromarray(np.full((2, 2), -5, np.int32)), 1)
    np.testing.assert_array_equal(constant, 0)
    assert has_step(record, "constant", "set to 0")


def test_float_as_stored_and_rescaled(tmp_path):
    image = stored(Image.fromarray(np.array([[0.25, 0.75, 0.123456]], np.float32)), tmp_path / "f.tif")
    assert image.mode == "F"
    array, record = decoded(image, 1)
    np.testing.assert_allclose(array[0, :, 0], [0.25, 0.75, 0.123456], atol=1e-7)
    assert has_step(record, "used as stored")
    image = stored(Image.fromarray(np.array([[-2.0, 0.0, 6.0, np.nan]], np.float32)), tmp_path / "g.tif")
    array, record = decoded(image, 1)
    np.testing.assert_allclose(array[0, :, 0], [0, 0.25, 1, 0], atol=1e-7)  # the range of the finite values; NaN → 0
    assert has_step(record, "25%", "not finite") and has_step(record, "-2..6 rescaled linearly")
    assert record["stored_range"] == [-2.0, 6.0]
    # a NaN must not stretch the range: data in 5000..6000 keeps its full contrast
    image = stored(Image.fromarray(np.array([[5000.0, 5500.0, 6000.0, np.nan]], np.float32)), tmp_path / "h.tif")
    array, record = decoded(image, 1)
    np.testing.assert_allclose(array[0, :, 0], [0, 0.5, 1, 0], atol=1e-7)


# ---- frames and orientation ----

@pytest.mark.parametrize("suffix", ["gif", "tif"])
def test_first_frame(suffix, tmp_path):
    frames = [Image.fromarray(np.full((2, 2), value, np.uint8)) for value in (40, 140, 240)]
    frames[0].save(tmp_path / f"anim.{suffix}", save_all=True, append_images=frames[1:])
    image = open_image(tmp_path / f"anim.{suffix}")
    image.seek(2)
    array, record = decoded(image, 1)
    np.testing.assert_allclose(array, 40 / 255, atol=1e-7)
    assert record["frames"] == 3 and has_step(record, "first of 3 frames")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pillow(orientation, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = orientation
    pixels = np.random.default_rng(orientation).integers(0, 256, (4, 6), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "o.png", exif=exif.tobytes())
    image = open_image(tmp_path / "o.png")
    array, record = decoded(image, 1)
    np.testing.assert_allclose(array[..., 0], np.asarray(ImageOps.exif_transpose(image)) / 255, atol=1e-7)
    assert record["orientation"] == orientation
    assert has_step(record, f"EXIF orientation {orientation} applied") == (orientation != 1)


@pytest.mark.parametrize("orientation, bright", [(6, "top right"), (3, "bottom right"), (8, "bottom left")])
def test_jpeg_orientation_bright_corner(orientation, bright, tmp_path):
    pixels = np.zeros((32, 48, 3), np.uint8)  # stored 48 wide, 32 high, bright top-left block
    pixels[:16, :16] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=95)
    array, record = decoded(open_image(tmp_path / "o.jpg"), 3)
    height, width = array.shape[:2]
    assert (height, width) == ((48, 32) if orientation in (6, 8) else (32, 48))
    corners = {"top left": array[:8, :8], "top right": array[:8, -8:],
               "bottom left": array[-8:, :8], "bottom right": array[-8:, -8:]}
    for name, corner in corners.items():
        assert corner.mean() > 0.95 if name == bright else corner.mean() < 0.05, name
    assert record["orientation"] == orientation and has_step(record, f"EXIF orientation {orientation} applied")


def test_icc_profile_noted(tmp_path):
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("RGB", (2, 2), (10, 20, 30)).save(tmp_path / "icc.png", icc_profile=profile)
    array, record = decoded(open_image(tmp_path / "icc.png"), 3)
    np.testing.assert_allclose(array[0, 0], np.array([10, 20, 30]) / 255, atol=1e-7)
    assert record["icc_profile"] and has_step(record, "ICC", "not applied")


def test_other_modes_through_pillow():
    image = Image.frombytes("RGBX", (1, 1), bytes([10, 20, 30, 0]))
    array, record = decoded(image, 3)
    np.testing.assert_allclose(array[0, 0], np.array([10, 20, 30]) / 255, atol=1e-7)
    assert has_step(record, "mode RGBX converted to RGB by Pillow")


@pytest.mark.parametrize("channels", [0, 2, 4])
def test_channel_count_checked(channels):
    with pytest.raises(InputError, match=f"1 \\(grey\\) or 3 \\(RGB\\) channels, not {channels}"):
        decode(Image.new("RGB", (2, 2)), channels)


# ---- resize and crop ----

def old_resize_crop(image: Image.Image, size: int) -> Image.Image:
    """The 8-bit geometry attrib.inputs used before this module (the oracle)."""
    width, height = image.size
    scale = size * 256 / 224 / min(width, height) if size >= 64 else size / min(width, height)
    image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BILINEAR)
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


@pytest.mark.parametrize("width, height, size", [(640, 480, 224), (50, 70, 32), (300, 301, 64), (40, 40, 40)])
def test_resize_crop_matches_old_geometry(width, height, size):
    pixels = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    array, record = decode(image, 3)
    resized, steps = resize_crop(array, size)
    old = np.asarray(old_resize_crop(image, size), dtype=np.float64) / 255
    assert resized.shape == old.shape == (size, size, 3)
    np.testing.assert_allclose(resized, old, atol=1 / 255)
    if (width, height) == (640, 480):
        assert steps == ["resized 640×480 → 341×256 (bilinear)", "centre-cropped to 224×224"]
    if (width, height) == (40, 40):
        assert steps == []


def test_resize_tiny_picture_warns():
    resized, steps = resize_crop(np.full((1, 1, 3), 0.3, np.float32), 224)
    np.testing.assert_allclose(resized, 0.3, atol=1e-6)
    assert any(step.startswith("warning: upscaled 256× from 1×1") and "little information" in step for step in steps)
    _, steps = resize_crop(np.full((8, 8), 0.5, np.float32), 224)
    assert any(step.startswith("warning: upscaled 32× from 8×8") for step in steps)
    _, steps = resize_crop(np.full((100, 100), 0.5, np.float32), 224)
    assert not any(step.startswith("warning") for step in steps)


def test_resize_huge_picture_warns():
    ramp = np.broadcast_to(np.linspace(0, 1, 4000, dtype=np.float32), (3000, 4000))
    resized, steps = resize_crop(ramp, 224)
    assert any(step.startswith("warning: downscaled 11.7× from 4000×3000") for step in steps)
    assert "resized 4000×3000 → 341×256 (bilinear)" in steps
    columns = (np.arange(224) + (341 - 224) // 2 + 0.5) / 341  # centres of the kept columns, as a share of the width
    np.testing.assert_allclose(resized[0, :, 0], columns, atol=2e-3)


def test_resize_keeps_16bit_precision():
    side = 300
    y, x = np.mgrid[:side, :side]
    ramp = np.round((x + y) / (2 * (side - 1)) * 65535).astype(np.uint16)  # 599 levels
    array, _ = decode(Image.fromarray(ramp), 1)
    resized, _ = resize_crop(array, 224)
    levels = np.unique(np.round(resized * 65535))
    assert len(levels) > 256
    assert np.abs(np.diff(resized[..., 0], axis=1)).max() < 1 / 255  # smooth: steps finer than one 8-bit level


# ---- open_image ----

def one_line_error(path, match: str) -> str:
    with pytest.raises(InputError) as caught:
        open_image(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"image {str(path)!r}: ") and match in message, message
    return message


def test_open_directory(tmp_path):
    one_line_error(tmp_path, "is a directory")


def test_open_missing(tmp_path):
    one_line_error(tmp_path / "nope.png", "no such file")


def test_open_text_file(tmp_path):
    (tmp_path / "notes.png").write_text("not a picture\n")
    one_line_error(tmp_path / "notes.png", "not an image Pillow can read")


def test_open_truncated_png(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    one_line_error(tmp_path / "cut.png", "cannot be decoded (image file is truncated")


def test_open_decompression_bomb(tmp_path, monkeypatch):
    Image.new("L", (40, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    one_line_error(tmp_path / "big.png", "too large to decode safely")


def test_open_loads(tmp_path):
    image = stored(Image.new("RGB", (3, 2), (1, 2, 3)), tmp_path / "ok.png")
    assert image.size == (3, 2) and image.getpixel((0, 0)) == (1, 2, 3) and image.im is not None


def test_a_strip_is_cropped_with_a_warning():
    strip = np.linspace(0, 1, 5000 * 40, dtype=np.float32).reshape(40, 5000)
    array, steps = resize_crop(strip, 32)
    assert array.shape == (32, 32, 1)
    assert any("warning: the centre crop keeps 1% of the picture" in step for step in steps), steps
    # the crop is the middle: the values there are the middle of the ramp
    assert abs(float(array.mean()) - 0.5) < 0.01
