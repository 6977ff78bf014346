"""ConvMixer as a functional Keras model, one short builder per named variant, and a registry.

``ConvMixer`` builds any shape. Each named variant (a row of ``presets.MODEL_CONFIGS``) has its own ``def``
that calls it with the row, as ``keras.applications``' ConvNeXt builders do, and one docstring template
describes them all. With ``weights=``, the model is built first and the weights are then read, cached and
ported into it by ``pretrained``, a leaf that does not import this module.
"""

import os
import re

import keras
import numpy as np
from keras import layers

from keras_convmixer import model_docs, presets, pretrained, structure, vocabulary
from keras_convmixer.errors import first_line
from keras_convmixer.initializers import dense_initializers, validate_initializer
from keras_convmixer.layers import BN_EPSILON, BN_MOMENTUM, ConvMixerBlock, PatchEmbed

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
    mean=None,
    std=None,
    feature_extractor=False,
    bn_momentum=BN_MOMENTUM,
    bn_epsilon=BN_EPSILON,
    default_size=224,
    depthwise_impl="auto",
    initializer="torch",
    name="convmixer",
):
    validate_initializer(initializer)
    if pooling not in _POOLINGS:
        raise ValueError(f"pooling must be one of {_POOLINGS}, got {pooling!r}.")
    arch = dict(dim=dim, depth=depth, kernel_size=kernel_size, patch_size=patch_size, activation=activation)
    spec = None if weights is None else vocabulary.parse_spec(weights)
    variant = _check_weights(spec, arch, include_top, classes, name)
    mean, std = _stats(spec, dict(arch, classes=classes), mean, std)

    inputs = _inputs(input_shape, input_tensor, default_size)
    x = _normalize(inputs, mean, std) if include_preprocessing else inputs
    common = dict(activation=activation, bn_momentum=bn_momentum, bn_epsilon=bn_epsilon, initializer=initializer)
    features = _backbone(x, dim, depth, kernel_size, patch_size, depthwise_impl, common)
    x = features[structure.block_name(depth - 1)] if depth else features[structure.STEM]
    if feature_extractor:
        outputs = features
    elif include_top:
        outputs = _head(x, classes, classifier_activation, dropout, initializer, dim)
    else:
        outputs = _pool(x, pooling)
    if input_tensor is not None:
        inputs = keras.utils.get_source_inputs(input_tensor)
    model = keras.Model(inputs, outputs, name=name)
    if spec is not None and spec.kind == "keras_weights":
        _load_weights(model, spec.text)
    elif spec is not None:
        head = dict(classes=classes if include_top else None, load_head=bool(include_top and not feature_extractor))
        pretrained.load_for_builder(model, spec.text, variant=variant, **head)
    return model


def _normalize(x, mean, std):
    return layers.Normalization(
        mean=[255.0 * m for m in mean], variance=[(255.0 * s) ** 2 for s in std], name=structure.NORMALIZE
    )(x)


def _backbone(x, dim, depth, kernel_size, patch_size, depthwise_impl, common):
    """The stem's and every block's outputs, by layer name."""
    x = PatchEmbed(dim, patch_size, name=structure.STEM, **common)(x)
    features = {structure.STEM: x}
    for i in range(depth):
        block = structure.block_name(i)
        x = features[block] = ConvMixerBlock(dim, kernel_size, depthwise_impl=depthwise_impl, name=block, **common)(x)
    return features


def _check_weights(spec, arch, include_top, classes, name):
    """What can be wrong with ``weights=`` before anything is built or downloaded; the released variant for
    ``"imagenet"`` (else None)."""
    if spec is not None and spec.kind == "keras_weights" and not os.path.exists(spec.text):
        raise FileNotFoundError(
            f"Weights file {spec.text!r} does not exist. For published weights pass "
            "weights='imagenet' or 'hf://owner/repo'."
        )
    if spec is not None and spec.kind == "imagenet":
        return pretrained.imagenet_for(arch, include_top=include_top, classes=classes, name=name)
    return None


def _stats(spec, arch, mean, std):
    """``mean``/``std`` as given; where not, the weights' own, else those of the variant with this shape (ImageNet's
    for a shape that is no variant: ``presets.eval_transform``)."""
    if mean is None or std is None:
        declared = pretrained.declared_meta(spec.text, arch) if spec is not None else None
        own = declared or presets.eval_transform(presets.variant_of(arch))
        mean = tuple(own["mean"]) if mean is None else mean
        std = tuple(own["std"]) if std is None else std
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {mean!r} and {std!r}.")
    return mean, std


def _inputs(input_shape, input_tensor, default_size):
    if input_tensor is not None:
        return input_tensor
    shape = tuple(input_shape) if input_shape is not None else (default_size, default_size, 3)
    if len(shape) != 3 or shape[-1] != 3:
        raise ValueError(f"input_shape must be (height, width, 3), got {shape!r}.")
    return keras.Input(shape=shape, name="images")


def _head(x, classes, classifier_activation, dropout, initializer, dim):
    x = layers.GlobalAveragePooling2D(name=structure.POOL)(x)
    if dropout:
        x = layers.Dropout(dropout, name=structure.DROPOUT)(x)
    # Under a mixed policy the head computes in float32, as Keras's mixed-precision guide says:
    # the loss and metrics then get float32 logits (TF's in_top_k rejects bf16/fp16 ones).
    head_dtype = "float32" if keras.mixed_precision.global_policy().name.startswith("mixed") else None
    dense = layers.Dense(
        classes,
        activation=classifier_activation,
        name=structure.HEAD,
        dtype=head_dtype,
        **dense_initializers(initializer, dim),
    )
    return dense(x)


def _pool(x, pooling):
    if pooling == "avg":
        return layers.GlobalAveragePooling2D(name=structure.POOL)(x)
    if pooling == "max":
        return layers.GlobalMaxPooling2D(name=structure.POOL)(x)
    return x


# Keras names the variable and both shapes inside a long multi-line message (the file's shape
# is backend-formatted, e.g. torch.Size([8])).
_SHAPE_MISMATCH = re.compile(
    r"variable\.shape=(\([^)]*\)), Received: value\.shape=(.+?)\. Target variable: <Variable path=([^,]+)"
)


def _load_weights(model, path):
    """A ``.weights.h5`` of this exact model (Keras's own format), or one line naming the first misfit."""
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


ConvMixer.__doc__ = model_docs.CONVMIXER_DOC


# ----------------------------------------------------------------------------- the named variants

# What a builder takes besides its own arguments: ConvMixer's, but for the architecture the variant fixes.
_PASSED_ON = ("dropout", "feature_extractor", "bn_momentum", "bn_epsilon", "depthwise_impl", "initializer")
_FIXED = (*presets.ARCHITECTURE_KEYS, "default_size")


def _variant(key, kwargs, **args):
    """Build variant ``key`` from its row and a builder's arguments; ``kwargs`` are the builder's ``**kwargs``."""
    row, builder = presets.MODEL_CONFIGS[key], presets.public_name(key)
    for arg in kwargs:
        if arg in _FIXED:
            hint = "pass input_shape" if arg == "default_size" else "build it with ConvMixer(...)"
            raise ValueError(f"{builder} fixes {arg}={row[arg]!r}: for another {arg.replace('_', ' ')}, {hint}.")
        if arg not in _PASSED_ON:
            raise TypeError(f"{builder}() got an unexpected keyword argument {arg!r}")
    return ConvMixer(**{k: row[k] for k in _FIXED}, **args, **kwargs)


def ConvMixer1536_20(
    *,
    include_top=True,
    include_preprocessing=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    mean=None,
    std=None,
    name="convmixer_1536_20",
    **kwargs,
):
    return _variant("convmixer_1536_20", **locals())


def ConvMixer768_32(
    *,
    include_top=True,
    include_preprocessing=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    mean=None,
    std=None,
    name="convmixer_768_32",
    **kwargs,
):
    return _variant("convmixer_768_32", **locals())


def ConvMixer1024_20(
    *,
    include_top=True,
    include_preprocessing=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    mean=None,
    std=None,
    name="convmixer_1024_20",
    **kwargs,
):
    return _variant("convmixer_1024_20", **locals())


def ConvMixer1536_24(
    *,
    include_top=True,
    include_preprocessing=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    mean=None,
    std=None,
    name="convmixer_1536_24",
    **kwargs,
):
    return _variant("convmixer_1536_24", **locals())


def ConvMixer1024_16(
    *,
    include_top=True,
    include_preprocessing=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    mean=None,
    std=None,
    name="convmixer_1024_16",
    **kwargs,
):
    return _variant("convmixer_1024_16", **locals())


def ConvMixer512_16(
    *,
    include_top=True,
    include_preprocessing=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    mean=None,
    std=None,
    name="convmixer_512_16",
    **kwargs,
):
    return _variant("convmixer_512_16", **locals())


def ConvMixer256_8(
    *,
    include_top=True,
    include_preprocessing=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=10,
    classifier_activation="softmax",
    mean=None,
    std=None,
    name="convmixer_256_8",
    **kwargs,
):
    return _variant("convmixer_256_8", **locals())


def ConvMixer256_16(
    *,
    include_top=True,
    include_preprocessing=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=10,
    classifier_activation="softmax",
    mean=None,
    std=None,
    name="convmixer_256_16",
    **kwargs,
):
    return _variant("convmixer_256_16", **locals())


BUILDERS = {
    "convmixer_1536_20": ConvMixer1536_20,
    "convmixer_768_32": ConvMixer768_32,
    "convmixer_1024_20": ConvMixer1024_20,
    "convmixer_1536_24": ConvMixer1536_24,
    "convmixer_1024_16": ConvMixer1024_16,
    "convmixer_512_16": ConvMixer512_16,
    "convmixer_256_8": ConvMixer256_8,
    "convmixer_256_16": ConvMixer256_16,
}
for _key, _builder in BUILDERS.items():
    _builder.__doc__ = model_docs.builder_doc(_key, passed_on=_PASSED_ON)

__all__ = ["BUILDERS", "ConvMixer", *(builder.__name__ for builder in BUILDERS.values()), "get_model"]


def get_model(name, pretrained=None, num_classes=None, **kwargs):
    """Build a registered variant by name, e.g. ``get_model("convmixer_256_8", classes=4)``.

    ``name`` is a registry key, a builder name or timm's name; ``kwargs`` are the builder's. timm's spellings are
    taken too: ``pretrained=True`` is ``weights="imagenet"`` and ``num_classes=N`` is ``classes=N``.
    """
    for timm_name, value, ours, meant in (
        ("pretrained", pretrained, "weights", "imagenet" if pretrained else None),
        ("num_classes", num_classes, "classes", num_classes),
    ):
        if value is None:
            continue
        if ours in kwargs:
            raise ValueError(f"get_model got both {timm_name}= (timm's spelling) and {ours}=: pass one of them.")
        kwargs[ours] = meant
    return BUILDERS[presets.canonical_name(name)](**kwargs)


def preprocess_input(x, variant=None):
    """Raw RGB pixels in [0, 255] -> what a model built with ``include_preprocessing=False`` expects:
    ``(x / 255 - mean) / std`` with ``variant``'s mean/std (ImageNet's for None or an unnamed shape, CIFAR-10's
    for the CIFAR variants), channels last. A NumPy array (or list) gives float32 NumPy, a tensor a tensor."""
    preset = presets.eval_transform(variant)
    if isinstance(x, (list, tuple, np.ndarray)):
        x = np.asarray(x, "float32")
        return ((x / 255.0 - np.asarray(preset["mean"], "float32")) / np.asarray(preset["std"], "float32")).astype(
            "float32"
        )
    x = keras.ops.cast(x, "float32")
    return (x / 255.0 - keras.ops.convert_to_tensor(preset["mean"])) / keras.ops.convert_to_tensor(preset["std"])
