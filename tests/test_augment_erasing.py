"""RandomErasing against timm's RandomErasing: box sampling, fill, host and device paths."""

import functools
import random

import keras
import numpy as np
import pytest

from keras_convmixer.augment.erasing import ATTEMPTS, RandomErasing
from keras_convmixer.augment.xp import keras_namespace, tf_namespace
from tests.helpers import to_numpy
from tests.vision_reference import vision_or_skip

H, W = 20, 30
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def jitted(fn):
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(fn)
    return fn


def boxes_of(erased):
    """(erased?, top, left, h, w) per image from a boolean (N, H, W) mask of erased pixels."""
    rows, cols = erased.any(axis=2), erased.any(axis=1)
    hit = rows.any(axis=1)
    top, left = rows.argmax(axis=1), cols.argmax(axis=1)
    h, w = rows.sum(axis=1), cols.sum(axis=1)
    # Boxes are rectangles: the mask is exactly its bounding box.
    assert (erased.sum(axis=(1, 2)) == h * w).all()
    return hit, top[hit], left[hit], h[hit], w[hit]


@functools.lru_cache(maxsize=4)
def timm_boxes(n, probability, max_count=None):
    torch, _, timm = vision_or_skip()
    from timm.data.random_erasing import RandomErasing as TimmErasing

    random.seed(0)
    eraser = TimmErasing(probability, mode="const", max_count=max_count, device="cpu")
    masks = []
    for _ in range(n):
        img = torch.ones(3, H, W)
        eraser(img)
        masks.append((img[0] == 0).numpy())
    return np.stack(masks)


def our_masks(layer, n, path):
    # mean 0, std 1 and mode "const": erased pixels become exactly 0 on an image of 255s.
    images = np.full((n, H, W, 3), 255.0, "float32")
    if path == "device":
        layer.build(images.shape)
        state = [v.value for v in layer.non_trainable_variables]
        out = to_numpy(jitted(lambda s, x: layer.stateless_call([], s, x, training=True)[0])(state, images))
    else:
        tf = pytest.importorskip("tensorflow")
        tf.random.set_seed(0)
        ds = tf.data.Dataset.from_tensor_slices(images)
        ds = ds.map(layer.host_map).batch(n) if path == "host" else ds.batch(n).map(layer.host_batch_map)
        out = next(iter(ds)).numpy()
    assert ((out == 0) | (out == 255)).all()
    assert (out.min(axis=3) == out.max(axis=3)).all()  # all channels erased together
    return out[..., 0] == 0


@pytest.mark.parametrize("path", ["device", "host", "host_batch"])
def test_box_sampling_matches_timm(path):
    stats = pytest.importorskip("scipy.stats")
    n, p = 1200, 0.6
    ref = boxes_of(timm_boxes(n, p))
    layer = RandomErasing(p, mode="const", mean=(0, 0, 0), std=(1, 1, 1), seed=4)
    ours = boxes_of(our_masks(layer, n, path))
    assert stats.binomtest(int(ours[0].sum()), n, p).pvalue > 1e-4
    # Every erased image has one box inside the image, h < H and w < W, as timm's sampling requires.
    assert (ours[3] < H).all() and (ours[4] < W).all() and (ours[3] >= 1).all()
    for name, a, b in zip(("top", "left", "h", "w"), ours[1:], ref[1:], strict=True):
        assert stats.ks_2samp(a, b).pvalue > 1e-3, name
        assert abs(a.mean() - b.mean()) < 0.1 * b.mean() + 0.3, name


def test_several_boxes_like_timm():
    stats = pytest.importorskip("scipy.stats")
    n = 800
    ref = timm_boxes(n, 1.0, max_count=3).sum(axis=(1, 2))
    layer = RandomErasing(1.0, mode="const", max_count=3, mean=(0, 0, 0), std=(1, 1, 1), seed=5)
    ours = our_masks(layer, n, "device").sum(axis=(1, 2))
    # 1-3 boxes sharing the area budget (overlaps merge): the erased area's distribution matches.
    assert stats.ks_2samp(ours, ref).pvalue > 1e-3


def test_pixel_fill_is_standard_normal_after_the_models_normalisation():
    images = np.random.default_rng(0).integers(0, 256, (64, H, W, 3)).astype("float32")
    layer = RandomErasing(1.0, mode="pixel", mean=MEAN, std=STD, seed=1)
    layer.build(images.shape)
    state = [v.value for v in layer.non_trainable_variables]
    out = to_numpy(jitted(lambda s, x: layer.stateless_call([], s, x, training=True)[0])(state, images))
    changed = (out != images).any(axis=3)
    assert changed.any(axis=(1, 2)).mean() > 0.9
    normalised = (out - 255.0 * np.array(MEAN)) / (255.0 * np.array(STD))
    noise = normalised[changed]
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1.0) < 0.05
    assert abs(np.corrcoef(noise[:, 0], noise[:, 1])[0, 1]) < 0.1  # independent per channel
    np.testing.assert_array_equal(out[~changed], images[~changed])


def test_host_and_device_run_the_same_rule():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(1)
    n = 16
    images = rng.integers(0, 256, (n, H, W, 3)).astype("float32")
    draws = [
        rng.random(n).astype("float32"),
        rng.random(n).astype("float32"),
        [rng.random((n, ATTEMPTS, 2)).astype("float32") for _ in range(2)],
        [rng.random((n, 2)).astype("float32") for _ in range(2)],
        [rng.normal(size=(n, H, W, 3)).astype("float32") for _ in range(2)],
    ]
    layer = RandomErasing(0.7, mode="pixel", max_count=2, mean=MEAN, std=STD)
    on_device = to_numpy(
        layer.apply(keras_namespace(), *keras.tree.map_structure(keras.ops.convert_to_tensor, [images, *draws]))
    )
    on_host = layer.apply(tf_namespace(), tf.convert_to_tensor(images), *draws).numpy()
    np.testing.assert_allclose(on_device, on_host, rtol=1e-6, atol=1e-4)
    assert (on_device != images).any()


def test_identity_at_inference_and_config_round_trip():
    images = np.random.default_rng(0).integers(0, 256, (4, H, W, 3)).astype("float32")
    layer = RandomErasing(1.0, seed=2)
    np.testing.assert_array_equal(to_numpy(layer(images, training=False)), images)
    clone = RandomErasing.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(probability=1.5), "probability"),
        (dict(mode="noise"), "mode"),
        (dict(min_area=0.5, max_area=0.2), "min_area"),
        (dict(min_aspect=0), "min_aspect"),
        (dict(min_count=2, max_count=1), "min_count"),
        (dict(std=(0.2, 0.2)), "mean and std"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RandomErasing(**kwargs)


def test_bad_input_shape():
    with pytest.raises(ValueError, match="RandomErasing images"):
        RandomErasing(1.0)(np.zeros((2, 8, 8, 4), "float32"), training=True)
