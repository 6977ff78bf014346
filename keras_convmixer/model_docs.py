"""The docstrings of ``ConvMixer`` and of the variant builders: one text per argument, one template per builder.

Kept apart from ``models`` so that the builders there stay short to read; no Keras import.
"""

import textwrap

from keras_convmixer import presets

# The arguments every builder shares with ConvMixer, in one text for both docstrings.
COMMON_ARGS = """    include_top: whether to end with the classifier: global average pooling, optional dropout and a
        dense layer. Defaults to `True`.
    include_preprocessing: whether the model takes raw pixels in [0, 255] and normalises them itself with
        `mean` and `std`. Defaults to `True`.
    input_shape: `(height, width, 3)`; `(None, None, 3)` accepts any size that is a multiple of the patch
        size. Defaults to `({size}, {size}, 3)`.
    input_tensor: optional Keras tensor (the output of `keras.Input()`) to use as the image input.
    pooling: with `include_top=False`: `None` returns the last feature map, `"avg"` or `"max"` pooled
        features. Defaults to `None`.
    classes: number of classes of the head. Defaults to `{classes}`.
    classifier_activation: activation of the head; `None` returns logits. Defaults to `"softmax"`.
    weights: `None` (random initialisation); `"imagenet"` (the released ImageNet-1k weights, downloaded
        from the Hugging Face Hub on first use and cached under `~/.keras/models/convmixer`; with
        `include_top=True` it needs `classes=1000`); `"hf://owner/repo"` or `"hf://owner/repo@revision"`
        (any timm-format ConvMixer repository); or a local path: a `.weights.h5` of this exact model, a
        timm/official checkpoint (`.safetensors`, `.pth`, `.pth.tar`), a `.keras` file or a run directory.
        With `include_top=False` the backbone alone is loaded. Defaults to `None`.
    mean: per-channel RGB mean of the built-in normalisation, as fractions of 1. Defaults to `None`: the
        weights' own with pretrained `weights`, else {stats}.
    std: per-channel RGB standard deviation of the built-in normalisation, as fractions of 1. Defaults to
        `None`, as `mean`.
"""


CONVMIXER_DOC = """Instantiates a ConvMixer-dim/depth as a functional `keras.Model`.

Reference:
- [Patches Are All You Need?](https://arxiv.org/abs/2201.09792) (Trockman & Kolter, TMLR 2023)

The named variants have their own builders (`ConvMixer1536_20`, ... see `list_models()`).

Args:
    dim: channels of every layer after the stem (h in the paper).
    depth: number of ConvMixer blocks (d).
    kernel_size: side of the depthwise kernels (k).
    patch_size: side and stride of the patch-embedding convolution (p); the input's height and width
        must be multiples of it.
    activation: `"gelu"` (the exact erf form, as PyTorch's `nn.GELU`), `"relu"` or any name
        `keras.activations.get` accepts. Defaults to `"gelu"`.
{common}    dropout: dropout rate before the head. Defaults to `0.0`.
    feature_extractor: return a dict of the stem's and every block's feature maps instead. Defaults to `False`.
    bn_momentum: BatchNorm momentum in Keras's convention (PyTorch's 0.1 is 0.9 here). Defaults to `0.9`.
    bn_epsilon: BatchNorm epsilon (PyTorch's default). Defaults to `1e-05`.
    default_size: input side when `input_shape` is not given. Defaults to `224`.
    depthwise_impl: `"auto"`, `"keras"`, `"xla"` or `"fast"`: how the depthwise convolutions run; it does
        not change the weights. Defaults to `"auto"`.
    initializer: `"torch"` starts every convolution and the head as PyTorch's `nn.Conv2d`/`nn.Linear` do,
        U(+-1/sqrt(fan_in)) for kernels and biases, which the published models were trained from; `"keras"`
        keeps Keras's `glorot_uniform` kernels and zero biases. BatchNorm starts at gamma=1, beta=0.
        Defaults to `"torch"`.
    name: the model's name. Defaults to `"convmixer"`.

Returns:
    A `keras.Model`.
"""

CONVMIXER_DOC = CONVMIXER_DOC.replace(
    "{common}",
    COMMON_ARGS.format(size="default_size", classes=1000, stats="the variant's with this shape, else ImageNet's"),
)


_BUILDER_DOC = """Instantiates ConvMixer-{dim}/{depth} (kernel {kernel_size}, patch {patch_size}, {activation}),
registry name `{key}`.

Reference:
- [Patches Are All You Need?](https://arxiv.org/abs/2201.09792) (Trockman & Kolter, TMLR 2023)

Defaults: {size}x{size}x3 input in [0, 255], {classes} classes, {stats} normalisation inside the model; {params:,}
trainable parameters at these defaults (BatchNorm statistics excluded). Evaluated at {size}x{size}, crop_pct
{crop_pct}, {interpolation} resizing (`presets.eval_preset({key!r})`).

{released}

Args:
{common}    name: the model's name. Defaults to `"{key}"`.
    **kwargs: any other keyword argument of `ConvMixer` ({passed_on}); the architecture is fixed.

Returns:
    A `keras.Model`.
"""


def builder_doc(key, passed_on):
    """The docstring of variant ``key``'s builder; ``passed_on`` names the ConvMixer arguments its ``**kwargs`` take."""
    row = presets.MODEL_CONFIGS[key]
    stats = {presets.IMAGENET_MEAN: "ImageNet", presets.CIFAR10_MEAN: "CIFAR-10"}.get(tuple(row["mean"]), "custom")
    if key in presets.PRETRAINED:
        hub = presets.PRETRAINED[key]
        released = (
            f'`weights="imagenet"` loads the released ImageNet-1k weights from the Hugging Face Hub ({hub["hub_id"]}, '
            f"top-1 {hub['top1']}% at {hub['image_size']} px, {hub['license'].upper()} licence)."
        )
    else:
        released = (
            'No ImageNet weights were released for this variant (`weights="imagenet"` works for '
            f"{', '.join(presets.released_variants())})."
        )
    size = row["default_size"]
    return _BUILDER_DOC.format(
        key=key,
        size=size,
        stats=stats,
        released=textwrap.fill(released, 110),
        activation={"gelu": "GELU", "relu": "ReLU"}.get(row["activation"], row["activation"]),
        params=presets.trainable_params(
            row["dim"], row["depth"], row["kernel_size"], row["patch_size"], row["classes"]
        ),
        passed_on=", ".join(passed_on),
        common=COMMON_ARGS.format(size=size, classes=row["classes"], stats=f"{stats}'s"),
        **{k: row[k] for k in ("dim", "depth", "kernel_size", "patch_size", "classes", "crop_pct", "interpolation")},
    )
