"""keras-convmixer: ConvMixer ("Patches Are All You Need?") for Keras 3.

The public names below are imported on first use (PEP 562), so that configuration checks and the
command-line parsers (``keras_convmixer.recipes``, ``keras_convmixer.cli``) start without importing
Keras. Importing this package never imports TensorFlow: under the JAX or PyTorch backend only keras and
that backend are needed; modules that need TF (tf.data pipelines, SavedModel export) import it when called.

``.keras`` files that hold this package's layers need them registered with Keras before they load:
``keras_convmixer.load_model(path)`` always does it; ``import keras_convmixer`` does it too when Keras
was already imported.
"""

import importlib as _importlib
import importlib.util as _importlib_util
import sys as _sys

# An unknown KERAS_BACKEND is not checked here: the console scripts import this package before their main()
# can turn the error into one line and exit 2. The names below that load Keras check it first instead.
from keras_convmixer.errors import check_keras_backend as _check_keras_backend
from keras_convmixer.presets import MODEL_CONFIGS as _MODEL_CONFIGS
from keras_convmixer.presets import public_name as _public_name

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "MODEL_CONFIGS": "presets",
    "list_models": "presets",
    "ConvMixer": "models",
    "get_model": "models",
    "preprocess_input": "models",
    **{_public_name(key): "models" for key in _MODEL_CONFIGS},
    "ConvMixerBlock": "layers",
    "PatchEmbed": "layers",
    "gelu_erf": "layers",
    "TorchKernelUniform": "initializers",
    "TorchUniform": "initializers",
    "decode_predictions": "imagenet",
    "load_pretrained": "pretrained",
}
# Modules that do not import Keras: their names need no backend check.
_KERAS_FREE = ("presets", "imagenet", "pretrained")

__all__ = sorted([*_EXPORTS, "load_model"])

# Every module that registers classes a saved model of ours can contain: the layers and their
# initialisers, and the learning-rate schedules that training compiles into best.keras/last.keras.
_SERIALIZABLE_MODULES = ("layers", "initializers", "schedules", "optim")


def _register_serializables():
    for module in _SERIALIZABLE_MODULES:
        _importlib.import_module(f"{__name__}.{module}")


def load_model(path, **kwargs):
    """Load a ``.keras`` file after registering this package's layers, initialisers and schedules.

    Works whatever was imported before; ``kwargs`` go to ``keras.saving.load_model`` (``compile``,
    ``custom_objects``, ``safe_mode``).
    """
    _check_keras_backend()
    _register_serializables()
    import keras

    return keras.saving.load_model(path, **kwargs)


def __getattr__(name):
    if name in _EXPORTS:
        if _EXPORTS[name] not in _KERAS_FREE:
            _check_keras_backend()
        value = getattr(_importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    # ``keras_convmixer.data`` etc. work after a bare ``import keras_convmixer``, as attributes of a package do
    # once imported.
    if not name.startswith("_") and _importlib_util.find_spec(f"{__name__}.{name}") is not None:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


# With Keras already imported, the user may go straight to keras.saving.load_model: register now.
if "keras" in _sys.modules:
    _register_serializables()
