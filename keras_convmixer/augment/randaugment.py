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

The ops themselves are ``image_ops`` (PIL's arithmetic); the layer rounds its input to integers in
[0, 255] as PIL holds uint8. The per-image random draws go through one ``sample`` rule on every path:

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

import keras
import numpy as np
from keras import ops

from keras_convmixer.augment import policies
from keras_convmixer.augment.image_ops import (
    GEOMETRIC_OPS,
    MATRICES,
    PIXEL_OPS,
    autocontrast_exceptions,
    timm_arg,
    torchvision_arg,
    torchvision_magnitudes,
    warp,
)
from keras_convmixer.augment.policies import LEVEL_DENOM
from keras_convmixer.augment.xp import box_muller, keras_namespace, tf_namespace
from keras_convmixer.tf_import import import_tf


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

    def __init__(
        self,
        policy="torchvision",
        num_ops=2,
        magnitude=9,
        num_magnitude_bins=31,
        magnitude_std=0.0,
        magnitude_max=None,
        prob=None,
        increasing=True,
        translate_pct=0.45,
        fill=None,
        interpolation=None,
        ops=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        checked = policies.check_arguments(
            policy,
            num_ops=num_ops,
            magnitude=magnitude,
            num_magnitude_bins=num_magnitude_bins,
            magnitude_std=magnitude_std,
            magnitude_max=magnitude_max,
            prob=prob,
            increasing=increasing,
            translate_pct=translate_pct,
            fill=fill,
            interpolation=interpolation,
            ops=ops,
        )
        for name, value in checked.items():
            setattr(self, name, value)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_jit = True

    # ---- configuration shared by both paths

    def _ctx(self, channels):
        if len(self.fill) != channels:
            raise ValueError(f"RandAugment fill has {len(self.fill)} values for images with {channels} channels.")
        return {"fill": self.fill, "interpolation": self.interpolation, "autocontrast_keys": autocontrast_exceptions()}

    def _check_images(self, shape, batched):
        rank = 4 if batched else 3
        if len(shape) != rank or shape[-1] != 3 or shape[-2] is None or shape[-3] is None:
            what = "(batch, height, width, 3)" if batched else "(height, width, 3)"
            raise ValueError(
                f"RandAugment images must be {what} with a known height and width, got shape {tuple(shape)}."
            )

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
        magnitude = xp.clip(magnitude, 0.0, self.magnitude_max or LEVEL_DENOM)
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
        tf = import_tf()
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
        tf = import_tf()
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
                outs.append(
                    self.apply_op(
                        xp,
                        tf.gather(images, groups[k]),
                        name,
                        tf.gather(magnitude, groups[k]),
                        tf.gather(sign, groups[k]),
                    )
                )
            outs.append(tf.gather(images, groups[-1]))
            images = tf.ensure_shape(tf.dynamic_stitch(groups, outs), shape)
        return images

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            policy=self.policy,
            num_ops=self.num_ops,
            magnitude=self.magnitude,
            num_magnitude_bins=self.num_magnitude_bins,
            magnitude_std=self.magnitude_std,
            magnitude_max=self.magnitude_max,
            prob=self.prob,
            increasing=self.increasing,
            translate_pct=self.translate_pct,
            fill=self.fill,
            interpolation=self.interpolation,
            ops=self.op_names,
            seed=self.seed,
        )
        return config


def from_timm_string(config, mean=None, interpolation="bilinear", seed=None, **kwargs):
    """A timm-policy ``RandAugment`` from a timm config string such as ``"rand-m9-mstd0.5-inc1"``.

    Sections as timm's ``rand_augment_transform``: ``m`` magnitude, ``n`` ops, ``p`` probability,
    ``mstd`` magnitude noise (> 100: uniform), ``mmax`` magnitude clip, ``inc`` increasing op set.
    ``mean`` (0-1 per channel): fill with ``round(255 * mean)`` as timm's ``create_transform`` does.
    """
    if not isinstance(config, str) or not config.startswith("rand"):
        raise ValueError(f"RandAugment config must be a timm string like 'rand-m9-mstd0.5-inc1', got {config!r}.")
    options = {
        "magnitude": 10.0,
        "num_ops": 2,
        "prob": 0.5,
        "magnitude_std": 0.0,
        "magnitude_max": None,
        "increasing": False,
    }
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
