"""The Inception crop against an independent NumPy copy of timm's sampling and tf.image.resize's filter."""

import math

import numpy as np
import pytest
from scipy import stats

from keras_convmixer import augment as aug
from tests.helpers import to_numpy

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def timm_crop_sizes(rng, n, height, width, scale=SCALE, ratio=RATIO, attempts=10):
    """Independent NumPy version of timm's RandomResizedCrop.get_params (sizes only)."""
    out = []
    for _ in range(n):
        for _ in range(attempts):
            area = height * width * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                out.append((h, w))
                break
        else:
            in_ratio = width / height
            if in_ratio < ratio[0]:
                out.append((round(width / ratio[0]), width))
            elif in_ratio > ratio[1]:
                out.append((height, round(height * ratio[1])))
            else:
                out.append((height, width))
    return np.array(out, dtype=float)


def ramp_image(height, width):
    """Channel 0 = x, channel 1 = y: resampling a linear ramp keeps it linear, so the crop box
    can be read back from the output pixels."""
    yy, xx = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([xx, yy, np.full_like(xx, 7)], axis=-1).astype("float32")


def boxes_from_outputs(out, size, interior):
    """Crop (h, w) from the slope of the ramps over interior output pixels."""
    lo, hi = interior
    wx = (out[:, size // 2, hi, 0] - out[:, size // 2, lo, 0]) / (hi - lo) * size
    hy = (out[:, hi, size // 2, 1] - out[:, lo, size // 2, 1]) / (hi - lo) * size
    return hy, wx


def check_crop_statistics(h, w, height, width, rng):
    area = h * w / (height * width)
    aspect = w / h
    # Rounding w and h to whole pixels moves area and ratio a little beyond the nominal ranges.
    assert area.min() >= SCALE[0] * 0.8 and area.max() <= 1.0 + 1e-3
    assert aspect.min() >= RATIO[0] * 0.9 and aspect.max() <= RATIO[1] / 0.9
    ref = timm_crop_sizes(rng, 4000, height, width)
    ref_area, ref_aspect = ref[:, 0] * ref[:, 1] / (height * width), ref[:, 1] / ref[:, 0]
    assert stats.ks_2samp(area, ref_area).pvalue > 1e-3
    assert stats.ks_2samp(np.log(aspect), np.log(ref_aspect)).pvalue > 1e-3
    # Sanity of the test itself: area is spread over the range, not stuck at one value.
    assert np.quantile(area, 0.1) < 0.25 and np.quantile(area, 0.9) > 0.6


def test_device_random_resized_crop_statistics():
    size, n = 48, 400
    layer = aug.RandomResizedCrop(size, SCALE, RATIO, seed=3)
    images = np.repeat(ramp_image(size, size)[None], n, axis=0)
    out = to_numpy(layer(images, training=True)).astype(np.float64)
    assert out.shape == (n, size, size, 3)
    # Pixels 0 and 1 of a small (enlarged) box sample left of its first source pixel, clamped to it
    # as tf.image.resize does: read slopes from pixel 2 in.
    h, w = boxes_from_outputs(out, size, (2, size - 3))
    np.testing.assert_allclose(h, np.round(h), atol=0.05)  # whole-pixel boxes, as timm
    check_crop_statistics(h, w, size, size, np.random.default_rng(0))
    # Every box lies inside the image: first/last sample positions stay within [0, size - 1].
    left = out[:, size // 2, 2, 0] - 2.5 * w / size + 0.5
    assert left.min() >= -1e-3 and (left + w).max() <= size + 1e-3
    # Inference: unchanged.
    np.testing.assert_allclose(to_numpy(layer(images[:2], training=False)), images[:2], atol=1e-4)


def test_device_crop_resizes_to_target_size():
    layer = aug.RandomResizedCrop(8, seed=0)
    out = layer(np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 3)).astype("float32"), training=True)
    assert tuple(out.shape) == (3, 8, 8, 3)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_device_crop_resamples_like_the_host_tf_resize(interpolation):
    """The device crop's filter against tf.image.resize(crop, antialias=True), the host path's: boxes
    that shrink (antialiased), enlarge and keep the size, non-square, touching the borders."""
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (4, 40, 36, 3)).astype("float32")
    boxes = np.array([[0, 0, 40, 36], [5, 3, 9, 12], [10, 7, 24, 29], [13, 20, 27, 16]], "float32")  # t, l, h, w
    size = 24
    bicubic = np.full(4, interpolation == "bicubic")
    out = to_numpy(aug.resize_crops(images, *boxes.T, size, bicubic))
    for image, (t, left, h, w), got in zip(images, boxes.astype(int), out, strict=True):
        crop = image[t : t + h, left : left + w]
        ref = tf.clip_by_value(tf.image.resize(crop, [size, size], method=interpolation, antialias=True), 0, 255)
        np.testing.assert_allclose(got, ref.numpy(), atol=2e-3)


def test_host_random_resized_crop_statistics():
    tf = pytest.importorskip("tensorflow")
    height, width, size, n = 40, 60, 24, 400
    image = ramp_image(height, width).astype("uint8")
    ds = tf.data.Dataset.from_tensors(image).repeat(n).map(lambda im: aug.tf_random_resized_crop(im, size))
    out = np.stack([x.numpy() for x in ds]).astype(np.float64)
    assert out.shape == (n, size, size, 3)
    # Antialiasing blurs the border pixels when shrinking: read slopes in the central half.
    h, w = boxes_from_outputs(out, size, (size // 4, 3 * size // 4))
    check_crop_statistics(h, w, height, width, np.random.default_rng(1))


def step_edge_crops(path, interpolation, n=200):
    """``n`` crops of a step edge (0 | 200) on ``path``: bicubic overshoots past 200, bilinear never does."""
    image = np.zeros((32, 32, 3), "float32")
    image[:, 16:] = 200.0
    kwargs = dict(scale=(0.3, 0.3), ratio=(1, 1), interpolation=interpolation)
    if path == "device":
        layer = aug.RandomResizedCrop(16, seed=0, **kwargs)
        return to_numpy(layer(np.repeat(image[None], n, axis=0), training=True))
    tf = pytest.importorskip("tensorflow")
    tf.random.set_seed(0)
    ds = (
        tf.data.Dataset.from_tensors(image)
        .repeat(n)
        .map(lambda im: aug.tf_random_resized_crop(im, 16, kwargs["scale"], kwargs["ratio"], interpolation))
    )
    return np.stack([x.numpy() for x in ds])


@pytest.mark.parametrize("path", ["device", "host"])
@pytest.mark.parametrize(
    "interpolation, bicubic_share", [("bilinear", (0.0, 0.0)), ("bicubic", (0.8, 1.0)), ("random", (0.25, 0.75))]
)
def test_both_paths_share_the_interpolation_contract(path, interpolation, bicubic_share):
    out = step_edge_crops(path, interpolation)
    overshoot = (out > 200.5).any(axis=(1, 2, 3))
    edge = ((out > 1) & (out < 199)).any(axis=(1, 2, 3))  # crops that contain the edge
    assert edge.sum() > 50
    assert bicubic_share[0] <= overshoot[edge].mean() <= bicubic_share[1]
    assert out.min() >= 0.0 and out.max() <= 255.0


def test_unknown_interpolation_is_refused_on_both_paths():
    with pytest.raises(ValueError, match="interpolation must be one of"):
        aug.RandomResizedCrop(8, interpolation="nearest")
    with pytest.raises(ValueError, match="interpolation must be one of"):
        aug.tf_random_resized_crop(np.zeros((8, 8, 3), "uint8"), 4, interpolation="area")
