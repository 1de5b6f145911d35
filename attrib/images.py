"""Pictures in any mode Pillow opens, decoded to float values in [0, 1], saying in words what was done.

Rules of :func:`decode` (every step taken is a line of the record's ``steps``; nothing is clipped or rescaled
without one):

- frames: the first of a multi-frame file (GIF, TIFF, ...).
- values: ``1`` → 0 or 1; 8-bit modes ÷ 255; 16-bit modes (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``) ÷ 65535;
  ``I`` (32-bit int) ÷ 65535 when all values lie in 0..65535 (Pillow opens many 16-bit files as ``I``), else its
  min..max rescaled linearly to 0..1; ``F`` as stored when inside [0, 1], else min..max rescaled, non-finite
  values → 0; a constant image outside the range → 0. High-bit-depth modes are read into float64, not through
  Pillow's 8-bit ``convert``.
- palettes (``P``, ``PA``): expanded to RGB, or RGBA when there is transparency or a palette alpha.
- colour spaces, in float: CMYK → RGB as (1 − C)(1 − K), no ink profile; YCbCr → RGB by JFIF (ITU-R 601, full
  range), or its Y when one channel is asked for; LAB → sRGB as ICC Lab (D50 white, Bradford-adapted to sRGB's
  D65, as littleCMS does it); HSV → RGB. Values that leave [0, 1] are clipped, with their share.
- alpha (an ``A`` band, palette transparency, a colour key in ``info["transparency"]``): dropped, the stored
  colour kept, with the share of pixels not opaque. Premultiplied modes (``La``, ``RGBa``) are first divided by
  alpha in float (fully transparent pixels → 0).
- orientation: the EXIF orientation tag (2–8) is applied like ``ImageOps.exif_transpose``, so the array is
  upright as a viewer shows it.
- channels: grey → 3 by replicating; colour → 1 by ITU-R 601 luma 0.299 R + 0.587 G + 0.114 B (Pillow's
  ``convert("L")``), or its one channel when R = G = B everywhere.
- an embedded ICC profile is not applied (noted). Other modes (``RGBX``, ...) go through Pillow's
  ``convert("RGB")`` (noted).

The record (JSON-serialisable; all keys always present): ``mode`` (Pillow's mode of the decoded frame),
``size`` ([width, height] as stored), ``frames`` (in the file), ``orientation`` (EXIF tag applied, 1 = none),
``stored_range`` ([min, max] of the finite stored values over all bands, after palette expansion; None if none),
``non_opaque`` (share of pixels not fully opaque, None without alpha), ``icc_profile`` (bool), ``steps``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError

MODES = {"1", "L", "P", "PA", "RGB", "RGBA", "LA", "La", "RGBa", "CMYK", "YCbCr", "LAB", "HSV",
         "I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
LUMA = np.array([0.299, 0.587, 0.114])
# ICC Lab is relative to a D50 white; XYZ (D50) → linear sRGB with the Bradford adaptation to D65 (Lindbloom)
D50 = np.array([0.96422, 1.0, 0.82521])
XYZ_D50_TO_SRGB = np.array([[3.1338561, -1.6168667, -0.4906146],
                            [-0.9787684, 1.9161415, 0.0334540],
                            [0.0719453, -0.2289914, 1.4052427]])
ORIENTATIONS: dict[int, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    2: ("mirrored left-right", lambda a: a[:, ::-1]),
    3: ("rotated 180°", lambda a: a[::-1, ::-1]),
    4: ("mirrored top-bottom", lambda a: a[::-1]),
    5: ("transposed (mirrored about the main diagonal)", lambda a: a.swapaxes(0, 1)),
    6: ("rotated 90° clockwise", lambda a: np.rot90(a, -1)),
    7: ("transversed (mirrored about the anti-diagonal)", lambda a: np.rot90(a, 2).swapaxes(0, 1)),
    8: ("rotated 90° counter-clockwise", lambda a: np.rot90(a, 1)),
}


def open_image(path: str | Path) -> Image.Image:
    """The image file at ``path``, opened and loaded; Pillow's errors become a one-line :class:`InputError`."""
    name = str(path)
    if Path(path).is_dir():
        raise InputError(f"image {name!r}: is a directory, not an image file")
    if not Path(path).exists():
        raise InputError(f"image {name!r}: no such file")
    try:
        image = Image.open(path)
        try:
            image.load()
        except BaseException:
            image.close()
            raise
    except Image.DecompressionBombError as error:
        raise InputError(f"image {name!r}: too large to decode safely ({error})") from None
    except UnidentifiedImageError:
        raise InputError(f"image {name!r}: not an image Pillow can read") from None
    except (OSError, EOFError, SyntaxError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"image {name!r}: cannot be decoded ({first})") from None
    return image


def decode(image: Image.Image, channels: int) -> tuple[np.ndarray, dict]:
    """The picture as float32 (height, width, channels) in [0, 1] and the record of what was found and done.

    ``channels`` is 1 (grey) or 3 (RGB). The rules and the record's keys are in the module's docstring.
    """
    if channels not in (1, 3):
        raise InputError(f"channels: a picture decodes to 1 (grey) or 3 (RGB) channels, not {channels}")
    if image.width == 0 or image.height == 0:
        raise InputError(f"image of size {image.width}×{image.height}: has no pixels")
    frames = int(getattr(image, "n_frames", 1))
    if frames > 1 and image.tell() != 0:
        image.seek(0)
    record: dict = {"mode": image.mode, "size": list(image.size), "frames": frames, "orientation": 1,
                    "stored_range": None, "non_opaque": None, "icc_profile": bool(image.info.get("icc_profile")),
                    "steps": []}
    steps: list[str] = record["steps"]
    if frames > 1:
        steps.append(f"first of {frames} frames")
    values, alpha = _colour_and_alpha(image, channels, record)
    if alpha is not None:
        non_opaque = alpha < 1
        record["non_opaque"] = float(non_opaque.mean())
        steps.append(f"alpha dropped ({_share(non_opaque)} of pixels not opaque; their stored colour kept)")
    values = _orient(values, image, record)
    values = _channels(values, channels, steps)
    if record["icc_profile"]:
        steps.append("embedded ICC colour profile not applied (values taken as stored)")
    return np.ascontiguousarray(values, dtype=np.float32), record


def resize_crop(array: np.ndarray, size: int) -> tuple[np.ndarray, list[str]]:
    """Scale the shorter side to ``size``·256/224 (or to ``size`` below 64), bilinear, then centre-crop
    ``size``×``size``: the geometry of torchvision's ImageNet preprocessing, on float data channel by channel
    (Pillow mode ``F``), so 16-bit precision survives. The triangle filter has no negative weights: no overshoot.

    ``array`` is (height, width) or (height, width, channels); returns float32 (size, size, channels) and the
    steps taken, with a warning for an up- or downscale by more than 8×.
    """
    if size < 1:
        raise InputError(f"size: must be a positive number of pixels, not {size}")
    values = array[..., None] if array.ndim == 2 else array
    height, width = values.shape[:2]
    scale = size * 256 / 224 / min(width, height) if size >= 64 else size / min(width, height)
    resized = (max(size, round(width * scale)), max(size, round(height * scale)))
    steps = []
    if resized != (width, height):
        planes = [Image.fromarray(np.ascontiguousarray(values[..., band], dtype=np.float32)) for band in range(values.shape[2])]
        values = np.stack([np.asarray(plane.resize(resized, Image.Resampling.BILINEAR)) for plane in planes], axis=-1)
        steps.append(f"resized {width}×{height} → {resized[0]}×{resized[1]} (bilinear)")
    factor = min(resized) / min(width, height)
    if factor > 8:
        steps.append(f"warning: upscaled {factor:.3g}× from {width}×{height}; so small a picture carries little information")
    elif factor < 1 / 8:
        steps.append(f"warning: downscaled {1 / factor:.3g}× from {width}×{height}; its fine detail is lost")
    if resized != (size, size):
        left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
        values = values[top:top + size, left:left + size]
        steps.append(f"centre-cropped to {size}×{size}")
        kept = size * size / (resized[0] * resized[1])
        if kept < 0.5:
            steps.append(f"warning: the centre crop keeps {kept:.0%} of the picture ({width}×{height} is far from "
                         "square); crop it yourself to choose the part explained")
    return np.ascontiguousarray(values, dtype=np.float32), steps


def _colour_and_alpha(image: Image.Image, channels: int, record: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """Grey (H, W, 1) or RGB (H, W, 3) float64 in [0, 1], and alpha (H, W) in [0, 1] or None."""
    steps = record["steps"]
    key = image.info.get("transparency") if image.mode not in ("P", "PA") else None
    if image.mode in ("P", "PA"):
        palette = image.palette
        assert palette is not None  # Pillow gives every P and PA image a palette
        transparent = image.mode == "PA" or "transparency" in image.info or palette.mode == "RGBA"
        image = image.convert("RGBA" if transparent else "RGB")
        steps.append(f"palette expanded to {image.mode}")
    elif image.mode not in MODES:
        steps.append(f"mode {image.mode} converted to RGB by Pillow")
        image = image.convert("RGB")
    stored = np.asarray(image).astype(np.float64).reshape(image.height, image.width, -1)
    finite = stored[np.isfinite(stored)]
    record["stored_range"] = [float(finite.min()), float(finite.max())] if finite.size else None
    values = _scaled(stored, image.mode, steps)
    alpha = None
    if image.getbands()[-1] in ("A", "a"):
        values, alpha = values[..., :-1], values[..., -1]
        if image.getbands()[-1] == "a":
            values = np.divide(values, alpha[..., None], out=np.zeros_like(values), where=alpha[..., None] > 0)
            values = _clipped(values, "premultiplied colour divided by alpha in float (fully transparent pixels set to 0)", steps)
    elif isinstance(key, (int, tuple)):
        alpha = 1.0 - np.all(stored == np.asarray(key, dtype=np.float64), axis=-1)
        steps.append(f"colour key {key} marks transparent pixels")
    return _colour_space(values, image.mode, channels, steps), alpha


def _scaled(stored: np.ndarray, mode: str, steps: list[str]) -> np.ndarray:
    """The stored values mapped to [0, 1] by the mode's bit depth (``I`` and ``F`` by their range)."""
    if mode == "1":
        steps.append("1-bit values taken as 0 and 1")
        return stored
    if mode.startswith("I;16"):
        steps.append("16-bit values divided by 65535")
        return stored / 65535
    if mode == "I":
        low, high = stored.min(), stored.max()
        if low >= 0 and high <= 65535:
            dark = " (all ≤ 255: if they are 8-bit data the picture looks dark)" if 0 < high <= 255 else ""
            steps.append(f"32-bit integer values within 0..65535 taken as 16-bit data, divided by 65535{dark}")
            return stored / 65535
        return _rescaled(stored, "32-bit integer", steps)
    if mode == "F":
        finite = np.isfinite(stored)
        if not finite.any():
            steps.append("32-bit float values: none finite (NaN or ±inf): set to 0")
            return np.zeros_like(stored)
        low, high = float(stored[finite].min()), float(stored[finite].max())  # the range of the real data
        if low >= 0 and high <= 1:
            steps.append("32-bit float values used as stored (all within [0, 1])")
            scaled = stored
        else:
            scaled = _rescaled(stored, "32-bit float", steps, low, high)
        if not finite.all():
            scaled = np.where(finite, scaled, 0.0)
            steps.append(f"{_share(~finite)} of values not finite (NaN or ±inf): set to 0 after scaling")
        return scaled
    if mode != "LAB":  # its bytes are not intensities: _lab_to_srgb reads them
        steps.append("8-bit values divided by 255")
    return stored / 255


def _rescaled(stored: np.ndarray, kind: str, steps: list[str], low: float | None = None,
              high: float | None = None) -> np.ndarray:
    low = float(stored.min()) if low is None else low
    high = float(stored.max()) if high is None else high
    if low == high:
        steps.append(f"{kind} values all {low:g}, outside the expected range and constant: set to 0")
        return np.zeros_like(stored)
    steps.append(f"{kind} values {low:g}..{high:g} rescaled linearly to 0..1")
    return (stored - low) / (high - low)


def _colour_space(values: np.ndarray, mode: str, channels: int, steps: list[str]) -> np.ndarray:
    """Grey or RGB from the bands of ``mode`` (CMYK, YCbCr, LAB and HSV converted in float)."""
    if mode == "CMYK":
        steps.append("CMYK converted to RGB as (1 − C)·(1 − K) (no ink profile)")
        return (1 - values[..., :3]) * (1 - values[..., 3:])
    if mode == "YCbCr" and channels == 1:
        steps.append("Y (luma) band of YCbCr kept")
        return values[..., :1]
    if mode == "YCbCr":
        luma, blue, red = values[..., 0], values[..., 1] - 128 / 255, values[..., 2] - 128 / 255
        rgb = np.stack([luma + 1.402 * red, luma - 0.344136 * blue - 0.714136 * red, luma + 1.772 * blue], axis=-1)
        return _clipped(rgb, "YCbCr converted to RGB (JFIF, ITU-R 601 full range)", steps)
    if mode == "LAB":
        return _clipped(_lab_to_srgb(values), "CIE L*a*b* converted to sRGB (D50 white, Bradford-adapted)", steps)
    if mode == "HSV":
        steps.append("HSV converted to RGB")
        return _hsv_to_rgb(values)
    return values


def _lab_to_srgb(values: np.ndarray) -> np.ndarray:
    """Pillow's LAB array (L* = 100·v/255; a*, b* signed bytes as TIFF stores them) → sRGB, via XYZ (D50)."""
    signed = (np.rint(values[..., 1:] * 255) + 128) % 256 - 128
    lightness, a, b = values[..., 0] * 100, signed[..., 0], signed[..., 1]
    fy = (lightness + 16) / 116
    f = np.stack([fy + a / 500, fy, fy - b / 200], axis=-1)
    xyz = np.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * D50
    linear = xyz @ XYZ_D50_TO_SRGB.T
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * np.maximum(linear, 0) ** (1 / 2.4) - 0.055)


def _hsv_to_rgb(values: np.ndarray) -> np.ndarray:
    """Hue, saturation, value in [0, 1] → RGB (the formula of ``colorsys.hsv_to_rgb``)."""
    hue, saturation, value = values[..., 0], values[..., 1], values[..., 2]
    sector = np.floor(hue * 6)
    fraction = hue * 6 - sector
    p, q, t = value * (1 - saturation), value * (1 - saturation * fraction), value * (1 - saturation * (1 - fraction))
    sector = sector.astype(int) % 6
    return np.stack([np.choose(sector, [value, q, p, p, t, value]), np.choose(sector, [t, value, value, q, p, p]),
                     np.choose(sector, [p, p, t, value, value, q])], axis=-1)


def _orient(values: np.ndarray, image: Image.Image, record: dict) -> np.ndarray:
    orientation = image.getexif().get(0x0112, 1)
    if orientation in ORIENTATIONS:
        name, turn = ORIENTATIONS[orientation]
        record["orientation"] = int(orientation)
        record["steps"].append(f"EXIF orientation {orientation} applied ({name})")
        return turn(values)
    if orientation != 1:
        record["steps"].append(f"EXIF orientation {orientation!r} is not one of 1–8: ignored")
    return values


def _channels(values: np.ndarray, channels: int, steps: list[str]) -> np.ndarray:
    if values.shape[-1] == channels:
        return values
    if channels == 3:
        steps.append("grey replicated to 3 channels")
        return np.repeat(values, 3, axis=-1)
    if np.all(values[..., :1] == values[..., 1:]):
        steps.append("colour with R = G = B everywhere: taken as grey")
        return values[..., :1]
    steps.append("colour converted to grey (ITU-R 601 luma)")
    return (values @ LUMA)[..., None]


def _clipped(values: np.ndarray, step: str, steps: list[str]) -> np.ndarray:
    """``values`` clipped to [0, 1]; ``step`` recorded, with the share clipped beyond rounding noise."""
    outside = (values < -1e-6) | (values > 1 + 1e-6)
    steps.append(f"{step}; {_share(outside)} of values outside [0, 1] clipped" if outside.any() else step)
    return np.clip(values, 0, 1)


def _share(mask: np.ndarray) -> str:
    return f"{100 * float(np.mean(mask)):.3g}%"
