"""The packaged ImageNet-1k class names and decode_predictions, against torchvision/timm and a NumPy top-k."""

import os

import numpy as np
import pytest

import keras_convmixer as kc
from keras_convmixer import imagenet
from tests.vision_reference import vision_or_skip


def test_class_names_are_torchvisions_in_order():
    vision_or_skip()
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    assert imagenet.class_names() == list(_IMAGENET_CATEGORIES)


def test_wordnet_ids_are_timms_in_order():
    _, _, timm = vision_or_skip()
    path = os.path.join(os.path.dirname(timm.__file__), "data", "_info", "imagenet_synsets.txt")
    with open(path) as f:
        assert imagenet.wordnet_ids() == f.read().split()


def test_decode_predictions_is_the_numpy_top_k():
    rng = np.random.default_rng(0)
    preds = rng.normal(size=(3, 1000)).astype("float32")
    preds[1, 207] = 50.0  # a clear winner: golden retriever
    decoded = kc.decode_predictions(preds, top=4)
    names = imagenet.class_names()
    assert len(decoded) == 3
    for row, result in zip(preds, decoded, strict=True):
        expected = []
        remaining = list(range(1000))
        for _ in range(4):  # selection by hand: the largest remaining score, lowest index on a tie
            best = max(remaining, key=lambda i: (row[i], -i))
            expected.append(best)
            remaining.remove(best)
        assert [name for _, name, _ in result] == [names[i] for i in expected]
        assert [score for _, _, score in result] == pytest.approx([float(row[i]) for i in expected])
    assert decoded[1][0][:2] == ("n02099601", "golden retriever")
    assert len(kc.decode_predictions(preds[:1])[0]) == 5  # keras.applications' default top=5


@pytest.mark.parametrize(
    "preds, top, match",
    [
        (np.zeros((2, 10)), 5, r"preds must have shape \(samples, 1000\).*\(2, 10\)"),
        (np.zeros(1000), 5, r"preds must have shape \(samples, 1000\).*\(1000,\)"),
        (np.zeros((1, 1000)), 0, r"top must be a whole number from 1 to 1000, got 0"),
    ],
    ids=["classes", "rank", "top"],
)
def test_decode_predictions_mistakes(preds, top, match):
    with pytest.raises(ValueError, match=match):
        kc.decode_predictions(preds, top=top)


def test_class_names_ship_as_package_data():
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "setup.cfg")) as f:
        setup = f.read()
    assert "imagenet_classes.txt" in setup.split("[options.package_data]")[1].split("[")[0]
