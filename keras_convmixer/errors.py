"""How the package words an error for a user: one line, checked before Keras loads.

Imports nothing heavy (no Keras, no argparse), so both the library and the command-line front ends use it.
"""

import os

KERAS_BACKENDS = ("tensorflow", "jax", "torch", "numpy", "openvino")


def first_line(err):
    """The first non-empty line of an exception's message (its type name when it has none): what a user sees of an
    error whose full text is a multi-line dump from a library."""
    for line in str(err).strip().splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__


def check_keras_backend():
    """Raise a one-line ImportError when ``KERAS_BACKEND`` names no Keras backend.

    Keras fails on an unknown name with a traceback from deep inside its import; this is called before anything
    imports Keras, so a typo reads as one line. It does not run on ``import keras_convmixer``: the console
    scripts import the package before their ``main`` can turn the error into a usage error.
    """
    name = os.environ.get("KERAS_BACKEND")
    if name and name not in KERAS_BACKENDS:
        raise ImportError(f"KERAS_BACKEND={name!r} is not a Keras backend: use tensorflow, jax or torch")
