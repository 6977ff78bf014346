"""timm's ``RandomErasing`` for images in [0, 255] that the model normalises itself.

timm erases after normalisation: a box of per-pixel N(0, 1) noise (``mode="pixel"``), one N(0, 1)
colour per box (``"rand"``) or zeros (``"const"``). Our images reach the model un-normalised and
the model computes ``(x - 255 mean) / (255 std)``, so the fill here is ``255 mean + 255 std * z``:
after the model's normalisation the box holds exactly timm's values. Those pixels are not clipped to
[0, 255] (that would change the noise).

Box sampling is timm's: with probability ``probability`` per image, ``count`` boxes (uniform in
[min_count, max_count]), each tried up to 10 times with area ``U(min_area, max_area) * H * W / count``
and log-uniform aspect ratio; ``h = round(sqrt(area * aspect))``, ``w = round(sqrt(area / aspect))``;
a try fits when ``h < H`` and ``w < W``; the box's corner is uniform over the positions that fit. A box
with no fitting try is skipped.

``sample_boxes`` and ``erase`` are written once against a NumPy-like namespace (``keras.ops`` on the
device, TensorFlow on the host, see ``xp``). ``layer(images, training=True)`` runs batched in
the train step; ``layer.host_map(image)`` per image and ``layer.host_batch_map(images)`` per batch in
``tf.data`` under any backend. TensorFlow is imported lazily.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_convmixer.augment.xp import box_muller, first_fit, keras_namespace, random_corner, tf_namespace
from keras_convmixer.tf_import import import_tf

MODES = ("pixel", "rand", "const")
ATTEMPTS = 10


def sample_boxes(xp, u_try, u_offset, height, width, min_area, max_area, log_aspect, count):
    """timm's box sampling for one box of each image, vectorised over attempts.

    ``u_try``: uniforms (B, attempts, 2) for area and log-aspect; ``u_offset``: (B, 2) for the corner;
    ``count``: float (B,) boxes of that image (the area is shared between them). Returns float
    ``(top, left, h, w, found)``, each (B,).
    """
    area = height * width * (min_area + (max_area - min_area) * u_try[..., 0]) / xp.expand_dims(count, -1)
    aspect = xp.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u_try[..., 1])
    # timm's erasing takes the aspect along the height (its crop along the width) and needs a strictly
    # smaller box.
    h = xp.round(xp.sqrt(area * aspect))
    w = xp.round(xp.sqrt(area / aspect))
    h, w, found = first_fit(xp, h, w, xp.logical_and(w < width, h < height))
    top = random_corner(xp, u_offset[:, 0], height, h)
    left = random_corner(xp, u_offset[:, 1], width, w)
    return top, left, h, w, found


def box_mask(xp, top, left, h, w, height, width):
    """(B, H, W, 1) bool: inside each image's box."""
    rows = xp.reshape(xp.cast(xp.arange(height, dtype=xp.int32), xp.float32), (1, -1, 1, 1))
    cols = xp.reshape(xp.cast(xp.arange(width, dtype=xp.int32), xp.float32), (1, 1, -1, 1))

    def per_image(v):
        return xp.reshape(v, (-1, 1, 1, 1))

    in_rows = xp.logical_and(rows >= per_image(top), rows < per_image(top + h))
    in_cols = xp.logical_and(cols >= per_image(left), cols < per_image(left + w))
    return xp.logical_and(in_rows, in_cols)


def erase(xp, images, boxes, fills):
    """Paste ``fills[i]`` (broadcastable to images) into box ``boxes[i] = (top, left, h, w, use)``, in order."""
    height, width = images.shape[1], images.shape[2]
    for (top, left, h, w, use), fill in zip(boxes, fills, strict=True):
        inside = xp.logical_and(box_mask(xp, top, left, h, w, height, width), xp.reshape(use, (-1, 1, 1, 1)))
        images = xp.where(inside, fill, images)
    return images


@keras.saving.register_keras_serializable(package="keras_convmixer")
class RandomErasing(keras.layers.Layer):
    """timm's ``RandomErasing(probability, mode, min_area, max_area, min_aspect, max_aspect, min_count,
    max_count)`` on [0, 255] channels-last images, filled in the model's normalised space.

    ``mean``/``std``: the model's normalisation (0-1 scale, per channel). Identity at inference.
    ``layer(images, training=True)`` erases a (B, H, W, C) batch (per image); ``layer.host_map(image)``
    erases one (H, W, C) image with TensorFlow ops in ``tf.data``.
    """

    def __init__(
        self,
        probability=0.25,
        mode="pixel",
        min_area=0.02,
        max_area=1 / 3,
        min_aspect=0.3,
        max_aspect=None,
        min_count=1,
        max_count=None,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.probability = float(probability)
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"RandomErasing probability must be in [0, 1], got {probability!r}.")
        mode = (mode or "const").lower()
        if mode not in MODES:
            raise ValueError(f"RandomErasing mode must be one of {MODES}, got {mode!r}.")
        self.mode = mode
        self.min_area, self.max_area = float(min_area), float(max_area)
        if not 0.0 < self.min_area <= self.max_area <= 1.0:
            raise ValueError(
                f"RandomErasing needs 0 < min_area <= max_area <= 1, got min_area={min_area!r}, max_area={max_area!r}."
            )
        self.min_aspect = float(min_aspect)
        if not self.min_aspect > 0.0:
            raise ValueError(f"RandomErasing min_aspect must be > 0, got {min_aspect!r}.")
        self.max_aspect = float(max_aspect) if max_aspect else 1.0 / self.min_aspect
        if not self.max_aspect > 0.0:
            raise ValueError(f"RandomErasing max_aspect must be > 0, got {max_aspect!r}.")
        self.min_count = int(min_count)
        self.max_count = int(max_count or min_count)
        if not 1 <= self.min_count <= self.max_count:
            raise ValueError(
                f"RandomErasing needs 1 <= min_count <= max_count, got min_count={min_count!r}, "
                f"max_count={max_count!r}."
            )
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError(
                f"RandomErasing mean and std need one value per channel and std > 0, got mean={mean!r}, std={std!r}."
            )
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.log_aspect = (math.log(self.min_aspect), math.log(self.max_aspect))

    def _check(self, shape, batched):
        rank = 4 if batched else 3
        if len(shape) != rank or shape[-1] != len(self.mean) or None in tuple(shape[-3:-1]):
            what = "(batch, height, width, channels)" if batched else "(height, width, channels)"
            raise ValueError(
                f"RandomErasing images must be {what} with {len(self.mean)} channels (one per mean "
                f"value) and a known height and width, got shape {tuple(shape)}."
            )

    def apply(self, xp, images, u_apply, u_count, u_tries, u_offsets, normals):
        """The erasing of (B, H, W, C) ``images`` given its random draws (shared by both paths).

        ``u_apply``, ``u_count``: (B,); ``u_tries[i]``: (B, attempts, 2) and ``u_offsets[i]``: (B, 2) for box
        i; ``normals[i]``: N(0, 1) for box i's fill, (B, H, W, C) ("pixel") or (B, 1, 1, C) ("rand").
        """
        height, width = images.shape[1], images.shape[2]
        span = self.max_count - self.min_count + 1
        count = self.min_count + xp.minimum(xp.floor(u_count * span), span - 1.0)
        applied = u_apply < self.probability
        mean = xp.convert(np.asarray(self.mean, "float32") * 255.0)
        std = xp.convert(np.asarray(self.std, "float32") * 255.0)
        boxes, fills = [], []
        for i in range(self.max_count):
            top, left, h, w, found = sample_boxes(
                xp,
                u_tries[i],
                u_offsets[i],
                float(height),
                float(width),
                self.min_area,
                self.max_area,
                self.log_aspect,
                count,
            )
            use = xp.logical_and(xp.logical_and(applied, found), float(i) < count)
            boxes.append((top, left, h, w, use))
            fills.append(mean if self.mode == "const" else mean + std * normals[i])
        return erase(xp, images, boxes, fills)

    def _noise_shape(self, n, height, width, channels):
        return (n, height, width, channels) if self.mode == "pixel" else (n, 1, 1, channels)

    def call(self, images, training=True):
        images = ops.cast(images, "float32")
        if not training or self.probability == 0.0:
            return images
        self._check(images.shape, batched=True)
        n = ops.shape(images)[0]
        height, width, channels = images.shape[1], images.shape[2], images.shape[3]
        # One random call (on JAX each call compiles its own generator, seconds on a CPU); the normals
        # come from it by Box-Muller.
        per_box = 2 * ATTEMPTS + 2
        shape = self._noise_shape(n, height, width, channels)
        noise = int(np.prod(shape[1:]))
        u = keras.random.uniform((n, 2 + self.max_count * (per_box + 2 * noise)), seed=self.seed_generator)
        u_tries, u_offsets, normals = [], [], []
        for i in range(self.max_count):
            start = 2 + i * per_box
            u_tries.append(ops.reshape(u[:, start : start + 2 * ATTEMPTS], (-1, ATTEMPTS, 2)))
            u_offsets.append(u[:, start + 2 * ATTEMPTS : start + per_box])
            start = 2 + self.max_count * per_box + 2 * i * noise
            normal = box_muller(u[:, start : start + noise], u[:, start + noise : start + 2 * noise])
            normals.append(ops.reshape(normal, shape))
        return self.apply(keras_namespace(), images, u[:, 0], u[:, 1], u_tries, u_offsets, normals)

    def host_map(self, image):
        """Erase one (H, W, C) image with TensorFlow ops (``tf.data`` map, any Keras backend).

        The noise is drawn only for an image that is erased.
        """
        tf = import_tf()
        image = tf.cast(tf.convert_to_tensor(image), tf.float32)
        self._check(image.shape, batched=False)
        if self.probability == 0.0:
            return image
        height, width, channels = image.shape
        xp = tf_namespace()
        u_apply = tf.random.uniform([1])

        def erased():
            u_count = tf.random.uniform([1])
            u_tries = [tf.random.uniform([1, ATTEMPTS, 2]) for _ in range(self.max_count)]
            u_offsets = [tf.random.uniform([1, 2]) for _ in range(self.max_count)]
            shape = self._noise_shape(1, height, width, channels)
            normals = [tf.random.normal(shape) for _ in range(self.max_count)]
            return self.apply(xp, image[None], u_apply, u_count, u_tries, u_offsets, normals)[0]

        return tf.cond(u_apply[0] < self.probability, erased, lambda: image)

    def host_batch_map(self, images):
        """Erase a (B, H, W, C) batch with TensorFlow ops, per image, after ``batch()`` in ``tf.data``."""
        tf = import_tf()
        images = tf.cast(tf.convert_to_tensor(images), tf.float32)
        self._check(images.shape, batched=True)
        if self.probability == 0.0:
            return images
        n = tf.shape(images)[0]
        height, width, channels = images.shape[1:]
        u_tries = [tf.random.uniform([n, ATTEMPTS, 2]) for _ in range(self.max_count)]
        u_offsets = [tf.random.uniform([n, 2]) for _ in range(self.max_count)]
        normals = [tf.random.normal(self._noise_shape(n, height, width, channels)) for _ in range(self.max_count)]
        return self.apply(
            tf_namespace(), images, tf.random.uniform([n]), tf.random.uniform([n]), u_tries, u_offsets, normals
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            probability=self.probability,
            mode=self.mode,
            min_area=self.min_area,
            max_area=self.max_area,
            min_aspect=self.min_aspect,
            max_aspect=self.max_aspect,
            min_count=self.min_count,
            max_count=self.max_count,
            mean=self.mean,
            std=self.std,
            seed=self.seed,
        )
        return config
