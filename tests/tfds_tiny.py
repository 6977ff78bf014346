"""A tiny TFDS dataset built locally from generated pixels, so the tfds: source is tested offline.

TFDS looks a builder's files up by its package, so the builder lives in this module of the
``tests`` package. Importing it registers ``tiny_convmixer_images`` with TFDS.
"""

import numpy as np
import tensorflow_datasets as tfds

CLASS_NAMES = ["a", "b", "c"]


def tiny_image(split, i):
    """The i-th image of a split: 1-channel (grayscale), varying height, values known to the test."""
    rng = np.random.default_rng([0 if split == "train" else 1, i])
    return rng.integers(0, 256, (6 + i % 3, 8, 1), dtype=np.uint8)


class TinyConvmixerImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    SIZES = {"train": 12, "test": 6}

    def _info(self):
        features = tfds.features.FeaturesDict(
            {"image": tfds.features.Image(shape=(None, None, 1)), "label": tfds.features.ClassLabel(names=CLASS_NAMES)}
        )
        # Kept in key order, so the test knows which image comes when.
        return self.dataset_info_from_configs(
            features=features, supervised_keys=("image", "label"), disable_shuffling=True
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in self.SIZES}

    def _generate_examples(self, split):
        for i in range(self.SIZES[split]):
            yield i, {"image": tiny_image(split, i), "label": i % 3}


def grey(i):
    """The one grey level of every pixel of ``tiny_convmixer_ids``' image ``i``: a crop of it shows which it is."""
    return 10 + 9 * i


class TinyConvmixerIds(tfds.core.GeneratorBasedBuilder):
    """26 constant-grey 12x16 RGB images in two classes (image ``i`` in class ``i % 2``)."""

    VERSION = tfds.core.Version("1.0.0")
    SIZE = 26

    def _info(self):
        features = tfds.features.FeaturesDict(
            {"image": tfds.features.Image(shape=(12, 16, 3)), "label": tfds.features.ClassLabel(names=["c0", "c1"])}
        )
        return self.dataset_info_from_configs(features=features, supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(self.SIZE):
            yield i, {"image": np.full((12, 16, 3), grey(i), np.uint8), "label": i % 2}
