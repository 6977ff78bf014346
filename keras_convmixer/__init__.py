"""keras-convmixer: ConvMixer ("Patches Are All You Need?") for Keras 3.

Importing this package never imports TensorFlow: under the JAX or PyTorch
backend only keras and that backend are needed. Modules that need TF
(tf.data pipelines, SavedModel export) import it when called.
"""

import os as _os

# Keras fails on an unknown backend name with a traceback from deep inside its import;
# checking first turns a typo into one line that the scripts can print.
_KERAS_BACKENDS = ("tensorflow", "jax", "torch", "numpy", "openvino")
if _os.environ.get("KERAS_BACKEND") and _os.environ["KERAS_BACKEND"] not in _KERAS_BACKENDS:
    raise ImportError(
        f"KERAS_BACKEND={_os.environ['KERAS_BACKEND']!r} is not a Keras backend: use tensorflow, jax or torch"
    )

from keras_convmixer.initializers import TorchKernelUniform, TorchUniform  # noqa: E402  (after the backend check)
from keras_convmixer.layers import ConvMixerBlock, PatchEmbed, gelu_erf  # noqa: E402
from keras_convmixer.models import (  # noqa: E402
    MODEL_CONFIGS,
    ConvMixer,
    ConvMixer256_8,
    ConvMixer256_16,
    ConvMixer512_16,
    ConvMixer768_32,
    ConvMixer1024_16,
    ConvMixer1024_20,
    ConvMixer1536_20,
    ConvMixer1536_24,
    get_model,
    list_models,
)

__version__ = "0.1.0"

__all__ = [
    "MODEL_CONFIGS",
    "ConvMixer",
    "ConvMixer256_8",
    "ConvMixer256_16",
    "ConvMixer512_16",
    "ConvMixer768_32",
    "ConvMixer1024_16",
    "ConvMixer1024_20",
    "ConvMixer1536_20",
    "ConvMixer1536_24",
    "ConvMixerBlock",
    "PatchEmbed",
    "TorchKernelUniform",
    "TorchUniform",
    "gelu_erf",
    "get_model",
    "list_models",
]
