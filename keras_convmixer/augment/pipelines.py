"""The recipe's training augmentation, assembled from the layers of this package.

Two places run it (``augment_on``):

* ``"host"``: per image in the tf.data map (Inception crop, flip, RandAugment, colour jitter,
  random erasing: ``host_image_map``), then MixUp/CutMix per batch (``host_batch_map``). Only the
  ops each image drew run.
* ``"device"``: the host only decodes and crops; ``DeviceAugment`` runs the same layers batched
  inside the train step, still choosing RandAugment's ops per image. With an in-memory source
  the crop runs there too, so no TensorFlow is needed at all.

``augment_impl="keras_cv"`` swaps in keras-cv 0.9's layers on the host. The config is
``keras_convmixer.recipes``' resolved and checked dict: option values are validated there, not here.
"""

import keras
from keras import ops

from keras_convmixer.augment.crop import RandomResizedCrop, tf_random_resized_crop
from keras_convmixer.augment.erasing import RandomErasing
from keras_convmixer.augment.mix import MixupCutmix
from keras_convmixer.augment.randaugment import RandAugment
from keras_convmixer.tf_import import import_tf
from keras_convmixer.vocabulary import RANDAUG_SCALES


def make_randaugment(cfg, seed=None):
    """The recipe's RandAugment: torchvision's (``randaug_scale="torchvision"``, 31 magnitude bins)
    or timm's ``rand-m{m}-mstd{mstd}-inc1`` (each op with probability 0.5, fill = the mean pixel)."""
    if cfg["randaug_scale"] == "torchvision":
        magnitude = float(cfg["randaug_m"])
        if not magnitude.is_integer():
            raise ValueError(
                f"--randaug-m {cfg['randaug_m']} must be a whole bin (0-30) with --randaug-scale torchvision."
            )
        return RandAugment(
            "torchvision", num_ops=int(cfg["randaug_n"]), magnitude=int(magnitude), num_magnitude_bins=31, seed=seed
        )
    # timm's create_transform fills with round(255 * mean) and resamples bilinearly unless told
    # otherwise; with train_interpolation=random timm also draws bicubic per op (not offered here).
    fill = tuple(float(min(255, round(255 * m))) for m in cfg["mean"])
    return RandAugment(
        "timm",
        num_ops=cfg["randaug_n"],
        magnitude=cfg["randaug_m"],
        magnitude_std=cfg["randaug_mstd"],
        increasing=True,
        fill=fill,
        interpolation="bilinear",
        seed=seed,
    )


def _flip(cfg, seed):
    if cfg["hflip"] != 0.5:
        raise ValueError(f"Keras RandomFlip flips with probability 0.5; hflip={cfg['hflip']} is not supported.")
    return keras.layers.RandomFlip("horizontal", seed=seed)


def _erasing(cfg, seed):
    # timm erases after normalisation with N(0, 1) noise: in pixel space, mean + std * N(0, 1).
    return RandomErasing(cfg["reprob"], mode="pixel", mean=cfg["mean"], std=cfg["std"], seed=seed)


# Where each random layer of the device stack takes its seed: ``seed + offset``. Keras layers given one
# seed draw the same uniforms in the same order on the device, so with one seed for all an image's flip
# decided its RandAugment op (flipped <=> one of the first half of the ops) and its crop box.
DEVICE_SEED_OFFSETS = {"crop": 0, "flip": 1, "randaugment": 2, "color_jitter": 3, "erasing": 4, "mix": 5}


def device_seed(seed, layer):
    """The seed of ``layer`` (a ``DEVICE_SEED_OFFSETS`` key) in the device stack seeded with ``seed``."""
    return None if seed is None else int(seed) + DEVICE_SEED_OFFSETS[layer]


def _image_layers(cfg, seed, device=False):
    """flip, RandAugment (or colour jitter), erasing, in timm's order; value range [0, 255].

    ``device``: each layer its own seed (``device_seed``). The host's layers draw from tf.random ops, whose
    seeds TensorFlow already tells apart."""

    def seed_of(layer):
        return device_seed(seed, layer) if device else seed

    layers = []
    if cfg["hflip"] > 0:
        layers.append(_flip(cfg, seed_of("flip")))
    if cfg["randaug_n"] > 0:
        layers.append(make_randaugment(cfg, seed_of("randaugment")))
    elif cfg["color_jitter"] > 0:  # timm: no colour jitter when RandAugment is on
        j = cfg["color_jitter"]
        layers.append(
            keras.layers.RandomColorJitter(
                value_range=(0, 255),
                brightness_factor=j,
                contrast_factor=j,
                saturation_factor=j,
                seed=seed_of("color_jitter"),
            )
        )
    if cfg["reprob"] > 0:
        layers.append(_erasing(cfg, seed_of("erasing")))
    return layers


# ----------------------------------------------------------------------------- keras-cv glue


def _keras_cv():
    try:
        import keras_cv
    except ImportError as err:
        raise ValueError(
            f"--augment-impl keras_cv needs keras-cv 0.9 (pip install 'keras-convmixer[keras-cv]'): {err}"
        ) from None
    return keras_cv


def _keras_cv_image_layers(cfg, seed):
    kcv = _keras_cv()
    layers = []
    if cfg["hflip"] > 0:
        layers.append(kcv.layers.RandomFlip("horizontal", seed=seed))
    if cfg["randaug_n"] > 0:
        # keras-cv's magnitude is a 0-1 fraction of its own timm-like per-op ranges.
        top = RANDAUG_SCALES[cfg["randaug_scale"]]
        layers.append(
            kcv.layers.RandAugment(
                value_range=(0, 255),
                augmentations_per_image=cfg["randaug_n"],
                magnitude=cfg["randaug_m"] / top,
                magnitude_stddev=cfg["randaug_mstd"] / top,
                rate=1.0,
                seed=seed,
            )
        )
    elif cfg["color_jitter"] > 0:
        j = cfg["color_jitter"]
        layers.append(
            kcv.layers.RandomColorJitter(
                value_range=(0, 255),
                brightness_factor=j,
                contrast_factor=j,
                saturation_factor=j,
                hue_factor=0.0,
                seed=seed,
            )
        )
    if cfg["reprob"] > 0:
        layers.append(_erasing(cfg, seed))
    return layers


def _keras_cv_crop(cfg):
    # keras-cv's crop has one interpolation per layer: "random" falls back to bilinear.
    interpolation = cfg["train_interpolation"]
    layer = _keras_cv().layers.RandomCropAndResize(
        target_size=(cfg["image_size"], cfg["image_size"]),
        crop_area_factor=tuple(cfg["crop_scale"]),
        aspect_ratio_factor=tuple(cfg["crop_ratio"]),
        interpolation="bilinear" if interpolation == "random" else interpolation,
        seed=cfg["seed"],
    )

    def crop(image):
        return layer(import_tf().cast(image, "float32"))

    return crop


# ----------------------------------------------------------------------------- the host (tf.data) maps


def _host_call(layer):
    """One layer as a per-image tf function for the tf.data map, under any backend."""
    if hasattr(layer, "host_map"):  # ours: only the drawn ops run
        return layer.host_map
    # keras.layers.Pipeline (not Sequential) switches Keras's own layers to tf ops in tf.data.
    return keras.layers.Pipeline([layer])


def host_image_map(cfg):
    """Per-image training transform for ``data.make_dataset(image_map=...)``: uint8 HWC in,
    float32 ``image_size``² in [0, 255] out. With ``augment_on="device"`` only the crop."""
    keras_cv = cfg["augment_impl"] == "keras_cv"
    if cfg["augment_on"] == "device":
        layers = []
    elif keras_cv:
        layers = _keras_cv_image_layers(cfg, cfg["seed"])
    else:
        layers = _image_layers(cfg, cfg["seed"])
    steps = [_host_call(layer) for layer in layers]

    if keras_cv:
        crop = _keras_cv_crop(cfg)
    else:

        def crop(image):
            return tf_random_resized_crop(
                image, cfg["image_size"], tuple(cfg["crop_scale"]), tuple(cfg["crop_ratio"]), cfg["train_interpolation"]
            )

    def image_map(image):
        image = crop(image)
        for step in steps:
            image = step(image)
        return import_tf().cast(image, "float32")

    return image_map


def make_batch_mix(cfg, num_classes, host):
    return MixupCutmix(
        num_classes,
        mixup_alpha=cfg["mixup_alpha"],
        cutmix_alpha=cfg["cutmix_alpha"],
        mix_prob=cfg["mix_prob"],
        switch_prob=cfg["switch_prob"],
        label_smoothing=cfg["label_smoothing"],
        host=host,
        seed=cfg["seed"] if host else device_seed(cfg["seed"], "mix"),
    )


def host_batch_map(cfg, num_classes):
    """``(images, int labels) -> (images, soft targets)`` per batch, for ``make_dataset(batch_map=...)``."""
    mix = make_batch_mix(cfg, num_classes, host=True)
    # .call, not __call__: Layer.__call__ would convert the tf.data tensors to the backend's
    # (JAX/torch) arrays. The inner MixUp/CutMix layers switch themselves to tf in tf.data.
    return mix.call


# ----------------------------------------------------------------------------- the device layer

# The settings DeviceAugment builds its layers from: all it keeps of the training config, so a
# saved layer's config holds these and nothing unrelated (paths, optimiser, ...).
DEVICE_KEYS = (
    "seed",
    "image_size",
    "crop_scale",
    "crop_ratio",
    "train_interpolation",
    "hflip",
    "randaug_n",
    "randaug_m",
    "randaug_mstd",
    "randaug_scale",
    "color_jitter",
    "reprob",
    "mean",
    "std",
)


@keras.saving.register_keras_serializable(package="keras_convmixer")
class DeviceAugment(keras.layers.Layer):
    """The training augmentation as one batched layer for the train step (``augment_on="device"``).

    ``cfg``: a training config (any extra keys are dropped; see ``DEVICE_KEYS``). ``crop=True`` adds
    the Inception crop (in-memory sources, whose images arrive uncropped). RandAugment chooses its
    ops per image here too.
    """

    def __init__(self, cfg, crop=False, **kwargs):
        super().__init__(**kwargs)
        missing = [key for key in DEVICE_KEYS if key not in cfg]
        if missing:
            raise ValueError(f"DeviceAugment cfg lacks the settings {', '.join(missing)}.")
        self.cfg = {key: cfg[key] for key in DEVICE_KEYS}
        self.crop = bool(crop)
        seed = self.cfg["seed"]
        self.crop_layer = (
            RandomResizedCrop(
                self.cfg["image_size"],
                self.cfg["crop_scale"],
                self.cfg["crop_ratio"],
                interpolation=self.cfg["train_interpolation"],
                seed=device_seed(seed, "crop"),
            )
            if crop
            else None
        )
        self.image_layers = _image_layers(self.cfg, seed, device=True)

    def build(self, input_shape):
        shape = tuple(input_shape)
        if self.crop_layer is not None:
            self.crop_layer.build(shape)
            shape = self.crop_layer.compute_output_shape(shape)
        for layer in self.image_layers:
            layer.build(shape)
        self.built = True

    def compute_output_shape(self, input_shape):
        return self.crop_layer.compute_output_shape(input_shape) if self.crop_layer is not None else input_shape

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
        config.update(cfg=dict(self.cfg), crop=self.crop)
        return config
