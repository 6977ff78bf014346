"""Shared test helpers (not tests)."""

import keras
import numpy as np


def randomize_batchnorm(model, seed=0):
    """Give every BatchNormalization non-trivial gamma/beta/statistics.

    Fresh BN layers are the identity at inference, which would hide errors in
    how statistics are applied.
    """
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, c),
                    rng.normal(0, 0.1, c),
                    rng.normal(0, 0.2, c),
                    rng.uniform(0.5, 2.0, c),
                ]
            )


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)
