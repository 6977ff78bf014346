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


# Put in front of a `python -c` program: it wraps every import finder so that
# TensorFlow cannot be found, as on a JAX- or torch-only machine
# (`import tensorflow` raises, importlib's find_spec answers None).
HIDE_TENSORFLOW = """
import sys
class _HideTensorFlow:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None
    def __getattr__(self, attr):
        return getattr(self.finder, attr)
sys.meta_path[:] = [_HideTensorFlow(f) for f in sys.meta_path]
try:
    import tensorflow
    raise SystemExit("tensorflow was not hidden")
except ImportError:
    pass
"""
