"""keras-convmixer: ConvMixer ("Patches Are All You Need?") for Keras 3.

Importing this package never imports TensorFlow: under the JAX or PyTorch
backend only keras and that backend are needed. Modules that need TF
(tf.data pipelines, SavedModel export) import it when called.
"""

from keras_convmixer.initializers import TorchKernelUniform, TorchUniform
from keras_convmixer.layers import ConvMixerBlock, PatchEmbed, gelu_erf
from keras_convmixer.models import (
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
