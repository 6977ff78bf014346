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
    PRETRAINED,
    canonical_name,
    list_models,
    public_name,
    trainable_params,
)

_POOLINGS = (None, "avg", "max")


class _DefaultStats(tuple):
    """A mean/std nobody passed: pretrained weights replace it with the normalisation they were trained with."""


_DEFAULT_MEAN, _DEFAULT_STD = _DefaultStats(IMAGENET_MEAN), _DefaultStats(IMAGENET_STD)


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
    mean=_DEFAULT_MEAN,
    std=_DEFAULT_STD,
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
    if weights is not None and (not isinstance(weights, (str, os.PathLike)) or not os.fspath(weights)):
        raise ValueError(f"weights must be None, 'imagenet', 'hf://owner/repo' or a path, got {weights!r}.")
    pretrained = None
    if weights is not None and os.fspath(weights).endswith(".weights.h5"):
        if not os.path.exists(weights):
            raise FileNotFoundError(
                f"Weights file {os.fspath(weights)!r} does not exist. For published weights pass "
                "weights='imagenet' or 'hf://owner/repo'."
            )
    elif weights is not None:
        pretrained = _resolve_pretrained(
            os.fspath(weights), dim, depth, kernel_size, patch_size, activation, include_top, classes, name
        )
        # Unless given, the normalisation is the one the weights were trained with.
        if isinstance(mean, _DefaultStats):
            mean = tuple(pretrained.meta["mean"])
        if isinstance(std, _DefaultStats):
            std = tuple(pretrained.meta["std"])
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
    if pretrained is not None:
        from keras_convmixer.pretrained import load_resolved

        load_resolved(model, pretrained, load_head=bool(include_top and not feature_extractor))
    elif weights is not None:
        _load_weights(model, weights)
    return model


def _resolve_pretrained(spec, dim, depth, kernel_size, patch_size, activation, include_top, classes, name):
    """Resolve ``weights=`` before the model is built: its normalisation decides the model's, and a head or
    architecture that cannot fit is one line before anything is downloaded where that can be known."""
    from keras_convmixer import pretrained

    variant = None
    if spec == "imagenet":
        variant = pretrained.variant_for_arch(dim, depth, kernel_size, patch_size)
        if variant is None:
            pretrained.imagenet_variant(_variant_named(name))  # raises, naming the variants that have weights
            raise ValueError(
                f"weights='imagenet': this architecture (dim {dim}, depth {depth}, kernel {kernel_size}, patch "
                f"{patch_size}) is none of the released ones ({', '.join(pretrained.pretrained_variants())})."
            )
        trained = MODEL_CONFIGS[variant]["activation"]
        if activation != trained:
            raise ValueError(
                f"weights='imagenet' for {public_name(variant)} were trained with activation={trained!r}, "
                f"got activation={activation!r}."
            )
        if include_top and classes != PRETRAINED[variant]["classes"]:
            raise ValueError(
                f"weights='imagenet' with include_top=True needs classes={PRETRAINED[variant]['classes']}, got "
                f"classes={classes!r}: pass include_top=False for the backbone alone (then add your own head)."
            )
    weights = pretrained.resolve_weights(spec, variant)
    arch = dict(dim=dim, depth=depth, kernel_size=kernel_size, patch_size=patch_size)
    pretrained.check_architecture(weights, arch, name)
    if include_top and weights.arch["classes"] != classes:
        raise ValueError(
            f"weights {spec!r} have a {weights.arch['classes'] or 'no'}-class head but classes={classes!r}: pass "
            f"classes={weights.arch['classes']}, or include_top=False for the backbone alone."
        )
    return weights


def _variant_named(name):
    try:
        return canonical_name(name)
    except ValueError:
        return None


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
    "weights": '`None` (random initialisation); `"imagenet"` (the released ImageNet-1k weights, downloaded '
    "from the Hugging Face Hub on first use and cached under `~/.keras/models/convmixer`; with "
    '`include_top=True` it needs `classes=1000`); `"hf://owner/repo"` or `"hf://owner/repo@revision"` (any '
    "timm-format ConvMixer repository); or a local path: a `.weights.h5` of this exact model, a timm/official "
    "checkpoint (`.safetensors`, `.pth`, `.pth.tar`), a `.keras` file or a run directory. With `include_top=False` "
    "the backbone alone is loaded.",
    "mean": "per-channel RGB mean of the built-in normalisation, as fractions of 1; with pretrained `weights` "
    "and no `mean` given, the weights' own.",
    "std": "per-channel RGB standard deviation of the built-in normalisation, as fractions of 1; with "
    "pretrained `weights` and no `std` given, the weights' own.",
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
    defaults = dict(classes=row["classes"], mean=_DefaultStats(row["mean"]), std=_DefaultStats(row["std"]), name=key)
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
    if key in PRETRAINED:
        released = PRETRAINED[key]
        defaults_text += (
            f' `weights="imagenet"` loads the released ImageNet-1k weights from the Hugging Face Hub '
            f"({released['hub_id']}, top-1 {released['top1']}% at {released['image_size']} px, "
            f"{released['license'].upper()} licence)."
        )
    else:
        defaults_text += (
            f' No ImageNet weights were released for this variant (`weights="imagenet"` works for '
            f"{', '.join(public_name(k) for k in PRETRAINED)})."
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
