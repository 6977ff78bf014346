"""ConvMixer as a functional Keras model, named variants and a registry.

The named variants are rows of ``MODEL_CONFIGS``; each public builder
(``ConvMixer1536_20`` ...) is made from its row by ``_make_builder``.
"""

import os
import re

import keras
from keras import layers

from keras_convmixer.initializers import dense_initializers, validate_initializer
from keras_convmixer.layers import BN_EPSILON, BN_MOMENTUM, ConvMixerBlock, PatchEmbed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)

_IMAGENET = dict(default_size=224, classes=1000, mean=IMAGENET_MEAN, std=IMAGENET_STD)
_CIFAR10 = dict(default_size=32, classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD)

# name: architecture (h, d, k, p, activation) + dataset defaults.
MODEL_CONFIGS = {
    "convmixer_1536_20": dict(dim=1536, depth=20, kernel_size=9, patch_size=7, activation="gelu", **_IMAGENET),
    # The released 768/32 weights were trained with ReLU.
    "convmixer_768_32": dict(dim=768, depth=32, kernel_size=7, patch_size=7, activation="relu", **_IMAGENET),
    "convmixer_1024_20": dict(dim=1024, depth=20, kernel_size=9, patch_size=14, activation="gelu", **_IMAGENET),
    "convmixer_1536_24": dict(dim=1536, depth=24, kernel_size=9, patch_size=14, activation="gelu", **_IMAGENET),
    "convmixer_1024_16": dict(dim=1024, depth=16, kernel_size=9, patch_size=7, activation="gelu", **_IMAGENET),
    "convmixer_512_16": dict(dim=512, depth=16, kernel_size=8, patch_size=7, activation="gelu", **_IMAGENET),
    "convmixer_256_8": dict(dim=256, depth=8, kernel_size=5, patch_size=2, activation="gelu", **_CIFAR10),
    "convmixer_256_16": dict(dim=256, depth=16, kernel_size=9, patch_size=1, activation="gelu", **_CIFAR10),
}

_POOLINGS = (None, "avg", "max")


def ConvMixer(
    dim,
    depth,
    kernel_size,
    patch_size,
    *,
    activation="gelu",
    include_top=True,
    include_preprocessing=True,
    input_shape=None,
    input_tensor=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    dropout=0.0,
    weights=None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    feature_extractor=False,
    bn_momentum=BN_MOMENTUM,
    bn_epsilon=BN_EPSILON,
    default_size=224,
    depthwise_impl="auto",
    initializer="torch",
    name="convmixer",
):
    """Build a ConvMixer-``dim``/``depth`` as a functional ``keras.Model``.

    Arguments follow ``keras.applications``. With ``include_preprocessing``
    the model takes raw pixels in [0, 255] and normalises with ``mean``/``std``
    (fractions of 1, per RGB channel). ``input_shape=(None, None, 3)`` gives a
    model for any input size that is a multiple of ``patch_size``.

    ``include_top=False`` returns the final feature map (``pooling=None``) or
    pooled features (``"avg"``/``"max"``). ``feature_extractor=True`` returns
    a dict of the stem's and every block's feature maps.
    ``weights`` is ``None`` or the path of a ``.weights.h5``/``.keras`` file.
    ``depthwise_impl`` (``"auto"``/``"keras"``/``"xla"``/``"fast"``) is passed to every
    ``ConvMixerBlock``; it changes how the depthwise convolution runs, not the weights.
    ``initializer="torch"`` (default) starts every conv and the head as PyTorch's
    ``nn.Conv2d``/``nn.Linear`` do, U(+-1/sqrt(fan_in)) for kernels and biases, which
    the published results were trained from; ``"keras"`` keeps Keras's
    ``glorot_uniform`` kernels and zero biases. BatchNorm starts at gamma=1, beta=0.
    """
    validate_initializer(initializer)
    if pooling not in _POOLINGS:
        raise ValueError(f"pooling must be one of {_POOLINGS}, got {pooling!r}.")
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise ValueError(f"weights must be None or a path to a weights file, got {weights!r}.")
    if weights is not None and not os.path.exists(weights):
        raise FileNotFoundError(
            f"Weights file {os.fspath(weights)!r} does not exist. Pretrained weights are not "
            "downloaded: convert a timm checkpoint with scripts/convert_timm.py and pass its path."
        )
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {mean!r} and {std!r}.")

    if input_tensor is None:
        shape = tuple(input_shape) if input_shape is not None else (default_size, default_size, 3)
        if len(shape) != 3 or shape[-1] != 3:
            raise ValueError(f"input_shape must be (height, width, 3), got {shape!r}.")
        inputs = keras.Input(shape=shape, name="images")
    else:
        inputs = input_tensor

    x = inputs
    if include_preprocessing:
        x = layers.Normalization(
            mean=[255.0 * m for m in mean],
            variance=[(255.0 * s) ** 2 for s in std],
            name="normalize",
        )(x)
    common = dict(activation=activation, bn_momentum=bn_momentum, bn_epsilon=bn_epsilon, initializer=initializer)
    x = PatchEmbed(dim, patch_size, name="stem", **common)(x)
    features = {"stem": x}
    for i in range(depth):
        x = ConvMixerBlock(dim, kernel_size, depthwise_impl=depthwise_impl, name=f"block_{i}", **common)(x)
        features[f"block_{i}"] = x

    if feature_extractor:
        outputs = features
    elif include_top:
        x = layers.GlobalAveragePooling2D(name="pool")(x)
        if dropout:
            x = layers.Dropout(dropout, name="dropout")(x)
        # Under a mixed policy the head computes in float32, as Keras's mixed-precision guide says:
        # the loss and metrics then get float32 logits (TF's in_top_k rejects bf16/fp16 ones).
        head_dtype = "float32" if keras.mixed_precision.global_policy().name.startswith("mixed") else None
        outputs = layers.Dense(
            classes, activation=classifier_activation, name="head", dtype=head_dtype,
            **dense_initializers(initializer, dim),
        )(x)
    elif pooling == "avg":
        outputs = layers.GlobalAveragePooling2D(name="pool")(x)
    elif pooling == "max":
        outputs = layers.GlobalMaxPooling2D(name="pool")(x)
    else:
        outputs = x

    if input_tensor is not None:
        inputs = keras.utils.get_source_inputs(input_tensor)
    model = keras.Model(inputs, outputs, name=name)
    if weights is not None:
        _load_weights(model, weights)
    return model


# Keras names the variable and both shapes inside a long multi-line message (the file's shape
# is backend-formatted, e.g. torch.Size([8])).
_SHAPE_MISMATCH = re.compile(
    r"variable\.shape=(\([^)]*\)), Received: value\.shape=(.+?)\. Target variable: <Variable path=([^,]+)"
)


def _load_weights(model, path):
    try:
        model.load_weights(path)
    except ValueError as err:
        found = _SHAPE_MISMATCH.search(str(err))
        detail = (
            f"{found[3]} has shape {found[1]} in this model but "
            f"{tuple(int(d) for d in re.findall(r'[0-9]+', found[2]))} in the file"
            if found
            else str(err).strip().splitlines()[0]
        )
        raise ValueError(
            f"Weights file {os.fspath(path)!r} does not fit {model.name}: {detail}. "
            "Is it from another variant or class count?"
        ) from None


def _make_builder(key, public_name):
    config = MODEL_CONFIGS[key]

    def builder(**kwargs):
        return ConvMixer(**{**config, "name": key, **kwargs})

    builder.__name__ = builder.__qualname__ = public_name
    builder.__doc__ = (
        f"ConvMixer-{config['dim']}/{config['depth']} (kernel {config['kernel_size']}, "
        f"patch {config['patch_size']}, {config['activation']}); defaults: "
        f"{config['default_size']}x{config['default_size']} input, {config['classes']} classes.\n\n"
        "Accepts every keyword argument of ``ConvMixer``."
    )
    return builder


def _public_name(key):
    return "ConvMixer" + key[len("convmixer_"):]


BUILDERS = {key: _make_builder(key, _public_name(key)) for key in MODEL_CONFIGS}

ConvMixer1536_20 = BUILDERS["convmixer_1536_20"]
ConvMixer768_32 = BUILDERS["convmixer_768_32"]
ConvMixer1024_20 = BUILDERS["convmixer_1024_20"]
ConvMixer1536_24 = BUILDERS["convmixer_1536_24"]
ConvMixer1024_16 = BUILDERS["convmixer_1024_16"]
ConvMixer512_16 = BUILDERS["convmixer_512_16"]
ConvMixer256_8 = BUILDERS["convmixer_256_8"]
ConvMixer256_16 = BUILDERS["convmixer_256_16"]


def list_models():
    """Registry names accepted by ``get_model`` and ``--model``."""
    return sorted(MODEL_CONFIGS)


def canonical_name(name):
    """Map ``"ConvMixer1536_20"``, ``"convmixer-1536-20"`` etc. to a registry key."""
    key = str(name).strip().lower().replace("-", "_")
    if key.startswith("convmixer") and not key.startswith("convmixer_"):
        key = "convmixer_" + key[len("convmixer"):]
    if key not in MODEL_CONFIGS:
        raise ValueError(f"Unknown model {name!r}. Available: {', '.join(list_models())}.")
    return key


def get_model(name, **kwargs):
    """Build a registered variant by name, e.g. ``get_model("convmixer_256_8")``."""
    return BUILDERS[canonical_name(name)](**kwargs)
