"""Training augmentation: timm's recipe as Keras layers, on the host or on the device.

Two places run it (``augment_on``):

* ``"host"``: per image in the tf.data map (Inception crop, flip, RandAugment, colour jitter,
  random erasing), then MixUp/CutMix per batch. Only the ops each image drew run.
* ``"device"``: the host only decodes and crops; ``DeviceAugment`` runs the same layers batched
  inside the train step, still choosing RandAugment's ops per image. With an in-memory source
  the crop runs there too, so no TensorFlow is needed at all.

RandAugment and random erasing are ``keras_convmixer.randaugment``/``erasing``: torchvision's and
timm's definitions (Keras's own ``RandAugment(factor)`` is a different augmentation whose ops no
factor makes match). Keras has no Inception crop; ``sample_crop_boxes`` is timm's sampling
written once for any NumPy-like namespace, applied with ``tf.image`` on the host and
``keras.ops`` on the device. TensorFlow is imported lazily.
"""

import math
import types

import keras
from keras import ops

from keras_convmixer.erasing import RandomErasing
from keras_convmixer.randaugment import RandAugment

AUGMENT_IMPLS = ("convmixer", "keras_cv")
# RandAugment magnitude scales: timm's runs 0-10 (m9 = 90% of each op's range), torchvision's 0-30.
RANDAUG_SCALES = {"timm": 10.0, "torchvision": 30.0}


def sample_crop_boxes(u_try, u_offset, height, width, scale, ratio, xp):
    """timm's ``RandomResizedCrop.get_params`` for a batch, vectorised over attempts.

    ``u_try``: uniforms (N, attempts, 2) for area and log-aspect; ``u_offset``: (N, 2) for the
    top-left corner. Returns float ``(top, left, crop_h, crop_w)``, each (N,). When no attempt
    fits, falls back to the largest centred crop with the ratio clamped into ``ratio``.
    ``xp`` is ``keras.ops`` or its tf twin ``_tf_numpy()``.
    """
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target_area = height * width * (scale[0] + (scale[1] - scale[0]) * u_try[..., 0])
    aspect = xp.exp(log_lo + (log_hi - log_lo) * u_try[..., 1])
    w = xp.round(xp.sqrt(target_area * aspect))
    h = xp.round(xp.sqrt(target_area / aspect))
    fits = (w <= width) & (h <= height) & (w >= 1) & (h >= 1)
    fits_f = xp.where(fits, 1.0, 0.0)
    # The first attempt that fits (argmax's tie-break is not guaranteed on every backend).
    first = fits & (xp.cumsum(fits_f, axis=1) == 1.0)
    found = xp.max(fits_f, axis=1) > 0
    w_try = xp.sum(xp.where(first, w, 0.0), axis=1)
    h_try = xp.sum(xp.where(first, h, 0.0), axis=1)

    in_ratio = width / height
    w_fallback = xp.where(in_ratio > ratio[1], xp.round(height * ratio[1]), width)
    h_fallback = xp.where(in_ratio < ratio[0], xp.round(width / ratio[0]), height)
    crop_w = xp.where(found, w_try, w_fallback)
    crop_h = xp.where(found, h_try, h_fallback)
    top = xp.where(found, xp.floor(u_offset[:, 0] * (height - crop_h + 1)), (height - crop_h) // 2)
    left = xp.where(found, xp.floor(u_offset[:, 1] * (width - crop_w + 1)), (width - crop_w) // 2)
    top = xp.minimum(top, height - crop_h)
    left = xp.minimum(left, width - crop_w)
    return top, left, crop_h, crop_w


def _tf():
    import tensorflow as tf

    return tf


def _tf_numpy():
    """The few NumPy-style functions ``sample_crop_boxes`` uses, as tf ops."""
    tf = _tf()
    return types.SimpleNamespace(exp=tf.exp, sqrt=tf.sqrt, round=tf.round, floor=tf.floor, where=tf.where,
                                 cumsum=tf.cumsum, max=tf.reduce_max, sum=tf.reduce_sum, minimum=tf.minimum)


def tf_random_resized_crop(image, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bilinear",
                           attempts=10):
    """Inception crop of one HWC image (any size, any dtype) to ``size x size`` float32, in tf.

    ``interpolation="random"`` picks bilinear or bicubic per image, as timm's ``interpolation=random``.
    """
    tf = _tf()
    shape = tf.shape(image)
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    u_try = tf.random.uniform([1, attempts, 2])
    u_offset = tf.random.uniform([1, 2])
    top, left, crop_h, crop_w = sample_crop_boxes(u_try, u_offset, height, width, scale, ratio, _tf_numpy())
    box = [tf.cast(v[0], tf.int32) for v in (top, left, crop_h, crop_w)]
    crop = image[box[0]:box[0] + box[2], box[1]:box[1] + box[3]]

    def resize(method):
        return tf.image.resize(crop, [size, size], method=method, antialias=True)

    if interpolation == "random":
        out = tf.cond(tf.random.uniform([]) < 0.5, lambda: resize("bilinear"), lambda: resize("bicubic"))
    else:
        out = resize(interpolation)
    return tf.clip_by_value(out, 0.0, 255.0)


TRAIN_INTERPOLATIONS = ("bilinear", "bicubic", "random")


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

    Each image gets its own box (timm's sampling, as the host path) and is resampled to ``size``
    by the host path's filter (``resize_crops``); ``interpolation="random"`` picks bilinear or
    bicubic per image, as timm's ``train_interpolation=random``. Runs inside a jitted train step
    on every backend. At inference: a plain resize.
    """

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts=10, interpolation="bilinear",
                 seed=None, **kwargs):
        super().__init__(**kwargs)
        if interpolation not in TRAIN_INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {TRAIN_INTERPOLATIONS}, got {interpolation!r}.")
        self.size = int(size)
        self.scale = tuple(float(s) for s in scale)
        self.ratio = tuple(float(r) for r in ratio)
        self.attempts = int(attempts)
        self.interpolation = interpolation
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
            top, left, crop_h, crop_w = sample_crop_boxes(u_try, u_offset, height, width, self.scale, self.ratio, ops)
            if self.interpolation == "random":
                bicubic = u_interp < 0.5
            else:
                bicubic = ops.full((n,), self.interpolation == "bicubic")
            return resize_crops(images, top, left, crop_h, crop_w, self.size, bicubic)
        if images.shape[1] != self.size or images.shape[2] != self.size:
            images = ops.image.resize(images, (self.size, self.size), antialias=True)
        return images

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.size, self.size, input_shape[3])

    def get_config(self):
        config = super().get_config()
        config.update(size=self.size, scale=self.scale, ratio=self.ratio, attempts=self.attempts,
                      interpolation=self.interpolation, seed=self.seed)
        return config


def soft_targets(labels, num_classes, smoothing, xp_one_hot):
    """One-hot float targets with label smoothing folded in (timm: off = s/n, on = 1 - s + s/n)."""
    targets = xp_one_hot(labels, num_classes)
    return targets * (1.0 - smoothing) + smoothing / num_classes


@keras.saving.register_keras_serializable(package="keras_convmixer")
class MixupCutmix(keras.layers.Layer):
    """timm's batch MixUp/CutMix on integer labels, built from ``keras.layers.MixUp``/``CutMix``.

    Per batch: with probability ``mix_prob`` the batch is mixed; a mixed batch uses CutMix with
    probability ``switch_prob`` (when both alphas are > 0), else MixUp. Labels become soft
    one-hot targets with ``label_smoothing`` folded in before mixing, as timm does. Keras's layers
    draw lambda and the partner per sample (timm's "elem" mode) and CutMix's label weight uses the
    real-valued box, within a pixel of the pasted one.

    ``host=True`` selects with tf ops, for use in a tf.data map under any backend; otherwise
    ``keras.ops`` (inside the train step).
    """

    def __init__(self, num_classes, mixup_alpha=0.0, cutmix_alpha=0.0, mix_prob=1.0, switch_prob=0.5,
                 label_smoothing=0.0, host=False, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.mix_prob = float(mix_prob)
        self.switch_prob = float(switch_prob)
        self.label_smoothing = float(label_smoothing)
        self.host = bool(host)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.mixup = keras.layers.MixUp(alpha=self.mixup_alpha, seed=seed) if self.mixup_alpha > 0 else None
        # CutMix's factor is the range its alpha is drawn from: pin it to cutmix_alpha.
        self.cutmix = (keras.layers.CutMix(factor=(self.cutmix_alpha, self.cutmix_alpha), seed=seed)
                       if self.cutmix_alpha > 0 else None)

    def _ops(self):
        if self.host:
            tf = _tf()
            return tf.one_hot, lambda: tf.random.uniform([]), tf.where
        return ops.one_hot, lambda: keras.random.uniform((), seed=self.seed_generator), ops.where

    def call(self, images, labels):
        one_hot, uniform, where = self._ops()
        targets = soft_targets(labels, self.num_classes, self.label_smoothing, one_hot)
        if self.mixup is None and self.cutmix is None:
            return images, targets
        data = {"images": images, "labels": targets}
        mixed = self.mixup(data, training=True) if self.mixup is not None else None
        cut = self.cutmix(data, training=True) if self.cutmix is not None else None
        if mixed is None or cut is None:
            chosen = mixed if cut is None else cut
        else:
            use_cut = uniform() < self.switch_prob
            chosen = {k: where(use_cut, cut[k], mixed[k]) for k in ("images", "labels")}
        apply = uniform() < self.mix_prob
        return where(apply, chosen["images"], images), where(apply, chosen["labels"], targets)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha,
                      mix_prob=self.mix_prob, switch_prob=self.switch_prob, label_smoothing=self.label_smoothing,
                      host=self.host, seed=self.seed)
        return config


def make_randaugment(cfg, seed=None):
    """The recipe's RandAugment: torchvision's (``randaug_scale="torchvision"``, 31 magnitude bins)
    or timm's ``rand-m{m}-mstd{mstd}-inc1`` (each op with probability 0.5, fill = the mean pixel)."""
    if cfg["randaug_scale"] == "torchvision":
        magnitude = float(cfg["randaug_m"])
        if not magnitude.is_integer():
            raise ValueError(f"--randaug-m {cfg['randaug_m']} must be a whole bin (0-30) with --randaug-scale "
                             "torchvision.")
        return RandAugment("torchvision", num_ops=int(cfg["randaug_n"]), magnitude=int(magnitude),
                           num_magnitude_bins=31, seed=seed)
    # timm's create_transform fills with round(255 * mean) and resamples bilinearly unless told
    # otherwise; with train_interpolation=random timm also draws bicubic per op (not offered here).
    fill = tuple(float(min(255, round(255 * m))) for m in cfg["mean"])
    return RandAugment("timm", num_ops=cfg["randaug_n"], magnitude=cfg["randaug_m"],
                       magnitude_std=cfg["randaug_mstd"], increasing=True, fill=fill, interpolation="bilinear",
                       seed=seed)


def _flip(cfg, seed):
    if cfg["hflip"] != 0.5:
        raise ValueError(f"Keras RandomFlip flips with probability 0.5; hflip={cfg['hflip']} is not supported.")
    return keras.layers.RandomFlip("horizontal", seed=seed)


def _erasing(cfg, seed):
    # timm erases after normalisation with N(0, 1) noise: in pixel space, mean + std * N(0, 1).
    return RandomErasing(cfg["reprob"], mode="pixel", mean=cfg["mean"], std=cfg["std"], seed=seed)


def _image_layers(cfg, seed):
    """flip, RandAugment (or colour jitter), erasing, in timm's order; value range [0, 255]."""
    layers = []
    if cfg["hflip"] > 0:
        layers.append(_flip(cfg, seed))
    if cfg["randaug_n"] > 0:
        layers.append(make_randaugment(cfg, seed))
    elif cfg["color_jitter"] > 0:  # timm: no colour jitter when RandAugment is on
        j = cfg["color_jitter"]
        layers.append(keras.layers.RandomColorJitter(value_range=(0, 255), brightness_factor=j, contrast_factor=j,
                                                     saturation_factor=j, seed=seed))
    if cfg["reprob"] > 0:
        layers.append(_erasing(cfg, seed))
    return layers


def _keras_cv():
    try:
        import keras_cv
    except ImportError as err:
        raise ValueError(f"--augment-impl keras_cv needs keras-cv 0.9 (pip install 'keras-convmixer[keras-cv]'): "
                         f"{err}") from None
    return keras_cv


def _keras_cv_image_layers(cfg, seed):
    kcv = _keras_cv()
    layers = []
    if cfg["hflip"] > 0:
        layers.append(kcv.layers.RandomFlip("horizontal", seed=seed))
    if cfg["randaug_n"] > 0:
        # keras-cv's magnitude is a 0-1 fraction of its own timm-like per-op ranges.
        top = RANDAUG_SCALES[cfg["randaug_scale"]]
        layers.append(kcv.layers.RandAugment(value_range=(0, 255), augmentations_per_image=cfg["randaug_n"],
                                             magnitude=cfg["randaug_m"] / top,
                                             magnitude_stddev=cfg["randaug_mstd"] / top, rate=1.0, seed=seed))
    elif cfg["color_jitter"] > 0:
        j = cfg["color_jitter"]
        layers.append(kcv.layers.RandomColorJitter(value_range=(0, 255), brightness_factor=j, contrast_factor=j,
                                                   saturation_factor=j, hue_factor=0.0, seed=seed))
    if cfg["reprob"] > 0:
        layers.append(_erasing(cfg, seed))
    return layers


def _host_call(layer):
    """One layer as a per-image tf function for the tf.data map, under any backend."""
    if hasattr(layer, "host_map"):  # ours: only the drawn ops run
        return layer.host_map
    # keras.layers.Pipeline (not Sequential) switches Keras's own layers to tf ops in tf.data.
    return keras.layers.Pipeline([layer])


def host_image_map(cfg):
    """Per-image training transform for ``data.make_dataset(image_map=...)``: uint8 HWC in,
    float32 ``image_size``² in [0, 255] out. With ``augment_on="device"`` only the crop."""
    size, seed = cfg["image_size"], cfg["seed"]
    scale, ratio = tuple(cfg["crop_scale"]), tuple(cfg["crop_ratio"])
    impl = cfg["augment_impl"]
    if impl not in AUGMENT_IMPLS:
        raise ValueError(f"--augment-impl must be one of {', '.join(AUGMENT_IMPLS)}, got {impl!r}.")
    if impl == "keras_cv" and cfg["augment_on"] != "host":
        raise ValueError("--augment-impl keras_cv runs only in the tf.data map: use --augment-on host.")
    interpolation = cfg["train_interpolation"]
    if cfg["augment_on"] == "device":
        layers = []
    elif impl == "keras_cv":
        layers = _keras_cv_image_layers(cfg, seed)
    else:
        layers = _image_layers(cfg, seed)
    steps = [_host_call(layer) for layer in layers]

    if impl == "keras_cv":
        kcv = _keras_cv()
        crop_layer = kcv.layers.RandomCropAndResize(
            target_size=(size, size), crop_area_factor=scale, aspect_ratio_factor=ratio,
            interpolation="bilinear" if interpolation == "random" else interpolation, seed=seed)

        def crop(image):
            return crop_layer(_tf().cast(image, "float32"))
    else:
        def crop(image):
            return tf_random_resized_crop(image, size, scale, ratio, interpolation)

    def image_map(image):
        image = crop(image)
        for step in steps:
            image = step(image)
        return _tf().cast(image, "float32")

    return image_map


def make_batch_mix(cfg, num_classes, host):
    return MixupCutmix(num_classes, mixup_alpha=cfg["mixup_alpha"], cutmix_alpha=cfg["cutmix_alpha"],
                       mix_prob=cfg["mix_prob"], switch_prob=cfg["switch_prob"],
                       label_smoothing=cfg["label_smoothing"], host=host, seed=cfg["seed"])


def host_batch_map(cfg, num_classes):
    """``(images, int labels) -> (images, soft targets)`` per batch, for ``make_dataset(batch_map=...)``."""
    mix = make_batch_mix(cfg, num_classes, host=True)
    # .call, not __call__: Layer.__call__ would convert the tf.data tensors to the backend's
    # (JAX/torch) arrays. The inner MixUp/CutMix layers switch themselves to tf in tf.data.
    return mix.call


@keras.saving.register_keras_serializable(package="keras_convmixer")
class DeviceAugment(keras.layers.Layer):
    """The training augmentation as one batched layer for the train step (``augment_on="device"``).

    ``crop=True`` adds the Inception crop (in-memory sources, whose images arrive uncropped).
    RandAugment chooses its ops per image here too.
    """

    def __init__(self, cfg, crop=False, **kwargs):
        super().__init__(**kwargs)
        self.cfg = dict(cfg)
        self.crop = bool(crop)
        seed = cfg["seed"]
        self.crop_layer = (RandomResizedCrop(cfg["image_size"], cfg["crop_scale"], cfg["crop_ratio"],
                                             interpolation=cfg["train_interpolation"], seed=seed)
                           if crop else None)
        self.image_layers = _image_layers(cfg, seed)

    def call(self, images, training=True):
        images = ops.cast(images, self.compute_dtype)
        if self.crop_layer is not None:
            images = self.crop_layer(images, training=training)
        if training:
            for layer in self.image_layers:
                images = layer(images, training=True)
        return images

    def get_config(self):
        config = super().get_config()
        config.update(cfg=self.cfg, crop=self.crop)
        return config
