"""The host part of the ImageNet recipe through Grain: the loader the stream could have been built on.

A ``grain.python.DataLoader`` over the folder's files, with ``--workers`` worker processes, each decoding a
JPEG with PIL in draft mode (libjpeg's reduced-size decode, to the smallest power-of-two scale that keeps
the crop at least ``image_size`` wide and high), then cutting timm's Inception crop
(``RandomResizedCropAndInterpolation.get_params``, scale 0.08-1, ratio 3/4-4/3) and resizing it to a uint8
square with a random bilinear or bicubic filter: the work ``data.stream.ShardedStream`` does on the host.
Needs ``pip install grain`` (not a dependency of the project) and timm.
"""

import math
import random

import numpy as np


class DecodeCrop:
    """``(path, label) -> (uint8 image_size x image_size x 3, label)``, the random draws from ``rng``."""

    def __init__(self, image_size):
        self.image_size = image_size

    def __call__(self, element, rng):
        from PIL import Image

        from tests.vision_reference import import_vision

        import_vision()  # a worker is a fresh interpreter: timm needs the torchvision op stub there too
        from timm.data.transforms import RandomResizedCropAndInterpolation

        path, label = element
        size = self.image_size
        with Image.open(path) as image:
            width, height = image.size
            random.seed(int(rng.integers(2**31)))  # timm's get_params draws from Python's random
            top, left, h, w = RandomResizedCropAndInterpolation.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
            scale = max(size / w, size / h)
            if scale < 1:
                image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            fx, fy = image.size[0] / width, image.size[1] / height
            box = (left * fx, top * fy, (left + w) * fx, (top + h) * fy)
            method = Image.BICUBIC if rng.random() < 0.5 else Image.BILINEAR
            crop = image.convert("RGB").resize((size, size), method, box=box)
        return np.asarray(crop, np.uint8), np.int32(label)


def _as_grain_transform(grain, decode):
    class _Transform(grain.RandomMapTransform):
        def random_map(self, element, rng):
            return decode(element, rng)

    return _Transform()


def grain_loader(root, image_size, batch_size, workers, seed):
    """The endless, shuffled, batched Grain loader of ``root``'s class folders."""
    import grain.python as grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # Grain's workers read its absl flags; this script has its own parser
        flags.FLAGS.mark_as_parsed()
    from keras_convmixer import data

    split = data.load_source(f"folder:{root}", val_split=0).train  # the files training would list
    files = [(str(path), int(label)) for path, label in zip(split.paths, split.labels, strict=True)]
    sampler = grain.IndexSampler(
        num_records=len(files), shard_options=grain.NoSharding(), shuffle=True, num_epochs=None, seed=seed
    )
    operations = [_as_grain_transform(grain, DecodeCrop(image_size)), grain.Batch(batch_size, drop_remainder=True)]
    return grain.DataLoader(data_source=files, sampler=sampler, operations=operations, worker_count=workers)


def tree_cpu(_iterator=None):
    """CPU seconds of this process and of its live child processes (Grain's workers)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass  # a worker that has ended: its time is no longer readable
    return total
