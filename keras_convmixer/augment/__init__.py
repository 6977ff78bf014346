"""Training augmentation: timm's and torchvision's recipes as Keras layers, on the host or on the device.

* ``crop``: the Inception crop (``RandomResizedCrop``, ``tf_random_resized_crop``).
* ``randaugment`` (with ``image_ops``): torchvision's and timm's RandAugment, per image.
* ``erasing``: timm's random erasing, filled in the model's normalised space.
* ``mix``: timm's batch MixUp/CutMix with label smoothing.
* ``pipelines``: the recipe's stack, as tf.data maps (``host_image_map``, ``host_batch_map``) or one
  layer for the train step (``DeviceAugment``).

Keras's own ``RandAugment(factor)`` is a different augmentation whose ops no factor makes match, and
Keras has no Inception crop: hence these layers. Every op is written once against a NumPy-like
namespace (``xp``): ``keras.ops`` on the device, TensorFlow in tf.data. TensorFlow is imported lazily.
"""

from keras_convmixer.augment.crop import RandomResizedCrop, resize_crops, sample_crop_boxes, tf_random_resized_crop
from keras_convmixer.augment.erasing import RandomErasing
from keras_convmixer.augment.mix import MixupCutmix, soft_targets
from keras_convmixer.augment.pipelines import (
    DEVICE_KEYS,
    DeviceAugment,
    host_batch_map,
    host_image_map,
    make_batch_mix,
    make_randaugment,
)
from keras_convmixer.augment.randaugment import RandAugment, from_timm_string

__all__ = [
    "DEVICE_KEYS",
    "DeviceAugment",
    "MixupCutmix",
    "RandAugment",
    "RandomErasing",
    "RandomResizedCrop",
    "from_timm_string",
    "host_batch_map",
    "host_image_map",
    "make_batch_mix",
    "make_randaugment",
    "resize_crops",
    "sample_crop_boxes",
    "soft_targets",
    "tf_random_resized_crop",
]
