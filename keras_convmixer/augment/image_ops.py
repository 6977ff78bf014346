"""The RandAugment ops of torchvision and timm, batched, reproducing PIL's integer arithmetic.

Both libraries run their ops on PIL images, so every op here takes float32 (B, H, W, C) images holding
integers in [0, 255] and returns integers (as float32): results match PIL pixel for pixel, except for
float32-vs-float64 rounding at exact ties in the geometric ops. Each op is written once against a
namespace ``xp`` (``keras_convmixer.augment.xp``): ``keras.ops`` on the device, TensorFlow on the host.

Also here: each library's rule from a magnitude to an op's argument (``torchvision_magnitudes`` /
``torchvision_arg``, ``timm_arg``).
"""

import functools
import math

import numpy as np

# --------------------------------------------------------------------------------------------------
# Pixel ops. ``images``: float32 (B, H, W, C) holding integers in [0, 255]; ``arg``: float32 (B,).


def _per_image(xp, v):
    return xp.reshape(v, (-1, 1, 1, 1))


def _blend(xp, degenerate, images, factor):
    # PIL's Image.blend: float32 degenerate + factor * (image - degenerate), clipped, truncated to uint8.
    # PIL rounds the product before adding; the select keeps a compiler from fusing both into one
    # fused multiply-add, which rounds once and moves results that sit just off an integer.
    difference = images - degenerate
    product = xp.where(xp.equal(difference, 0.0), 0.0, _per_image(xp, factor) * difference)
    return xp.floor(xp.clip(degenerate + product, 0.0, 255.0))


def _gray(xp, images):
    # PIL's RGB -> L conversion (ITU-R 601-2 in 16-bit fixed point, rounded); exact in float32 (< 2**24).
    r, g, b = images[..., 0:1], images[..., 1:2], images[..., 2:3]
    return xp.floor((r * 19595.0 + g * 38470.0 + b * 7471.0 + 32768.0) / 65536.0)


def op_identity(xp, images, arg, ctx):
    return images


def op_brightness(xp, images, arg, ctx):
    return _blend(xp, 0.0, images, arg)


def op_color(xp, images, arg, ctx):
    return _blend(xp, _gray(xp, images), images, arg)


def op_contrast(xp, images, arg, ctx):
    # PIL: the degenerate image is the grey level int(mean(L) + 0.5), in integers to stay exact.
    gray = xp.cast(_gray(xp, images), xp.int32)
    count = images.shape[1] * images.shape[2]
    total = xp.sum(gray, axis=(1, 2, 3), keepdims=True)
    mean = xp.floor_divide(2 * total + count, 2 * count)
    return _blend(xp, xp.cast(mean, xp.float32), images, arg)


def _smooth(xp, images):
    # PIL's ImageFilter.SMOOTH (3x3 [1 1 1; 1 5 1; 1 1 1] / 13, rounded); the one-pixel border is copied.
    height, width = images.shape[1], images.shape[2]
    if height < 3 or width < 3:
        return images
    centre = images[:, 1:-1, 1:-1]
    total = 4.0 * centre
    for dy in range(3):
        for dx in range(3):
            total = total + images[:, dy : dy + height - 2, dx : dx + width - 2]
    inner = xp.floor(total / 13.0 + 0.5)
    middle = xp.concatenate([images[:, 1:-1, :1], inner, images[:, 1:-1, -1:]], axis=2)
    return xp.concatenate([images[:, :1], middle, images[:, -1:]], axis=1)


def op_sharpness(xp, images, arg, ctx):
    return _blend(xp, _smooth(xp, images), images, arg)


def op_posterize(xp, images, arg, ctx):
    # PIL keeps the top ``bits`` bits (bits >= 8: unchanged; 0: black, as timm's PosterizeIncreasing
    # asks for at magnitude 10; Pillow >= 13 refuses bits=0 there instead).
    step = xp.where(arg >= 8.0, 1.0, 2.0 ** (8.0 - xp.minimum(arg, 8.0)))
    step = _per_image(xp, step)
    return xp.floor(images / step) * step


def op_solarize(xp, images, arg, ctx):
    return xp.where(images >= _per_image(xp, arg), 255.0 - images, images)


def op_solarize_add(xp, images, arg, ctx):
    # timm: add to the pixels below 128, saturating at 255.
    return xp.where(images < 128.0, xp.minimum(images + _per_image(xp, arg), 255.0), images)


def op_invert(xp, images, arg, ctx):
    return 255.0 - images


def _apply_lut(xp, images, lut):
    """``lut``: int32 (B, C, 256); pixel value v of channel c of image b becomes lut[b, c, v]."""
    channels = images.shape[-1]
    n = xp.batch_size(images)
    rows = xp.reshape(xp.arange(n, dtype=xp.int32), (-1, 1, 1, 1)) * channels
    rows = (rows + xp.reshape(xp.arange(channels, dtype=xp.int32), (1, 1, 1, -1))) * 256
    idx = rows + xp.cast(images, xp.int32)
    return xp.cast(xp.take(xp.reshape(lut, (-1,)), idx), xp.float32)


@functools.lru_cache(maxsize=1)
def autocontrast_exceptions():
    """Keys lo*65536 + hi*256 + v where PIL's double-precision ``int(v * scale + offset)`` lands one
    below the exact ``floor(255 * (v - lo) / (hi - lo))`` (the exact value is then an integer)."""
    keys = []
    v = np.arange(256, dtype=np.int64)
    for lo in range(255):
        hi = np.arange(lo + 1, 256, dtype=np.int64)[:, None]
        scale = 255.0 / (hi - lo)
        pil = (v * scale + (-lo * scale)).astype(np.int64)
        exact = (255 * (v - lo)) // (hi - lo)
        inside = (v >= lo) & (v <= hi)
        hit_hi, hit_v = np.nonzero(inside & (pil != exact))
        keys.append(lo * 65536 + (hi[hit_hi, 0]) * 256 + v[hit_v])
    return np.sort(np.concatenate(keys)).astype(np.int32)


def op_autocontrast(xp, images, arg, ctx):
    # PIL's ImageOps.autocontrast per channel: lut[v] = int(v * 255/(hi-lo) - lo * 255/(hi-lo)) in doubles.
    lo = xp.min(images, axis=(1, 2))[:, :, None]  # (B, C, 1)
    hi = xp.max(images, axis=(1, 2))[:, :, None]
    span = hi - lo
    v = xp.reshape(xp.cast(xp.arange(256, dtype=xp.int32), xp.float32), (1, 1, 256))
    # floor of the exact quotient; +1e-3 guards against a division that is not correctly rounded.
    exact = xp.floor((v - lo) * 255.0 / xp.maximum(span, 1.0) + 1e-3)
    keys = xp.convert(ctx["autocontrast_keys"])
    query = xp.cast(lo * 65536.0 + hi * 256.0 + v, xp.int32)
    flat = xp.reshape(query, (-1,))
    pos = xp.minimum(xp.cast(xp.searchsorted(keys, flat), xp.int32), int(ctx["autocontrast_keys"].shape[0]) - 1)
    below = xp.reshape(xp.cast(xp.equal(xp.take(keys, pos), flat), xp.float32), (-1, images.shape[-1], 256))
    lut = xp.clip(exact - below, 0.0, 255.0)
    lut = xp.where(span > 0.0, lut, v + 0.0 * lo)
    return _apply_lut(xp, images, xp.cast(lut, xp.int32))


def op_equalize(xp, images, arg, ctx):
    # PIL's ImageOps.equalize per channel, in integers:
    #   step = (count - count of the last non-empty bin) // 255
    #   lut[i] = (step // 2 + pixels below i) // step  (identity when step == 0 or a single level).
    height, width, channels = images.shape[1], images.shape[2], images.shape[3]
    n = xp.batch_size(images)
    rows = xp.reshape(xp.arange(n, dtype=xp.int32), (-1, 1, 1, 1)) * channels
    rows = (rows + xp.reshape(xp.arange(channels, dtype=xp.int32), (1, 1, 1, -1))) * 256
    ids = xp.reshape(rows + xp.cast(images, xp.int32), (-1,))
    hist = xp.segment_sum(xp.ones_like(ids), ids, n * channels * 256)
    hist = xp.reshape(hist, (-1, channels, 256))
    levels = xp.reshape(xp.arange(256, dtype=xp.int32), (1, 1, 256))
    present = hist > 0
    last = xp.max(xp.where(present, levels, -1), axis=2, keepdims=True)
    last_count = xp.sum(xp.where(xp.equal(levels, last), hist, 0), axis=2, keepdims=True)
    used = xp.sum(xp.cast(present, xp.int32), axis=2, keepdims=True)
    step = xp.floor_divide(height * width - last_count, 255)
    below = xp.cumsum(hist, axis=2) - hist
    lut = xp.floor_divide(xp.floor_divide(step, 2) + below, xp.maximum(step, 1))
    keep = xp.logical_or(used <= 1, step <= 0)
    lut = xp.minimum(xp.where(keep, levels + 0 * lut, lut), 255)
    return _apply_lut(xp, images, lut)


def warp(xp, images, matrix, fill, interpolation):
    """PIL's ``Image.transform(AFFINE)``: output pixel (x, y) samples the input at
    ``(m0 (x+.5) + m1 (y+.5) + m2, m3 (x+.5) + m4 (y+.5) + m5)`` (pixel-corner coordinates).

    ``matrix``: (B, 6). Samples outside the image take ``fill`` (C,). "nearest" takes the pixel the point
    falls in; "bilinear" interpolates between pixel centres, clamped at the edges, and truncates, as PIL.
    """
    height, width, channels = images.shape[1], images.shape[2], images.shape[3]
    n = xp.batch_size(images)
    xs = xp.cast(xp.arange(width, dtype=xp.int32), xp.float32) + 0.5
    ys = xp.cast(xp.arange(height, dtype=xp.int32), xp.float32) + 0.5
    xs = xp.reshape(xp.reshape(xs, (1, -1)) + xp.reshape(0.0 * ys, (-1, 1)), (1, -1))  # (1, H*W) row-major
    ys = xp.reshape(xp.reshape(ys, (-1, 1)) + xp.reshape(0.0 * xs[0, :width], (1, -1)), (1, -1))
    m = [matrix[:, i : i + 1] for i in range(6)]
    u = m[0] * xs + m[1] * ys + m[2]
    v = m[3] * xs + m[4] * ys + m[5]
    if interpolation == "nearest":
        # PIL maps a rotation or shear in 16.16 fixed point (pure scaling/translation in floats), so
        # fixed-point rounding decides which pixel a point on a pixel edge takes.
        def fix(value):
            return xp.cast(xp.floor(value * 65536.0 + 0.5), xp.int32)

        col, row = xp.cast(xs - 0.5, xp.int32), xp.cast(ys - 0.5, xp.int32)
        fixed_u = fix(m[2] + 0.5 * m[0] + 0.5 * m[1]) + row * fix(m[1]) + col * fix(m[0])
        fixed_v = fix(m[5] + 0.5 * m[3] + 0.5 * m[4]) + row * fix(m[4]) + col * fix(m[3])
        scaling = xp.logical_and(xp.equal(m[1], 0.0), xp.equal(m[3], 0.0))
        u = xp.where(scaling, xp.floor(u), xp.cast(xp.floor_divide(fixed_u, 65536), xp.float32))
        v = xp.where(scaling, xp.floor(v), xp.cast(xp.floor_divide(fixed_v, 65536), xp.float32))
    inside = xp.logical_and(xp.logical_and(u >= 0.0, u < float(width)), xp.logical_and(v >= 0.0, v < float(height)))
    pixels = xp.reshape(images, (-1, channels))  # one row per pixel: a gather fetches all channels
    base = xp.reshape(xp.arange(n, dtype=xp.int32), (-1, 1)) * (height * width)

    def gather(iy, ix):
        return xp.take_rows(pixels, base + xp.cast(iy, xp.int32) * width + xp.cast(ix, xp.int32))

    if interpolation == "nearest":
        out = gather(xp.clip(v, 0.0, height - 1.0), xp.clip(u, 0.0, width - 1.0))
    else:
        u, v = u - 0.5, v - 0.5
        x0, y0 = xp.floor(u), xp.floor(v)
        dx, dy = xp.expand_dims(u - x0, -1), xp.expand_dims(v - y0, -1)
        x1, y1 = xp.clip(x0 + 1.0, 0.0, width - 1.0), xp.clip(y0 + 1.0, 0.0, height - 1.0)
        x0, y0 = xp.clip(x0, 0.0, width - 1.0), xp.clip(y0, 0.0, height - 1.0)
        top_left, top_right = gather(y0, x0), gather(y0, x1)
        bottom_left, bottom_right = gather(y1, x0), gather(y1, x1)
        top = top_left + (top_right - top_left) * dx
        bottom = bottom_left + (bottom_right - bottom_left) * dx
        out = xp.floor(top + (bottom - top) * dy)
    fill = xp.reshape(xp.convert(np.asarray(fill, dtype="float32")), (1, 1, -1))
    out = xp.where(xp.expand_dims(inside, -1), out, fill)
    return xp.reshape(out, (-1, height, width, channels))


# Inverse maps (output -> input, pixel corners) of the geometric ops, (B, 6) from ``arg`` (B,).
def _stack6(xp, arg, entries):
    zero = 0.0 * arg
    return xp.stack([zero + e for e in entries], axis=1)


def matrix_shear_x(xp, arg, height, width):
    return _stack6(xp, arg, [1.0, arg, 0.0, 0.0, 1.0, 0.0])


def matrix_shear_y(xp, arg, height, width):
    return _stack6(xp, arg, [1.0, 0.0, 0.0, arg, 1.0, 0.0])


def matrix_translate_x(xp, arg, height, width):
    # ``arg`` pixels: positive samples from the right, i.e. moves the content left (PIL/timm convention).
    return _stack6(xp, arg, [1.0, 0.0, arg, 0.0, 1.0, 0.0])


def matrix_translate_y(xp, arg, height, width):
    return _stack6(xp, arg, [1.0, 0.0, 0.0, 0.0, 1.0, arg])


def matrix_rotate(xp, arg, height, width):
    # PIL's Image.rotate(degrees) about the centre (w/2, h/2): counter-clockwise for positive degrees.
    theta = -arg * (math.pi / 180.0)
    a, b = xp.cos(theta), xp.sin(theta)
    cx, cy = width / 2.0, height / 2.0
    return _stack6(xp, arg, [a, b, cx - a * cx - b * cy, -b, a, cy + b * cx - a * cy])


MATRICES = {
    "ShearX": matrix_shear_x,
    "ShearY": matrix_shear_y,
    "TranslateX": matrix_translate_x,
    "TranslateY": matrix_translate_y,
    "TranslateXRel": matrix_translate_x,
    "TranslateYRel": matrix_translate_y,
    "Rotate": matrix_rotate,
}


def _geometric(name):
    def op(xp, images, arg, ctx):
        matrix = MATRICES[name](xp, arg, images.shape[1], images.shape[2])
        return warp(xp, images, matrix, ctx["fill"], ctx["interpolation"])

    op.__name__ = f"op_{name}"
    return op


PIXEL_OPS = {
    "Identity": op_identity,
    "Brightness": op_brightness,
    "Color": op_color,
    "Contrast": op_contrast,
    "Sharpness": op_sharpness,
    "Posterize": op_posterize,
    "Solarize": op_solarize,
    "SolarizeAdd": op_solarize_add,
    "Invert": op_invert,
    "AutoContrast": op_autocontrast,
    "Equalize": op_equalize,
}
for _name in ("Brightness", "Color", "Contrast", "Sharpness", "Posterize", "Solarize"):
    PIXEL_OPS[_name + "Increasing"] = PIXEL_OPS[_name]
for _name in MATRICES:
    PIXEL_OPS[_name] = _geometric(_name)
GEOMETRIC_OPS = frozenset(MATRICES)


# --------------------------------------------------------------------------------------------------
# Magnitude -> op argument. ``m``: magnitude (B,) float32; ``sign``: +-1 (B,).


def torch_linspace(start, end, steps):
    """``torch.linspace(start, end, steps)`` in float32 as torch's CPU kernel computes it: a float32
    step, the first half counted up from ``start`` and the rest down from ``end``, each a fused
    multiply-add (one rounding, done here in float64)."""
    start, end = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start], dtype=np.float32)
    step = np.float64(np.float32((end - start) / np.float32(steps - 1)))
    i = np.arange(steps)
    up = np.float64(start) + step * i
    down = np.float64(end) - step * (steps - 1 - i)
    return np.where(i < steps // 2, up, down).astype(np.float32)


def torchvision_magnitudes(num_bins, height, width):
    """torchvision's ``RandAugment._augmentation_space``: op -> (per-bin magnitudes, signed)."""
    posterize = 8 - np.round(np.arange(num_bins, dtype=np.float32) / np.float32((num_bins - 1) / 4.0))
    return {
        "Identity": (np.zeros(num_bins), False),
        "ShearX": (torch_linspace(0.0, 0.3, num_bins), True),
        "ShearY": (torch_linspace(0.0, 0.3, num_bins), True),
        "TranslateX": (torch_linspace(0.0, 150.0 / 331.0 * width, num_bins), True),
        "TranslateY": (torch_linspace(0.0, 150.0 / 331.0 * height, num_bins), True),
        "Rotate": (torch_linspace(0.0, 30.0, num_bins), True),
        "Brightness": (torch_linspace(0.0, 0.9, num_bins), True),
        "Color": (torch_linspace(0.0, 0.9, num_bins), True),
        "Contrast": (torch_linspace(0.0, 0.9, num_bins), True),
        "Sharpness": (torch_linspace(0.0, 0.9, num_bins), True),
        "Posterize": (posterize.astype(np.int64), False),
        "Solarize": (torch_linspace(255.0, 0.0, num_bins), False),
        "AutoContrast": (np.zeros(num_bins), False),
        "Equalize": (np.zeros(num_bins), False),
    }


def torchvision_arg(name, xp, value, sign):
    """torchvision's ``_apply_op`` argument for magnitude ``value`` (already taken from the bin table)."""
    if name in ("ShearX", "ShearY"):
        # torchvision shears by atan(m) about (0, 0): its inverse PIL matrix has tan(atan(m)) = m.
        return sign * value
    if name == "TranslateX" or name == "TranslateY":
        # F.affine(translate=int(m)) moves the content by +int(m): the inverse map samples at x - int(m).
        return -sign * xp.floor(value)
    if name == "Rotate":
        return sign * value
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        return 1.0 + sign * value
    return value + 0.0 * sign


def _divide(x, denominator):
    # XLA rewrites x / constant as x * (1 / constant), which is not correctly rounded; a denominator
    # computed from the data stays a true division.
    return x / (denominator + 0.0 * x)


def timm_arg(name, xp, m, sign, hparams):
    """timm's ``LEVEL_TO_ARG`` functions on a magnitude ``m`` in [0, magnitude_max].

    timm computes in doubles; dividing last keeps float32 results equal to float32(timm's value) for
    integer magnitudes (e.g. enhance 0.9 * 1.8 + 0.1 = 1.72, which PIL's blend then rounds to float32).
    """
    if name == "Rotate":
        return sign * (m * 3.0)
    if name in ("ShearX", "ShearY"):
        return _divide(sign * (m * 3.0), 100.0)
    if name in ("TranslateXRel", "TranslateYRel"):
        size = hparams["width"] if name == "TranslateXRel" else hparams["height"]
        return _divide(sign * (m * (hparams["translate_pct"] * 100.0 * size)), 1000.0)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return _divide(m * 18.0 + 10.0, 100.0)
    if name.endswith("Increasing") and not name.startswith(("Posterize", "Solarize")):
        return xp.maximum(_divide(100.0 + sign * (m * 9.0), 100.0), 0.1)
    if name == "Posterize":
        return xp.floor(_divide(m * 4.0, 10.0))
    if name == "PosterizeIncreasing":
        return 4.0 - xp.floor(_divide(m * 4.0, 10.0))
    if name == "Solarize":
        return xp.minimum(xp.floor(_divide(m * 256.0, 10.0)), 256.0)
    if name == "SolarizeIncreasing":
        return 256.0 - xp.minimum(xp.floor(_divide(m * 256.0, 10.0)), 256.0)
    if name == "SolarizeAdd":
        return xp.minimum(xp.floor(m * 11.0), 128.0)
    return 0.0 * m  # AutoContrast, Equalize, Invert: no argument
