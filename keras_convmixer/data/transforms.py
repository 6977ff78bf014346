"""One image file at a time, without TensorFlow: header sniffing, PIL decoding and the eval transform.

``eval_geometry`` is the one definition of the evaluation resize-and-crop arithmetic
(torchvision's ``Resize(int)`` + ``CenterCrop``, as timm evaluates); ``eval_transform`` here
resamples with PIL, and the tf.data pipeline resamples with TensorFlow to the same box.
"""

from __future__ import annotations

import math
import os

import numpy as np

# The resamplers of the eval transform (PIL and TensorFlow both have them) and of the training crop, which
# also offers a random choice per image (timm's "random").
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area")
TRAIN_INTERPOLATIONS = ("bilinear", "bicubic", "random")

# What TensorFlow's decode_image reads; the first bytes of each file name its format.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_SIGNATURES = (
    ("JPEG", b"\xff\xd8\xff"),
    ("PNG", b"\x89PNG\r\n\x1a\n"),
    ("GIF", b"GIF87a"),
    ("GIF", b"GIF89a"),
    ("BMP", b"BM"),
)
# JPEG start-of-frame markers (they carry the size); C4, C8 and CC are other segments.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# The default of PIL's Image.MAX_IMAGE_PIXELS (PIL is imported lazily, so it is not read from there).
MAX_PIXELS = 89_478_485
_PIL_RESAMPLE = {"bilinear": 2, "bicubic": 3, "nearest": 0, "area": 4}  # Image.Resampling values


def check_max_pixels(max_pixels):
    if max_pixels is None:
        return None
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive whole number of pixels or None, got {max_pixels!r}")
    return int(max_pixels)


def check_interpolation(interpolation: str) -> str:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}: use one of {', '.join(INTERPOLATIONS)}")
    return interpolation


# ----------------------------------------------------------------------------- image headers


def _signature(head: bytes):
    for fmt, magic in _SIGNATURES:
        if head.startswith(magic):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _small_header_size(fmt: str, head: bytes):
    """``(height, width)`` from the first 32 bytes of a PNG, GIF, BMP or WebP file; None if absent."""
    be = int.from_bytes
    if fmt == "PNG" and head[12:16] == b"IHDR" and len(head) >= 24:
        return be(head[20:24], "big"), be(head[16:20], "big")
    if fmt == "GIF" and len(head) >= 10:
        return be(head[8:10], "little"), be(head[6:8], "little")  # the logical screen, which TF decodes to
    if fmt == "BMP" and len(head) >= 26:
        if be(head[14:18], "little") == 12:  # OS/2 core header: 16-bit sizes
            return be(head[20:22], "little"), be(head[18:20], "little")
        width = be(head[18:22], "little", signed=True)
        height = be(head[22:26], "little", signed=True)  # negative: stored top-down
        return abs(height), abs(width)
    if fmt == "WEBP" and len(head) >= 30:
        chunk = head[12:16]
        if chunk == b"VP8 ":
            return be(head[28:30], "little") & 0x3FFF, be(head[26:28], "little") & 0x3FFF
        if chunk == b"VP8L":
            bits = be(head[21:25], "little")
            return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
        if chunk == b"VP8X":
            return be(head[27:30], "little") + 1, be(head[24:27], "little") + 1
    return None


def _jpeg_size(f):
    """``(height, width)`` from a JPEG's frame header, walking the segments before it; None if not found."""
    pos = 2
    for _ in range(10_000):
        f.seek(pos)
        marker = f.read(2)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        while marker[1] == 0xFF:  # fill bytes before a marker
            pos += 1
            marker = marker[1:] + f.read(1)
            if len(marker) < 2:
                return None
        code = marker[1]
        if code == 0x01 or 0xD0 <= code <= 0xD8:  # markers without a length
            pos += 2
            continue
        if code in (0xD9, 0xDA):  # end of image / start of scan: no frame header came first
            return None
        segment = f.read(7)
        if len(segment) < 2:
            return None
        if code in _JPEG_SOF:
            if len(segment) < 7:
                return None
            return int.from_bytes(segment[3:5], "big"), int.from_bytes(segment[5:7], "big")
        pos += 2 + int.from_bytes(segment[:2], "big")
    return None


def image_header(path: str):
    """``(format, (height, width) or None)`` from the file's first bytes, or ``(None, reason)``.

    The format is what ``tf.io.decode_image`` dispatches on: the signature, not the extension.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(32)
            fmt = _signature(head)
            if fmt is None:
                return None, "not a JPEG, PNG, GIF, BMP or WebP file"
            return fmt, (_jpeg_size(f) if fmt == "JPEG" else _small_header_size(fmt, head))
    except OSError as e:
        return None, str(e) or type(e).__name__


def over_limit(size, max_pixels) -> str | None:
    """The reason an image of ``size`` = (height, width) may not be decoded, or None."""
    if max_pixels is None or size is None:
        return None
    height, width = size
    if height * width <= max_pixels:
        return None
    return f"{width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} (max_pixels)"


# ----------------------------------------------------------------------------- decoding with PIL


def _pil_to_rgb_array(im) -> np.ndarray:
    # 16/32-bit grayscale would be clipped by convert("RGB"); scale it down the way TF does (>> 8).
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        gray = np.asarray(im, dtype=np.int64)
        if im.mode == "I" and gray.max(initial=0) < 256:
            gray8 = gray.astype(np.uint8)
        else:
            gray8 = np.clip(gray >> 8, 0, 255).astype(np.uint8)
        return np.repeat(gray8[..., None], 3, axis=-1)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # PIL warns on P+transparency -> RGB; the alpha is dropped either way
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def pil_decode(path: str, max_pixels):
    """``(uint8 HWC RGB, None)`` or ``(None, reason)``; the size is checked before any pixel is decoded."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            reason = over_limit((im.size[1], im.size[0]), max_pixels)
            if reason:
                return None, reason
            im.load()
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            return _pil_to_rgb_array(im), None
    except Image.DecompressionBombError as e:
        # PIL refuses sizes over twice its own Image.MAX_IMAGE_PIXELS before telling them.
        fmt, size = image_header(path)
        reason = over_limit(size, max_pixels) if fmt else None
        return None, reason or f"{e} (PIL's Image.MAX_IMAGE_PIXELS applies too)"
    except (OSError, SyntaxError, ValueError) as e:
        return None, str(e) or type(e).__name__


def pil_size(path: str, max_pixels):
    """``((height, width), None)`` from PIL's header parser, or ``(None, reason)``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return (im.size[1], im.size[0]), None
    except Image.DecompressionBombError:
        return None, pil_decode(path, max_pixels)[1]
    except (OSError, SyntaxError, ValueError) as e:
        return None, str(e) or type(e).__name__


def read_image(path, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Decode one image file with PIL into uint8 HWC RGB (gray, RGBA, palette, CMYK converted).

    Alpha is dropped, not composited (as ``tf.io.decode_image(channels=3)`` does). Raises
    ``ValueError`` naming the file if it cannot be decoded or has more than ``max_pixels`` pixels
    (None: no limit of ours; PIL's ``Image.MAX_IMAGE_PIXELS`` still applies), which is read
    from the header so such a file is never decoded. ``FileNotFoundError`` if absent.
    """
    path = os.fspath(path)
    max_pixels = check_max_pixels(max_pixels)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    image, reason = pil_decode(path, max_pixels)
    if reason:
        raise ValueError(f"cannot decode image {path}: {reason}")
    return image


# ----------------------------------------------------------------------------- the eval transform


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive whole number, got {value!r}")
    return int(value)


def scale_size(image_size: int, crop_pct: float) -> int:
    """The shorter side before the centre crop: ``int(image_size / crop_pct)``."""
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float, np.integer, np.floating)):
        raise ValueError(f"crop_pct must be a number in (0, 1], got {crop_pct!r}")
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    # The epsilon keeps e.g. 224/0.875 at 256 despite float error.
    return int(math.floor(image_size / crop_pct + 1e-6))


def eval_geometry(height: int, width: int, image_size: int, crop_pct: float = 1.0) -> tuple[int, int, int, int]:
    """``(new_h, new_w, top, left)``: resize ``height x width`` to ``new_h x new_w``, then crop from ``(top, left)``.

    The shorter side becomes ``int(image_size / crop_pct)`` and the longer keeps the aspect ratio,
    rounded down; the ``image_size`` square is centred, rounding half to even (torchvision's
    ``Resize(int)`` and ``CenterCrop``).
    """
    height, width = _positive_int(height, "height"), _positive_int(width, "width")
    image_size = _positive_int(image_size, "image_size")
    scale = scale_size(image_size, crop_pct)
    if width <= height:
        new_h, new_w = scale * height // width, scale
    else:
        new_h, new_w = scale, scale * width // height
    return new_h, new_w, int(round((new_h - image_size) / 2.0)), int(round((new_w - image_size) / 2.0))


def resize_crop_uint8(image: np.ndarray, image_size: int, crop_pct: float = 1.0, interpolation: str = "bilinear"):
    """``eval_transform`` kept as uint8: what the in-memory loader stores."""
    from PIL import Image

    check_interpolation(interpolation)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be a uint8 HWC RGB array, got {image.dtype} of shape {image.shape}")
    h, w = image.shape[:2]
    new_h, new_w, top, left = eval_geometry(h, w, image_size, crop_pct)
    if (new_h, new_w, top, left) == (h, w, 0, 0) and h == w == image_size:
        return image
    im = Image.fromarray(image)
    if (new_h, new_w) != (h, w):
        im = im.resize((new_w, new_h), resample=_PIL_RESAMPLE[interpolation])
    return np.asarray(im.crop((left, top, left + image_size, top + image_size)), dtype=np.uint8)


def eval_transform(image, image_size: int, crop_pct: float = 1.0, interpolation: str = "bilinear") -> np.ndarray:
    """Resize the shorter side to ``int(image_size / crop_pct)``, then centre-crop ``image_size``, with PIL.

    ``image`` is a uint8 HWC RGB NumPy array; returns float32 ``[image_size, image_size, 3]`` in
    [0, 255], whole numbers (the uint8 PIL result). The tf.data pipeline's transform gives the same
    box with TensorFlow's resampler.
    """
    return resize_crop_uint8(image, image_size, crop_pct, interpolation).astype(np.float32)
