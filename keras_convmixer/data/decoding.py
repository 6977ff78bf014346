"""The per-file decode of a files stream: the whole image, or only the training crop's window.

With a ``HostCrop``, the Inception crop's window is drawn from the image's size before its pixels are
decoded, and a JPEG is decoded only inside that window (``tf.io.decode_and_crop_jpeg``); other formats
are decoded whole and sliced. The window is ``augment.crop.sample_crop_boxes``' (timm's
``RandomResizedCrop.get_params``) and the resize ``tf_random_resized_crop``'s (``tf.image.resize``,
antialiased, bilinear or bicubic; ``"random"`` picks one per image with probability 1/2); the result is
rounded to a uint8 square, as timm's PIL crop is. Its random numbers are stateless, keyed by the seed
and the file's position in the stream, so the same seed gives the same windows.

TensorFlow is imported lazily (``tf_import``), Keras only when a crop is built (the sampling rule lives
with the augmentations).
"""

from __future__ import annotations

import dataclasses

from keras_convmixer.data.transforms import TRAIN_INTERPOLATIONS
from keras_convmixer.tf_import import import_tf

# libjpeg-turbo's cropped decode upsamples the chroma of a window's first and last column as if they were
# the image's edge (measured: up to 58 grey levels off with 4:2:0). Decoding this many columns more on
# each side and slicing them off gives exactly the pixels of a full decode (4:4:4, 4:2:2, 4:2:0,
# progressive and grey, checked by the tests).
JPEG_MARGIN = 16
_BICUBIC_PROB = {"bilinear": 0.0, "random": 0.5, "bicubic": 1.0}


@dataclasses.dataclass(frozen=True)
class HostCrop:
    """The training crop done while decoding: timm's ``RandomResizedCrop(image_size, scale, ratio)``."""

    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    interpolation: str = "bilinear"
    attempts: int = 10

    def __post_init__(self):
        scale, ratio = tuple(float(s) for s in self.scale), tuple(float(r) for r in self.ratio)
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1]:
            raise ValueError(f"crop scale must be two numbers 0 < lo <= hi, got {self.scale!r}")
        if len(ratio) != 2 or not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"crop ratio must be two numbers 0 < lo <= hi, got {self.ratio!r}")
        if self.interpolation not in TRAIN_INTERPOLATIONS:
            raise ValueError(
                f"crop interpolation must be one of {', '.join(TRAIN_INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"crop attempts must be a positive whole number, got {self.attempts!r}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", ratio)


def draws(crop: HostCrop, seed, position):
    """The crop's uniforms for the element at ``position``: ``attempts`` x 2, then the corner's 2, then the kernel's."""
    tf = import_tf()
    key = tf.stack([tf.constant(int(seed or 0), tf.int64), tf.cast(position, tf.int64)])
    return tf.random.stateless_uniform([2 * crop.attempts + 3], seed=key)


def crop_window(height, width, uniforms, crop: HostCrop):
    """int32 ``(top, left, crop_h, crop_w)`` of an image of ``height x width`` from ``draws``' uniforms."""
    from keras_convmixer.augment.crop import sample_crop_boxes
    from keras_convmixer.augment.xp import tf_namespace

    tf = import_tf()
    n = crop.attempts
    u_try = tf.reshape(uniforms[: 2 * n], [1, n, 2])
    u_offset = tf.reshape(uniforms[2 * n : 2 * n + 2], [1, 2])
    height, width = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    box = sample_crop_boxes(u_try, u_offset, height, width, crop.scale, crop.ratio, tf_namespace())
    return tuple(tf.cast(v[0], tf.int32) for v in box)


def resize_window(window, size: int, uniforms, crop: HostCrop):
    """The cut-out window resized to ``size x size``, rounded to uint8 (the crop's kernel from its last uniform)."""
    tf = import_tf()

    def resize(method):
        return lambda: tf.image.resize(window, [size, size], method=method, antialias=True)

    p = _BICUBIC_PROB[crop.interpolation]
    if 0.0 < p < 1.0:
        out = tf.cond(uniforms[-1] < p, resize("bicubic"), resize("bilinear"))
    else:
        out = resize("bicubic" if p else "bilinear")()
    return tf.cast(tf.round(tf.clip_by_value(out, 0.0, 255.0)), tf.uint8)


def crop_decoded(image, size: int, uniforms, crop: HostCrop):
    """The crop of an already decoded HWC image (a cached or TFDS one): uint8 ``size x size x 3``."""
    tf = import_tf()
    shape = tf.shape(image)
    top, left, h, w = crop_window(shape[0], shape[1], uniforms, crop)
    out = resize_window(image[top : top + h, left : left + w], size, uniforms, crop)
    return tf.ensure_shape(out, [size, size, 3])


def decode_crop(contents, size: int, uniforms, crop: HostCrop):
    """Decode only the crop's window of an encoded image and resize it: uint8 ``size x size x 3``.

    A JPEG that does not end with its end-of-image marker (a file cut short, whose top a cropped
    decode would still read) is decoded whole, so that it fails as it does without the crop.
    """
    tf = import_tf()
    whole_jpeg = tf.logical_and(tf.io.is_jpeg(contents), tf.equal(tf.strings.substr(contents, -2, 2), b"\xff\xd9"))

    def jpeg():
        shape = tf.io.extract_jpeg_shape(contents, output_type=tf.int32)
        top, left, h, w = crop_window(shape[0], shape[1], uniforms, crop)
        start = tf.maximum(left - JPEG_MARGIN, 0)
        stop = tf.minimum(left + w + JPEG_MARGIN, shape[1])
        wide = tf.io.decode_and_crop_jpeg(contents, tf.stack([top, start, h, stop - start]), channels=3)
        return wide[:, left - start : left - start + w]

    def other():
        image = tf.io.decode_image(contents, channels=3, expand_animations=False, dtype=tf.uint8)
        shape = tf.shape(image)
        top, left, h, w = crop_window(shape[0], shape[1], uniforms, crop)
        return image[top : top + h, left : left + w]

    window = tf.ensure_shape(tf.cond(whole_jpeg, jpeg, other), [None, None, 3])
    return tf.ensure_shape(resize_window(window, size, uniforms, crop), [size, size, 3])


def decoder(max_pixels, crop: HostCrop | None = None, size: int | None = None, seed=0):
    """The files stream's map: ``(path, tag) -> (uint8 HWC image, tag)``, or with ``crop``
    ``(position, (path, tag)) -> (uint8 size x size crop, tag)``. With ``max_pixels``, a larger image fails
    from its header, before any pixel is decoded."""
    tf = import_tf()

    def read(path):
        contents = tf.io.read_file(path)
        checks = []
        if max_pixels is not None:
            height, width = encoded_size(contents)
            checks = [tf.debugging.assert_less_equal(height * width, tf.constant(max_pixels, tf.int64))]
        with tf.control_dependencies(checks):
            return tf.identity(contents)

    def decode(path, tag):
        image = tf.io.decode_image(read(path), channels=3, expand_animations=False, dtype=tf.uint8)
        return tf.ensure_shape(image, [None, None, 3]), tag

    def decode_window(position, item):
        path, tag = item
        return decode_crop(read(path), size, draws(crop, seed, position), crop), tag

    return decode if crop is None else decode_window


def encoded_size(contents):
    """``(height, width)`` as int64 from the encoded bytes, as ``transforms.image_header`` reads them; 0 if unknown.

    For splits whose sizes the scan did not read (``verify="none"``, hand-made splits). Only the
    branch of the file's format runs.
    """
    tf = import_tf()
    head = tf.strings.substr(tf.strings.join([tf.strings.substr(contents, 0, 32), b"\0" * 32]), 0, 32)

    def number(start, n, big_endian=False):
        digits = tf.cast(tf.io.decode_raw(tf.strings.substr(head, start, n), tf.uint8), tf.int64)
        return tf.reduce_sum(
            digits * tf.constant([256 ** (n - 1 - k if big_endian else k) for k in range(n)], tf.int64)
        )

    def is_(prefix, start=0):
        return tf.equal(tf.strings.substr(head, start, len(prefix)), prefix)

    def signed32(v):
        return tf.abs(tf.where(v >= 2**31, v - 2**32, v))

    def jpeg():
        shape = tf.io.extract_jpeg_shape(contents, output_type=tf.int64)
        return shape[0], shape[1]

    def bmp():
        core = tf.equal(number(14, 4), 12)  # OS/2 header: 16-bit sizes
        height = tf.where(core, number(20, 2), signed32(number(22, 4)))
        return height, tf.where(core, number(18, 2), signed32(number(18, 4)))

    def vp8l():
        bits = number(21, 4)
        return (bits // 2**14) % 2**14 + 1, bits % 2**14 + 1

    branches = [  # (signature, size)
        (is_(b"\xff\xd8\xff"), jpeg),
        (is_(b"\x89PNG"), lambda: (number(20, 4, True), number(16, 4, True))),
        (is_(b"GIF8"), lambda: (number(8, 2), number(6, 2))),  # the logical screen, which TF decodes to
        (is_(b"BM"), bmp),
        (is_(b"WEBPVP8 ", 8), lambda: (number(28, 2) % 2**14, number(26, 2) % 2**14)),
        (is_(b"WEBPVP8L", 8), vp8l),
        (is_(b"WEBPVP8X", 8), lambda: (number(27, 3) + 1, number(24, 3) + 1)),
        (tf.constant(True), lambda: (tf.constant(0, tf.int64), tf.constant(0, tf.int64))),
    ]
    kind = tf.argmax(tf.cast(tf.stack([match for match, _ in branches]), tf.int32), output_type=tf.int32)
    return tf.switch_case(kind, [size for _, size in branches])


def check_crop(crop, training: bool) -> None:
    if crop is None:
        return
    if not isinstance(crop, HostCrop):
        raise ValueError(f"crop must be a data.HostCrop, got {type(crop).__name__}")
    if not training:
        raise ValueError("make_dataset(crop=...) is the training crop: evaluation streams take no crop")
