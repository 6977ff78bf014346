"""MixUp/CutMix and label smoothing, checked from the pixels and targets they produce."""

import math

import numpy as np
import pytest

from keras_convmixer import augment as aug
from tests.helpers import to_numpy


def constant_images(n, size=8):
    """Image i is filled with the value 10 * (i + 1): pixels tell which source images were mixed."""
    return np.stack([np.full((size, size, 3), 10.0 * (i + 1), "float32") for i in range(n)])


@pytest.mark.parametrize("host", [False, True])
def test_mixup_cutmix_probabilities_and_labels(host):
    n_classes, batch, calls, smoothing, size = 8, 8, 150, 0.1, 32
    mix_prob, switch_prob = 0.6, 0.3
    # The same settings as the layer's arguments (device) and as a training config (host).
    settings = dict(
        mixup_alpha=0.5, cutmix_alpha=1.0, mix_prob=mix_prob, switch_prob=switch_prob, label_smoothing=smoothing, seed=1
    )
    layer = aug.MixupCutmix(n_classes, host=host, **settings)
    images, labels = constant_images(batch, size), np.arange(batch, dtype="int32")
    if host:
        tf = pytest.importorskip("tensorflow")
        ds = tf.data.Dataset.from_tensors((images, labels)).repeat(calls).map(aug.host_batch_map(settings, n_classes))
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
                np.testing.assert_allclose(
                    out[i, 0, 0, 0], weights[i] @ (10.0 * (np.arange(n_classes) + 1)), rtol=1e-4, atol=1e-2
                )
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
