"""The Inception crop (timm's ``RandomResizedCrop``), on the host and on the device.

One sampling rule, ``sample_crop_boxes``, and one resampling contract for both paths: the box is cut out
at whole pixels and resized to ``size x size`` with ``tf.image.resize(crop, antialias=True)``'s filter
(half-pixel centres, the kernel stretched when shrinking), then clipped to [0, 255]. The kernel is
bilinear or bicubic (Keys, a = -0.5); ``"random"`` picks one per image with probability 1/2, as timm's
``interpolation=random``. The host runs ``tf.image.resize`` itself (``tf_random_resized_crop``, one
image in a tf.data map); the device reproduces it batched in ``keras.ops`` (``resize_crops``,
``RandomResizedCrop``). Keras has no Inception crop. TensorFlow is imported lazily.
"""

import math

import keras
from keras import ops

from keras_convmixer.augment.xp import first_fit, keras_namespace, random_corner, tf_namespace
from keras_convmixer.data.transforms import TRAIN_INTERPOLATIONS
from keras_convmixer.tf_import import import_tf

# The probability that an image is resampled bicubically; compared with a uniform in [0, 1).
_BICUBIC_PROB = {"bilinear": 0.0, "random": 0.5, "bicubic": 1.0}


def _check_interpolation(interpolation):
    if interpolation not in TRAIN_INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {TRAIN_INTERPOLATIONS}, got {interpolation!r}.")
    return interpolation


def sample_crop_boxes(u_try, u_offset, height, width, scale, ratio, xp):
    """timm's ``RandomResizedCrop.get_params`` for a batch, vectorised over attempts.

    ``u_try``: uniforms (N, attempts, 2) for area and log-aspect; ``u_offset``: (N, 2) for the
    top-left corner. Returns float ``(top, left, crop_h, crop_w)``, each (N,). When no attempt
    fits, falls back to the largest centred crop with the ratio clamped into ``ratio``.
    ``xp`` is ``augment.xp.keras_namespace()`` or ``tf_namespace()``.
    """
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target_area = height * width * (scale[0] + (scale[1] - scale[0]) * u_try[..., 0])
    aspect = xp.exp(log_lo + (log_hi - log_lo) * u_try[..., 1])
    w = xp.round(xp.sqrt(target_area * aspect))
    h = xp.round(xp.sqrt(target_area / aspect))
    fits = xp.logical_and(xp.logical_and(w <= width, h <= height), xp.logical_and(w >= 1.0, h >= 1.0))
    h_try, w_try, found = first_fit(xp, h, w, fits)

    in_ratio = width / height
    w_fallback = xp.where(in_ratio > ratio[1], xp.round(height * ratio[1]), width)
    h_fallback = xp.where(in_ratio < ratio[0], xp.round(width / ratio[0]), height)
    crop_w = xp.where(found, w_try, w_fallback)
    crop_h = xp.where(found, h_try, h_fallback)
    top = xp.where(found, random_corner(xp, u_offset[:, 0], height, crop_h), xp.floor((height - crop_h) / 2.0))
    left = xp.where(found, random_corner(xp, u_offset[:, 1], width, crop_w), xp.floor((width - crop_w) / 2.0))
    return top, left, crop_h, crop_w


def tf_random_resized_crop(image, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bilinear", attempts=10):
    """Inception crop of one HWC image (any size, any dtype) to ``size x size`` float32, with tf ops."""
    _check_interpolation(interpolation)
    tf = import_tf()
    shape = tf.shape(image)
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    u_try = tf.random.uniform([1, attempts, 2])
    u_offset = tf.random.uniform([1, 2])
    top, left, crop_h, crop_w = sample_crop_boxes(u_try, u_offset, height, width, scale, ratio, tf_namespace())
    box = [tf.cast(v[0], tf.int32) for v in (top, left, crop_h, crop_w)]
    crop = image[box[0] : box[0] + box[2], box[1] : box[1] + box[3]]

    def resize(method):
        return lambda: tf.image.resize(crop, [size, size], method=method, antialias=True)

    p = _BICUBIC_PROB[interpolation]
    if 0.0 < p < 1.0:
        out = tf.cond(tf.random.uniform([]) < p, resize("bicubic"), resize("bilinear"))
    else:
        out = resize("bicubic" if p else "bilinear")()
    return tf.clip_by_value(out, 0.0, 255.0)


def _triangle(t):
    t = ops.abs(t)
    return ops.maximum(1.0 - t, 0.0)


def _keys_cubic(t, a=-0.5):
    # The cubic of tf.image.resize's bicubic (and PIL's): Keys' kernel with a = -0.5.
    t = ops.abs(t)
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    far = ((a * t - 5.0 * a) * t + 8.0 * a) * t - 4.0 * a
    return ops.where(t <= 1.0, near, ops.where(t < 2.0, far, 0.0))


def _axis_weights(start, length, in_size, out_size, bicubic):
    """``(N, out_size, in_size)`` resampling weights of a crop ``[start, start + length)`` per image.

    The same separable filter as ``tf.image.resize(crop, antialias=True)`` (TF's ScaleAndTranslate):
    half-pixel centres, the kernel stretched by the shrink factor (antialiasing), taps restricted
    to the crop and each row normalised. ``bicubic`` (N,) bool picks the kernel per image.
    """
    scale = length / out_size
    centre = start[:, None] + (ops.arange(out_size, dtype="float32")[None, :] + 0.5) * scale[:, None] - 0.5
    source = ops.arange(in_size, dtype="float32")[None, None, :]
    t = (source - centre[:, :, None]) / ops.maximum(scale, 1.0)[:, None, None]
    weights = ops.where(bicubic[:, None, None], _keys_cubic(t), _triangle(t))
    inside = (source >= start[:, None, None]) & (source < (start + length)[:, None, None])
    weights = ops.where(inside, weights, 0.0)
    return weights / ops.maximum(ops.sum(weights, axis=-1, keepdims=True), 1e-12)


def resize_crops(images, top, left, crop_h, crop_w, size, bicubic):
    """Crop box ``i`` out of image ``i`` and resize it to ``size x size``, as the host path's
    ``tf.image.resize(..., antialias=True)`` does, for a whole batch in ``keras.ops``.

    A crop-and-resize along an axis is a matrix product, so each image needs two small matrices
    instead of a per-image resize call: it runs inside a jitted train step on every backend.
    """
    top, left, crop_h, crop_w = (ops.convert_to_tensor(v, "float32") for v in (top, left, crop_h, crop_w))
    bicubic = ops.convert_to_tensor(bicubic, "bool")
    height, width = images.shape[1], images.shape[2]
    rows = _axis_weights(top, crop_h, height, size, bicubic)
    cols = _axis_weights(left, crop_w, width, size, bicubic)
    out = ops.einsum("noh,nhwc->nowc", rows, images)
    out = ops.einsum("npw,nowc->nopc", cols, out)
    return ops.clip(out, 0.0, 255.0)


@keras.saving.register_keras_serializable(package="keras_convmixer")
class RandomResizedCrop(keras.layers.Layer):
    """Inception crop of a batch of equally sized images, per image, with ``keras.ops``.

    Each image gets its own box and kernel (the host path's sampling and filter, see the module).
    Runs inside a jitted train step on every backend. At inference: a plain resize.
    """

    def __init__(
        self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts=10, interpolation="bilinear", seed=None, **kwargs
    ):
        super().__init__(**kwargs)
        self.size = int(size)
        self.scale = tuple(float(s) for s in scale)
        self.ratio = tuple(float(r) for r in ratio)
        self.attempts = int(attempts)
        self.interpolation = _check_interpolation(interpolation)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        images = ops.cast(images, self.compute_dtype)
        if training:
            n = ops.shape(images)[0]
            height, width = float(images.shape[1]), float(images.shape[2])
            u_try = keras.random.uniform((n, self.attempts, 2), seed=self.seed_generator)
            u_offset = keras.random.uniform((n, 2), seed=self.seed_generator)
            u_interp = keras.random.uniform((n,), seed=self.seed_generator)  # drawn always: a fixed seed stream
            top, left, crop_h, crop_w = sample_crop_boxes(
                u_try, u_offset, height, width, self.scale, self.ratio, keras_namespace()
            )
            bicubic = u_interp < _BICUBIC_PROB[self.interpolation]
            return resize_crops(images, top, left, crop_h, crop_w, self.size, bicubic)
        if images.shape[1] != self.size or images.shape[2] != self.size:
            images = ops.image.resize(images, (self.size, self.size), antialias=True)
        return images

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.size, self.size, input_shape[3])

    def get_config(self):
        config = super().get_config()
        config.update(
            size=self.size,
            scale=self.scale,
            ratio=self.ratio,
            attempts=self.attempts,
            interpolation=self.interpolation,
            seed=self.seed,
        )
        return config
