import math

import numpy as np
import pytest
from scipy import stats

from keras_convmixer import augment as aug
from keras_convmixer.training import resolve_config
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


def test_device_crop_random_interpolation_mixes_both_kernels():
    layer = aug.RandomResizedCrop(16, scale=(0.3, 0.3), ratio=(1, 1), interpolation="random", seed=0)
    # A step edge: bicubic overshoots (clipped at 0/255 only outside [0, 255]), bilinear never does.
    image = np.zeros((32, 32, 3), "float32")
    image[:, 16:] = 200.0
    out = to_numpy(layer(np.repeat(image[None], 200, axis=0), training=True))
    overshoot = (out > 200.5).any(axis=(1, 2, 3))
    edge = ((out > 1) & (out < 199)).any(axis=(1, 2, 3))  # crops that contain the edge
    assert edge.sum() > 50
    assert 0.25 < overshoot[edge].mean() < 0.75  # about half bicubic


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


def constant_images(n, size=8):
    """Image i is filled with the value 10 * (i + 1): pixels tell which source images were mixed."""
    return np.stack([np.full((size, size, 3), 10.0 * (i + 1), "float32") for i in range(n)])


@pytest.mark.parametrize("host", [False, True])
def test_mixup_cutmix_probabilities_and_labels(host):
    n_classes, batch, calls, smoothing, size = 8, 8, 150, 0.1, 32
    mix_prob, switch_prob = 0.6, 0.3
    layer = aug.MixupCutmix(n_classes, mixup_alpha=0.5, cutmix_alpha=1.0, mix_prob=mix_prob,
                            switch_prob=switch_prob, label_smoothing=smoothing, host=host, seed=1)
    images, labels = constant_images(batch, size), np.arange(batch, dtype="int32")
    if host:
        tf = pytest.importorskip("tensorflow")
        ds = tf.data.Dataset.from_tensors((images, labels)).repeat(calls).map(aug.host_batch_map(
            dict(mixup_alpha=0.5, cutmix_alpha=1.0, mix_prob=mix_prob, switch_prob=switch_prob,
                 label_smoothing=smoothing, seed=1), n_classes))
        results = [(x.numpy(), y.numpy()) for x, y in ds]
    else:
        results = [tuple(to_numpy(t) for t in layer(images, labels)) for _ in range(calls)]

    smooth = np.full((batch, n_classes), smoothing / n_classes) + np.eye(batch, n_classes) * (1 - smoothing)
    n_mixed = n_cut = 0
    for out, targets in results:
        assert out.shape == images.shape and targets.shape == (batch, n_classes)
        np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-5)
        assert targets.min() >= smoothing / n_classes - 1e-6
        if np.array_equal(out, images):
            np.testing.assert_allclose(targets, smooth, atol=1e-6)
            continue
        n_mixed += 1
        values = np.unique(np.round(out, 3))
        is_cutmix = np.all(np.isin(values, images[:, 0, 0, 0]))
        n_cut += is_cutmix
        weights = (targets - smoothing / n_classes) / (1 - smoothing)  # un-smoothed: own-pixel shares
        for i in range(batch):
            if is_cutmix:
                # Keras derives the weight from the real-valued box; the pasted box has whole pixels,
                # so the two differ by at most one row and one column.
                share = np.mean(out[i, ..., 0] == 10.0 * (i + 1))
                assert abs(weights[i, i] - share) <= (2 * size + 1) / size**2 + 1e-5
            else:
                # MixUp: pixel = lam * own + (1 - lam) * partner, and the targets use the same lam.
                np.testing.assert_allclose(out[i, 0, 0, 0], weights[i] @ (10.0 * (np.arange(n_classes) + 1)),
                                           rtol=1e-4, atol=1e-2)
    se = math.sqrt(mix_prob * (1 - mix_prob) / calls)
    assert abs(n_mixed / calls - mix_prob) < 4 * se
    se = math.sqrt(switch_prob * (1 - switch_prob) / max(n_mixed, 1))
    assert abs(n_cut / max(n_mixed, 1) - switch_prob) < 4 * se


def test_labels_only_smoothing_when_mixing_off():
    layer = aug.MixupCutmix(5, label_smoothing=0.2)
    images = constant_images(3)
    out, targets = layer(images, np.array([0, 3, 4], "int32"))
    np.testing.assert_array_equal(to_numpy(out), images)
    want = np.full((3, 5), 0.04)
    want[[0, 1, 2], [0, 3, 4]] = 0.84
    np.testing.assert_allclose(to_numpy(targets), want, atol=1e-6)


def test_recipes_build_the_libraries_randaugment():
    cifar = aug.make_randaugment(resolve_config("cifar10", dict(output_dir="unused")))
    assert (cifar.policy, cifar.num_ops, cifar.magnitude, cifar.num_magnitude_bins, cifar.prob, cifar.fill) == (
        "torchvision", 2, 12, 31, 1.0, (0.0, 0.0, 0.0))
    imagenet = aug.make_randaugment(resolve_config("imagenet", dict(output_dir="unused")))
    # rand-m9-mstd0.5-inc1 with create_transform's fill: round(255 * ImageNet mean).
    assert (imagenet.policy, imagenet.num_ops, imagenet.magnitude, imagenet.magnitude_std, imagenet.prob,
            imagenet.increasing, imagenet.fill) == ("timm", 2, 9.0, 0.5, 0.5, True, (124.0, 116.0, 104.0))
    with pytest.raises(ValueError, match="whole bin"):
        aug.make_randaugment(resolve_config("cifar10", dict(randaug_m=12.5, output_dir="unused")))


@pytest.mark.parametrize("impl", ["convmixer", "keras_cv"])
def test_host_image_map_in_tf_data(impl):
    tf = pytest.importorskip("tensorflow")
    if impl == "keras_cv":
        pytest.importorskip("keras_cv")
    cfg = resolve_config("imagenet", dict(image_size=14, augment_impl=impl, output_dir="unused"))
    image_map = aug.host_image_map(cfg)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    ds = tf.data.Dataset.from_tensors(image).repeat(6).map(image_map)
    outs = np.stack([x.numpy() for x in ds])
    assert outs.shape == (6, 14, 14, 3) and outs.dtype == np.float32
    # timm's erasing noise is N(0, 1) after normalisation: a few pixels may leave [0, 255].
    assert -5 * 255 < outs.min() and outs.max() < 6 * 255 and np.median(outs) > 0
    assert len({o.tobytes() for o in outs}) == 6  # random per image


def test_keras_cv_refused_on_device():
    with pytest.raises(ValueError, match="keras_cv runs only in the tf.data map"):
        resolve_config("demo", dict(augment_impl="keras_cv", augment_on="device", output_dir="unused"))
