"""Shared test helpers (not tests)."""

import csv
import os
import subprocess
import sys

import keras
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The ConvMixer the end-to-end training tests train: seconds per epoch on every backend.
TINY_MODEL = dict(dim=32, depth=1, kernel_size=3, patch_size=2)
# TINY_MODEL on 8x8 digits (their native size). lr 0.2: with 2 epochs the one-cycle knots floor(2T/5) and
# floor(4T/5) are both 0, so the schedule starts at lr/20 = 0.01 and decays linearly.
TINY_DEMO = dict(TINY_MODEL, image_size=8, batch_size=32, lr=0.2)


def cli_flags(**settings):
    """Command-line flags for ``settings``: ``--name value``, underscores as dashes; True gives the bare flag."""
    flags = []
    for name, value in settings.items():
        flags.append("--" + name.replace("_", "-"))
        if value is not True:
            flags.append(str(value))
    return flags


# The demo recipe's flags for TINY_DEMO, one log line per epoch; each test adds its epochs.
TINY_FLAGS = cli_flags(**TINY_DEMO, verbose=2)


def run_script(args, env_extra=None, timeout=300, **kwargs):
    """Run ``python *args`` in the repository root on this backend, TensorFlow's native logging off.

    ``env_extra`` sets variables; a None value removes one.
    """
    env = {
        **os.environ,
        "KERAS_BACKEND": keras.backend.backend(),
        "PYTHONPATH": ROOT,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        **(env_extra or {}),
    }
    env = {name: value for name, value in env.items() if value is not None}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kwargs
    )


def rows(path):
    """The rows of a CSV file (a run's history.csv) as dicts."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


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
