"""Tiny run directories for the export/evaluate/predict tests (not tests)."""

import json

import keras
import numpy as np

import keras_convmixer as kc
from tests.helpers import randomize_batchnorm

TINY = dict(dim=8, depth=1, kernel_size=3, patch_size=4)


def make_run_dir(path, *, image_size=16, class_names=("a", "b", "c", "d", "e", "f"), crop_pct=0.875, model=None):
    """A run dir per the run-dir contract, with a random (but non-trivial) logits model."""
    path.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = kc.ConvMixer(
            **TINY,
            classes=len(class_names),
            classifier_activation=None,
            input_shape=(image_size, image_size, 3),
        )
        randomize_batchnorm(model)
        head = model.get_layer("head")
        # Spread the logits so probabilities and the top-5 order are far from ties.
        rng = np.random.default_rng(0)
        head.kernel.assign(rng.normal(0, 3.0, head.kernel.shape).astype("float32"))
    model.save(path / "best.keras")
    config = {
        "model": "custom",
        "model_kwargs": dict(TINY, classes=len(class_names)),
        "image_size": image_size,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "crop_pct": crop_pct,
        "interpolation": "bilinear",
        "data": "generated",
        "val_split": 0.0,
        "seed": 0,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path, model


def softmax(x):
    x = np.asarray(x, "float64")
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def keras_outputs(model, images):
    """(probabilities, pooled features) straight from the Keras model (the reference)."""
    logits = model.predict(images, verbose=0)
    features = keras.Model(model.inputs, model.get_layer("pool").output).predict(images, verbose=0)
    return softmax(logits), features
