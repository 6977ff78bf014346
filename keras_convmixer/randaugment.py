"""RandAugment exactly as torchvision and timm define it, per image, on the host and on the device.

Two policies:

* ``policy="torchvision"``: ``torchvision.transforms.RandAugment(num_ops, magnitude, num_magnitude_bins)``
  on PIL images (the CIFAR recipe). 14 ops, ``num_ops`` drawn per image uniformly with replacement,
  signed ops take a random sign, fill 0, nearest-neighbour resampling (torchvision's default).
* ``policy="timm"``: timm's ``rand_augment_transform`` (the ImageNet recipe, ``rand-m9-mstd0.5-inc1``).
  ``num_ops`` ops drawn per image with replacement, each applied with probability ``prob`` (0.5) with a
  magnitude redrawn per application from N(magnitude, magnitude_std) clipped to [0, magnitude_max].
  ``increasing=True`` is timm's ``inc1`` op set. Fill (128, 128, 128) (timm's own default; timm's
  ``create_transform`` passes ``round(255 * mean)``, (124, 116, 104) for ImageNet: see
  ``from_timm_string(mean=...)``). Geometric ops resample bilinearly: ``create_transform``'s default
  ``interpolation="bilinear"``; with ``--train-interpolation random`` timm picks bilinear or bicubic
  per op, and bicubic is not offered here.

Every op reproduces PIL's integer arithmetic (both libraries run on PIL images): the layer rounds its
input to integers in [0, 255] and every op returns integers (as float32), so results match PIL pixel
for pixel except for float32-vs-float64 rounding at exact ties in the geometric ops.

Each op is written once, batched, against a small NumPy-like namespace ``xp``: ``keras.ops`` on the
device, TensorFlow on the host; the per-image random draws go through one ``sample`` rule too.

* Device (``layer(images, training=True)``): computes every op for the whole batch and selects per
  image (all geometric ops share one warp); runs inside a compiled train step on every backend.
* Host, per image (``ds.map(layer.host_map)`` before ``batch``, any backend): only the chosen op runs,
  through ``tf.switch_case``.
* Host, per batch (``ds.batch(n).map(layer.host_batch_map)``): still one op choice per image; the
  images are grouped by op and each group is transformed at once (fewer, larger kernels: faster on
  small images).

TensorFlow is imported lazily, only by the host paths.
"""

import functools
import math
import re
import types

import keras
import numpy as np
from keras import ops

TORCHVISION_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                   "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
# timm's _RAND_INCREASING_TRANSFORMS and _RAND_TRANSFORMS, in timm's order.
TIMM_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                       "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                       "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
TIMM_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
            "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
POLICIES = ("torchvision", "timm")
GEOMETRIC_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel",
                           "Rotate"})
TIMM_FILL = (128.0, 128.0, 128.0)
_LEVEL_DENOM = 10.0  # timm's magnitude scale: m10 is each op's full range (its default clip)


# --------------------------------------------------------------------------------------------------
# The two namespaces every op is written against.

def _tf():
    import tensorflow as tf

    return tf


def keras_namespace():
    """``keras.ops`` under the names the ops use (the device path)."""

    def batch_size(x):
        return ops.shape(x)[0]

    def segment_sum(data, ids, count):
        return ops.segment_sum(data, ids, num_segments=count)

    def take_rows(x, idx):
        return ops.take(x, idx, axis=0)

    return types.SimpleNamespace(
        name="keras", int32="int32", float32="float32",
        cast=ops.cast, floor=ops.floor, round=ops.round, clip=ops.clip, minimum=ops.minimum, maximum=ops.maximum,
        where=ops.where, abs=ops.abs, cos=ops.cos, sin=ops.sin, exp=ops.exp, sqrt=ops.sqrt, sum=ops.sum,
        min=ops.min, max=ops.max, cumsum=ops.cumsum, reshape=ops.reshape, stack=ops.stack,
        concatenate=ops.concatenate, expand_dims=ops.expand_dims, arange=ops.arange, zeros_like=ops.zeros_like,
        ones_like=ops.ones_like, take=ops.take, floor_divide=ops.floor_divide, logical_or=ops.logical_or,
        logical_and=ops.logical_and, equal=ops.equal, convert=ops.convert_to_tensor,
        searchsorted=ops.searchsorted, batch_size=batch_size, segment_sum=segment_sum, take_rows=take_rows,
    )


@functools.lru_cache(maxsize=1)
def tf_namespace():
    """The same functions as TensorFlow ops (the host path, in ``tf.data`` under any Keras backend)."""
    tf = _tf()

    # Named functions, not lambdas: tf.data's autograph reads their source.
    def reduce(fn):
        def reduced(x, axis=None, keepdims=False):
            return fn(x, axis=axis, keepdims=keepdims)
        return reduced

    def cumsum(x, axis=None):
        return tf.cumsum(x, axis=axis)

    def stack(xs, axis=0):
        return tf.stack(xs, axis=axis)

    def concatenate(xs, axis=0):
        return tf.concat(xs, axis)

    def arange(*args, dtype=None):
        return tf.range(*args, dtype=dtype or tf.int32)

    def searchsorted(sequence, values):
        return tf.searchsorted(sequence, values)

    def batch_size(x):
        return tf.shape(x)[0]

    return types.SimpleNamespace(
        name="tf", int32=tf.int32, float32=tf.float32,
        cast=tf.cast, floor=tf.floor, round=tf.round, clip=tf.clip_by_value, minimum=tf.minimum,
        maximum=tf.maximum, where=tf.where, abs=tf.abs, cos=tf.cos, sin=tf.sin, exp=tf.exp, sqrt=tf.sqrt,
        sum=reduce(tf.reduce_sum), min=reduce(tf.reduce_min), max=reduce(tf.reduce_max), cumsum=cumsum,
        reshape=tf.reshape, stack=stack, concatenate=concatenate, expand_dims=tf.expand_dims, arange=arange,
        zeros_like=tf.zeros_like, ones_like=tf.ones_like, take=tf.gather, floor_divide=tf.math.floordiv,
        logical_or=tf.logical_or, logical_and=tf.logical_and, equal=tf.equal, convert=tf.convert_to_tensor,
        searchsorted=searchsorted, batch_size=batch_size, segment_sum=tf.math.unsorted_segment_sum,
        take_rows=tf.gather,
    )


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
            total = total + images[:, dy:dy + height - 2, dx:dx + width - 2]
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
def _autocontrast_exceptions():
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
    m = [matrix[:, i:i + 1] for i in range(6)]
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


MATRICES = {"ShearX": matrix_shear_x, "ShearY": matrix_shear_y, "TranslateX": matrix_translate_x,
            "TranslateY": matrix_translate_y, "TranslateXRel": matrix_translate_x,
            "TranslateYRel": matrix_translate_y, "Rotate": matrix_rotate}


def _geometric(name):
    def op(xp, images, arg, ctx):
        matrix = MATRICES[name](xp, arg, images.shape[1], images.shape[2])
        return warp(xp, images, matrix, ctx["fill"], ctx["interpolation"])

    op.__name__ = f"op_{name}"
    return op


PIXEL_OPS = {
    "Identity": op_identity, "Brightness": op_brightness, "Color": op_color, "Contrast": op_contrast,
    "Sharpness": op_sharpness, "Posterize": op_posterize, "Solarize": op_solarize, "SolarizeAdd": op_solarize_add,
    "Invert": op_invert, "AutoContrast": op_autocontrast, "Equalize": op_equalize,
}
for _name in ("Brightness", "Color", "Contrast", "Sharpness", "Posterize", "Solarize"):
    PIXEL_OPS[_name + "Increasing"] = PIXEL_OPS[_name]
for _name in MATRICES:
    PIXEL_OPS[_name] = _geometric(_name)


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


# --------------------------------------------------------------------------------------------------
# The layer.

def box_muller(u1, u2):
    """Standard normals from two uniforms in [0, 1) (keras.ops)."""
    return ops.sqrt(-2.0 * ops.log(1.0 - u1)) * ops.cos((2.0 * math.pi) * u2)


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"RandAugment {name} must be an integer >= {low}, got {value!r}.")
    return int(value)


@keras.saving.register_keras_serializable(package="keras_convmixer")
class RandAugment(keras.layers.Layer):
    """torchvision's or timm's RandAugment, ops chosen per image, on [0, 255] channels-last images.

    Args:
        policy: ``"torchvision"`` (``transforms.RandAugment``) or ``"timm"`` (``rand_augment_transform``).
        num_ops: ops applied in sequence per image, drawn uniformly with replacement.
        magnitude: torchvision: the bin index in ``[0, num_magnitude_bins)``; timm: 0-10 (``m9``).
            Default 9 for both (the libraries' defaults).
        num_magnitude_bins: torchvision only (31).
        magnitude_std: timm only: per-application magnitude noise (``mstd``); ``float("inf")`` draws the
            magnitude uniformly from [0, magnitude], as timm's ``mstd`` > 100.
        magnitude_max: timm only: the upper clip of the noisy magnitude (``mmax``, default 10).
        prob: probability of applying each chosen op (timm default 0.5, torchvision 1.0).
        increasing: timm only: the ``inc1`` op set (default True).
        translate_pct: timm only: TranslateXRel/YRel at magnitude 10, as a fraction of the side (0.45).
        fill: per-channel value of pixels moved in from outside (torchvision 0, timm 128).
        interpolation: geometric ops' resampling, ``"nearest"`` (torchvision default) or ``"bilinear"``
            (timm's ``create_transform`` default).
        ops: a subset of the policy's op names to draw from (default: all of them).
        seed: seed of the device path's random draws.

    ``layer(images, training=True)`` augments a (B, H, W, C) batch in the train step;
    ``layer.host_map(image)`` augments one (H, W, C) image with TensorFlow ops inside ``tf.data`` (any
    Keras backend), ``layer.host_batch_map(images)`` a batch there. All return float32 integers in
    [0, 255] (the input is rounded first, as PIL holds uint8). Identity at inference.
    """

    def __init__(self, policy="torchvision", num_ops=2, magnitude=9, num_magnitude_bins=31, magnitude_std=0.0,
                 magnitude_max=None, prob=None, increasing=True, translate_pct=0.45, fill=None, interpolation=None,
                 ops=None, seed=None, **kwargs):
        super().__init__(**kwargs)
        if policy not in POLICIES:
            raise ValueError(f"RandAugment policy must be one of {POLICIES}, got {policy!r}.")
        self.policy = policy
        self.num_ops = _check_int("num_ops", num_ops, 0)
        self.num_magnitude_bins = _check_int("num_magnitude_bins", num_magnitude_bins, 1)
        if policy == "torchvision":
            self.magnitude = _check_int("magnitude", magnitude, 0)
            if self.magnitude >= self.num_magnitude_bins:
                raise ValueError(f"RandAugment magnitude must be < num_magnitude_bins={self.num_magnitude_bins} "
                                 f"for policy 'torchvision', got {magnitude!r}.")
            if magnitude_std:
                raise ValueError(f"RandAugment magnitude_std is a timm option; policy 'torchvision' has none, "
                                 f"got {magnitude_std!r}.")
        else:
            self.magnitude = float(magnitude)
            if not 0.0 <= self.magnitude:
                raise ValueError(f"RandAugment magnitude must be >= 0, got {magnitude!r}.")
        self.magnitude_std = float(magnitude_std)
        if not self.magnitude_std >= 0.0:
            raise ValueError(f"RandAugment magnitude_std must be >= 0, got {magnitude_std!r}.")
        self.magnitude_max = float(magnitude_max) if magnitude_max is not None else None
        if self.magnitude_max is not None and not self.magnitude_max > 0.0:
            raise ValueError(f"RandAugment magnitude_max must be > 0, got {magnitude_max!r}.")
        if prob is None:
            prob = 0.5 if policy == "timm" else 1.0
        self.prob = float(prob)
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"RandAugment prob must be in [0, 1], got {prob!r}.")
        self.increasing = bool(increasing)
        self.translate_pct = float(translate_pct)
        if fill is None:
            fill = (0.0, 0.0, 0.0) if policy == "torchvision" else TIMM_FILL
        if isinstance(fill, (int, float)):
            fill = (float(fill),) * 3
        self.fill = tuple(float(f) for f in fill)
        if any(not 0.0 <= f <= 255.0 for f in self.fill):
            raise ValueError(f"RandAugment fill must be values in [0, 255], got {fill!r}.")
        if interpolation is None:
            interpolation = "nearest" if policy == "torchvision" else "bilinear"
        if interpolation not in ("nearest", "bilinear"):
            raise ValueError(f"RandAugment interpolation must be 'nearest' or 'bilinear', got {interpolation!r}.")
        self.interpolation = interpolation
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        if policy == "torchvision":
            available = TORCHVISION_OPS
        else:
            available = TIMM_INCREASING_OPS if self.increasing else TIMM_OPS
        if ops is None:
            ops = available
        if isinstance(ops, str) or not ops or any(name not in available for name in ops):
            raise ValueError(f"RandAugment ops must be a non-empty subset of {available} for policy {policy!r}, "
                             f"got {ops!r}.")
        self.op_names = tuple(ops)
        self.supports_jit = True

    # ---- configuration shared by both paths

    def _ctx(self, channels):
        if len(self.fill) != channels:
            raise ValueError(f"RandAugment fill has {len(self.fill)} values for images with {channels} channels.")
        return {"fill": self.fill, "interpolation": self.interpolation,
                "autocontrast_keys": _autocontrast_exceptions()}

    def _check_images(self, shape, batched):
        rank = 4 if batched else 3
        if len(shape) != rank or shape[-1] != 3 or shape[-2] is None or shape[-3] is None:
            what = "(batch, height, width, 3)" if batched else "(height, width, 3)"
            raise ValueError(f"RandAugment images must be {what} with a known height and width, got shape "
                             f"{tuple(shape)}.")

    def op_arg(self, xp, name, magnitude, sign, height, width):
        """The argument of op ``name`` for magnitudes ``magnitude`` (timm) and signs ``sign`` (B,)."""
        if self.policy == "torchvision":
            table, signed = torchvision_magnitudes(self.num_magnitude_bins, height, width)[name]
            value = float(table[self.magnitude])
            return torchvision_arg(name, xp, value + 0.0 * sign, sign if signed else 1.0 + 0.0 * sign)
        hparams = {"translate_pct": self.translate_pct, "height": height, "width": width}
        return timm_arg(name, xp, magnitude, sign, hparams)

    def sample(self, xp, u_choice, u_sign, u_apply, normal, u_magnitude):
        """One layer's per-image draws from raw uniforms and a standard normal (each (B,)), for both paths:
        op index (int32), sign (+-1), applied (bool) and magnitude (timm's noise, clipped)."""
        count = len(self.op_names)
        choice = xp.cast(xp.minimum(xp.floor(u_choice * count), count - 1.0), xp.int32)
        sign = xp.where(u_sign < 0.5, -1.0, 1.0)
        applied = u_apply < self.prob
        if self.policy == "torchvision" or self.magnitude_std == 0.0:
            magnitude = self.magnitude + 0.0 * normal
        elif math.isinf(self.magnitude_std) or self.magnitude_std > 100.0:
            magnitude = u_magnitude * self.magnitude
        else:
            magnitude = self.magnitude + self.magnitude_std * normal
        magnitude = xp.clip(magnitude, 0.0, self.magnitude_max or _LEVEL_DENOM)
        return choice, sign, applied, magnitude

    def apply_op(self, xp, images, name, magnitude, sign):
        """Apply op ``name`` to every image of (B, H, W, C) ``images`` (integers in [0, 255])."""
        arg = self.op_arg(xp, name, magnitude, sign, images.shape[1], images.shape[2])
        return PIXEL_OPS[name](xp, images, xp.cast(arg, xp.float32), self._ctx(images.shape[-1]))

    # ---- device path

    def call(self, images, training=True):
        images = ops.cast(images, "float32")
        if not training or self.num_ops == 0:
            return images
        self._check_images(images.shape, batched=True)
        xp = keras_namespace()
        n = ops.shape(images)[0]
        height, width = images.shape[1], images.shape[2]
        images = ops.clip(ops.round(images), 0.0, 255.0)
        names = self.op_names
        geometric = [i for i, name in enumerate(names) if name in GEOMETRIC_OPS]
        identity = ops.convert_to_tensor(np.array([1, 0, 0, 0, 1, 0], dtype="float32"))
        ctx = self._ctx(images.shape[-1])
        # One random call for all layers (on JAX each call compiles its own generator, seconds on a CPU)
        # and one traced loop body for the num_ops layers.
        uniforms = keras.random.uniform((self.num_ops, 5, n), seed=self.seed_generator)

        def one_op(i, images):
            u = ops.take(uniforms, i, axis=0)
            normal = box_muller(u[3], u[4])
            choice, sign, apply, magnitude = self.sample(xp, u[0], u[1], u[2], normal, u[3])
            # All geometric ops share one warp: each image's matrix is its op's (identity otherwise).
            matrix = ops.zeros((n, 6)) + identity
            for k in geometric:
                arg = ops.cast(self.op_arg(xp, names[k], magnitude, sign, height, width), "float32")
                chosen = ops.expand_dims(ops.equal(choice, k), -1)
                matrix = ops.where(chosen, MATRICES[names[k]](xp, arg, height, width), matrix)
            out = warp(xp, images, matrix, ctx["fill"], ctx["interpolation"]) if geometric else images
            for k, name in enumerate(names):
                if name in GEOMETRIC_OPS or name == "Identity":
                    continue
                chosen = ops.reshape(ops.equal(choice, k), (-1, 1, 1, 1))
                out = ops.where(chosen, self.apply_op(xp, images, name, magnitude, sign), out)
            return ops.where(ops.reshape(apply, (-1, 1, 1, 1)), out, images)

        if self.num_ops == 1:
            return one_op(0, images)
        return ops.fori_loop(0, self.num_ops, one_op, images)

    # ---- host path

    def host_map(self, image):
        """Augment one (H, W, C) image with TensorFlow ops; use in ``tf.data`` ``map`` under any backend.

        Only the chosen op runs (``tf.switch_case``). Draws come from ``tf.random`` (seeded by TensorFlow's
        global seed, e.g. ``keras.utils.set_random_seed``).
        """
        tf = _tf()
        xp = tf_namespace()
        image = tf.convert_to_tensor(image)
        self._check_images(image.shape, batched=False)
        images = tf.clip_by_value(tf.round(tf.cast(image, tf.float32)), 0.0, 255.0)[None]
        if self.num_ops == 0:
            return images[0]
        names = self.op_names
        for _ in range(self.num_ops):
            draws = [tf.random.uniform([1]) for _ in range(3)]
            normal, u_magnitude = tf.random.normal([1]), tf.random.uniform([1])
            choice, sign, apply, magnitude = self.sample(xp, *draws, normal, u_magnitude)
            branches = [functools.partial(self.apply_op, xp, images, name, magnitude, sign) for name in names]
            # Not applied: an extra identity branch, so only one op ever runs.
            index = tf.where(apply[0], choice[0], len(names))
            branches.append(lambda images=images: images)
            images = tf.switch_case(index, branches)
            images = tf.ensure_shape(images, [1, *image.shape])
        return images[0]

    def host_batch_map(self, images):
        """Augment a (B, H, W, C) batch with TensorFlow ops, each image its own ops, after ``batch()`` in
        ``tf.data`` (any backend). Images are grouped by their chosen op (``tf.dynamic_partition``) and
        each group is transformed at once: the same work as ``host_map`` in far fewer kernel calls.
        """
        tf = _tf()
        xp = tf_namespace()
        images = tf.convert_to_tensor(images)
        self._check_images(images.shape, batched=True)
        images = tf.clip_by_value(tf.round(tf.cast(images, tf.float32)), 0.0, 255.0)
        shape = images.shape
        names = self.op_names
        n = tf.shape(images)[0]
        positions = tf.range(n)
        for _ in range(self.num_ops):
            u = tf.random.uniform([4, n])
            choice, sign, apply, magnitude = self.sample(xp, u[0], u[1], u[2], tf.random.normal([n]), u[3])
            groups = tf.dynamic_partition(positions, tf.where(apply, choice, len(names)), len(names) + 1)
            outs = []
            for k, name in enumerate(names):
                outs.append(self.apply_op(xp, tf.gather(images, groups[k]), name, tf.gather(magnitude, groups[k]),
                                          tf.gather(sign, groups[k])))
            outs.append(tf.gather(images, groups[-1]))
            images = tf.ensure_shape(tf.dynamic_stitch(groups, outs), shape)
        return images

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(policy=self.policy, num_ops=self.num_ops, magnitude=self.magnitude,
                      num_magnitude_bins=self.num_magnitude_bins, magnitude_std=self.magnitude_std,
                      magnitude_max=self.magnitude_max, prob=self.prob, increasing=self.increasing,
                      translate_pct=self.translate_pct, fill=self.fill, interpolation=self.interpolation,
                      ops=self.op_names, seed=self.seed)
        return config


def from_timm_string(config, mean=None, interpolation="bilinear", seed=None, **kwargs):
    """A timm-policy ``RandAugment`` from a timm config string such as ``"rand-m9-mstd0.5-inc1"``.

    Sections as timm's ``rand_augment_transform``: ``m`` magnitude, ``n`` ops, ``p`` probability,
    ``mstd`` magnitude noise (> 100: uniform), ``mmax`` magnitude clip, ``inc`` increasing op set.
    ``mean`` (0-1 per channel): fill with ``round(255 * mean)`` as timm's ``create_transform`` does.
    """
    if not isinstance(config, str) or not config.startswith("rand"):
        raise ValueError(f"RandAugment config must be a timm string like 'rand-m9-mstd0.5-inc1', got {config!r}.")
    options = {"magnitude": 10.0, "num_ops": 2, "prob": 0.5, "magnitude_std": 0.0, "magnitude_max": None,
               "increasing": False}
    for part in config.split("-")[1:]:
        key, value = re.split(r"(\d.*)", part)[:2] if re.search(r"\d", part) else (part, "")
        try:
            if key == "m":
                options["magnitude"] = float(int(value))
            elif key == "n":
                options["num_ops"] = int(value)
            elif key == "p":
                options["prob"] = float(value)
            elif key == "mstd":
                options["magnitude_std"] = float(value)
            elif key == "mmax":
                options["magnitude_max"] = float(int(value))
            elif key == "inc":
                options["increasing"] = bool(int(value))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"RandAugment config {config!r}: unknown or malformed section {part!r}.") from None
    fill = None
    if mean is not None:
        fill = tuple(float(min(255, round(255 * float(x)))) for x in mean)
    options.update(kwargs)
    return RandAugment(policy="timm", fill=fill, interpolation=interpolation, seed=seed, **options)
