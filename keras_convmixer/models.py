"""ConvMixer as a functional Keras model, the named variants' builders and a registry.

The variants are rows of ``presets.MODEL_CONFIGS``; each public builder (``ConvMixer1536_20`` ...)
is made from its row by ``_make_builder``, with its own signature and docstring.
"""

import inspect
import os
import re
import textwrap

import keras
from keras import layers

from keras_convmixer.errors import first_line
from keras_convmixer.initializers import dense_initializers, validate_initializer
from keras_convmixer.layers import BN_EPSILON, BN_MOMENTUM, ConvMixerBlock, PatchEmbed
from keras_convmixer.presets import (
    ARCHITECTURE_KEYS,
    CIFAR10_MEAN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODEL_CONFIGS,
    canonical_name,
    list_models,
    public_name,
    trainable_params,
)

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
    # The docstring is generated below from _ARG_DOCS, which the variant builders share.
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
            classes,
            activation=classifier_activation,
            name="head",
            dtype=head_dtype,
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
            else first_line(err)
        )
        raise ValueError(
            f"Weights file {os.fspath(path)!r} does not fit {model.name}: {detail}. "
            "Is it from another variant or class count?"
        ) from None


# One description per argument, shared by ConvMixer's docstring and every builder's.
_ARG_DOCS = {
    "dim": "channels of every layer after the stem (h in the paper).",
    "depth": "number of ConvMixer blocks (d).",
    "kernel_size": "side of the depthwise kernels (k).",
    "patch_size": "side and stride of the patch-embedding convolution (p); the input's height and width "
    "must be multiples of it.",
    "activation": '`"gelu"` (the exact erf form, as PyTorch\'s `nn.GELU`), `"relu"` or any name '
    "`keras.activations.get` accepts.",
    "include_top": "whether to end with the classifier: global average pooling, optional dropout and a dense layer.",
    "include_preprocessing": "whether the model takes raw pixels in [0, 255] and normalises them itself "
    "with `mean` and `std`.",
    "input_shape": "`(height, width, 3)`; `(None, None, 3)` accepts any size that is a multiple of the patch size.",
    "input_tensor": "optional Keras tensor (the output of `keras.Input()`) to use as the image input.",
    "pooling": 'with `include_top=False`: `None` returns the last feature map, `"avg"` or `"max"` pooled features.',
    "classes": "number of classes of the head.",
    "classifier_activation": "activation of the head; `None` returns logits.",
    "dropout": "dropout rate before the head.",
    "weights": "`None` (random initialisation) or the path of a `.weights.h5`/`.keras` file. Nothing is "
    "downloaded: convert a timm checkpoint with `scripts/convert_timm.py` and pass its path.",
    "mean": "per-channel RGB mean of the built-in normalisation, as fractions of 1.",
    "std": "per-channel RGB standard deviation of the built-in normalisation, as fractions of 1.",
    "feature_extractor": "return a dict of the stem's and every block's feature maps instead.",
    "bn_momentum": "BatchNorm momentum in Keras's convention (PyTorch's 0.1 is 0.9 here).",
    "bn_epsilon": "BatchNorm epsilon (PyTorch's default).",
    "default_size": "input side when `input_shape` is not given.",
    "depthwise_impl": '`"auto"`, `"keras"`, `"xla"` or `"fast"`: how the depthwise convolutions run; '
    "it does not change the weights.",
    "initializer": '`"torch"` starts every convolution and the head as PyTorch\'s `nn.Conv2d`/`nn.Linear` '
    "do, U(+-1/sqrt(fan_in)) for kernels and biases, which the published models were trained from; "
    '`"keras"` keeps Keras\'s `glorot_uniform` kernels and zero biases. BatchNorm starts at gamma=1, beta=0.',
    "name": "the model's name.",
}

_PAPER = "Reference:\n- [Patches Are All You Need?](https://arxiv.org/abs/2201.09792) (Trockman & Kolter, TMLR 2023)\n"


def _args_section(signature, shown_defaults=None):
    shown_defaults = shown_defaults or {}
    lines = ["Args:"]
    for param in signature.parameters.values():
        default = shown_defaults.get(param.name)
        if default is None and param.default is not inspect.Parameter.empty:
            default = f"`{param.default!r}`"
        text = f"{param.name}: {_ARG_DOCS[param.name]}" + (f" Defaults to {default}." if default else "")
        lines.append(textwrap.fill(text, 100, initial_indent="    ", subsequent_indent="        "))
    return "\n".join(lines) + "\n\nReturns:\n    A `keras.Model`.\n"


ConvMixer.__doc__ = (
    "Instantiates a ConvMixer-dim/depth as a functional `keras.Model`.\n\n"
    + _PAPER
    + "\nThe named variants have their own builders (`ConvMixer1536_20`, ... see `list_models()`).\n\n"
    + _args_section(inspect.signature(ConvMixer), {"input_shape": "`(default_size, default_size, 3)`"})
)

_NORMALISATIONS = {IMAGENET_MEAN: "ImageNet", CIFAR10_MEAN: "CIFAR-10"}
_ACTIVATION_NAMES = {"gelu": "GELU", "relu": "ReLU"}
# The architecture and the default input size are what a variant is; a builder does not take them.
_FIXED = (*ARCHITECTURE_KEYS, "default_size")


def _make_builder(key):
    row = MODEL_CONFIGS[key]
    builder_name = public_name(key)
    fixed = {k: row[k] for k in _FIXED}
    defaults = dict(classes=row["classes"], mean=row["mean"], std=row["std"], name=key)
    signature = inspect.Signature(
        [
            param.replace(default=defaults.get(param.name, param.default))
            for param in inspect.signature(ConvMixer).parameters.values()
            if param.name not in fixed
        ]
    )

    def builder(*args, **kwargs):
        for arg in _FIXED:
            if arg in kwargs:
                hint = "pass input_shape" if arg == "default_size" else "build it with ConvMixer(...)"
                raise ValueError(
                    f"{builder_name} fixes {arg}={fixed[arg]!r}: for another {arg.replace('_', ' ')}, {hint}."
                )
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as err:  # the message names the argument but not the function
            raise TypeError(f"{builder_name}() {err}") from None
        bound.apply_defaults()
        return ConvMixer(**fixed, **bound.arguments)

    size = row["default_size"]
    activation = _ACTIVATION_NAMES.get(row["activation"], row["activation"])
    params = trainable_params(row["dim"], row["depth"], row["kernel_size"], row["patch_size"], row["classes"])
    builder.__name__ = builder.__qualname__ = builder_name
    builder.__signature__ = signature
    defaults_text = (
        f"Defaults: {size}x{size}x3 input in [0, 255], {row['classes']} classes, "
        f"{_NORMALISATIONS.get(tuple(row['mean']), 'custom')} normalisation inside the model; "
        f"{params:,} trainable parameters at these defaults (BatchNorm statistics excluded). "
        f"Evaluated at {size}x{size}, crop_pct {row['crop_pct']}, {row['interpolation']} resizing "
        f"(`presets.eval_preset({key!r})`)."
    )
    builder.__doc__ = (
        f"Instantiates ConvMixer-{row['dim']}/{row['depth']} (kernel {row['kernel_size']}, "
        f"patch {row['patch_size']}, {activation}), registry name `{key}`.\n\n"
        + _PAPER
        + "\n"
        + textwrap.fill(defaults_text, 100)
        + "\n\n"
        + _args_section(signature, {"input_shape": f"`({size}, {size}, 3)`"})
    )
    return builder


BUILDERS = {key: _make_builder(key) for key in MODEL_CONFIGS}

ConvMixer1536_20 = BUILDERS["convmixer_1536_20"]
ConvMixer768_32 = BUILDERS["convmixer_768_32"]
ConvMixer1024_20 = BUILDERS["convmixer_1024_20"]
ConvMixer1536_24 = BUILDERS["convmixer_1536_24"]
ConvMixer1024_16 = BUILDERS["convmixer_1024_16"]
ConvMixer512_16 = BUILDERS["convmixer_512_16"]
ConvMixer256_8 = BUILDERS["convmixer_256_8"]
ConvMixer256_16 = BUILDERS["convmixer_256_16"]

__all__ = [
    "BUILDERS",
    "ConvMixer",
    *(builder.__name__ for builder in BUILDERS.values()),
    "canonical_name",
    "get_model",
    "list_models",
]


def get_model(name, **kwargs):
    """Build a registered variant by name, e.g. ``get_model("convmixer_256_8", classes=4)``.

    ``name`` is a registry key, a builder name or timm's name; ``kwargs`` are the builder's.
    """
    return BUILDERS[canonical_name(name)](**kwargs)
