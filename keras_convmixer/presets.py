"""The named ConvMixer variants and their data statistics, without importing Keras.

One row per variant holds everything the rest of the package needs to know about it: the
architecture, the input size and class count its builder defaults to, the normalisation and the
evaluation transform its published numbers were measured with. Configuration checks, command-line
parsers and converters read this module without paying for a Keras import.
"""

import re

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)

# The fields of a row that describe the network itself; the rest are defaults for the data around it.
ARCHITECTURE_KEYS = ("dim", "depth", "kernel_size", "patch_size", "activation")

# timm evaluates its ConvMixer checkpoints at 224 with a bicubic resize of the shorter side to 224/0.96,
# then a centre crop; the CIFAR script evaluates the 32x32 images as they are.
_IMAGENET = dict(
    default_size=224, classes=1000, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.96, interpolation="bicubic"
)
_CIFAR10 = dict(default_size=32, classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD, crop_pct=1.0, interpolation="bilinear")


def _row(dim, depth, kernel_size, patch_size, activation, data):
    return dict(dim=dim, depth=depth, kernel_size=kernel_size, patch_size=patch_size, activation=activation, **data)


MODEL_CONFIGS = {
    "convmixer_1536_20": _row(1536, 20, 9, 7, "gelu", _IMAGENET),
    # The released 768/32 weights were trained with ReLU.
    "convmixer_768_32": _row(768, 32, 7, 7, "relu", _IMAGENET),
    "convmixer_1024_20": _row(1024, 20, 9, 14, "gelu", _IMAGENET),
    "convmixer_1536_24": _row(1536, 24, 9, 14, "gelu", _IMAGENET),
    "convmixer_1024_16": _row(1024, 16, 9, 7, "gelu", _IMAGENET),
    "convmixer_512_16": _row(512, 16, 8, 7, "gelu", _IMAGENET),
    "convmixer_256_8": _row(256, 8, 5, 2, "gelu", _CIFAR10),
    "convmixer_256_16": _row(256, 16, 9, 1, "gelu", _CIFAR10),
}

# timm registers three of the variants, one of them under a longer name; checkpoints and their
# configs carry these names, so they are accepted wherever a variant is named.
TIMM_NAMES = {
    "convmixer_1536_20": "convmixer_1536_20",
    "convmixer_768_32": "convmixer_768_32",
    "convmixer_1024_20": "convmixer_1024_20_ks9_p14",
}
_FROM_TIMM = {timm: key for key, timm in TIMM_NAMES.items()}


def list_models():
    """Registry names accepted by ``get_model`` and ``--model``."""
    return sorted(MODEL_CONFIGS)


def public_name(key):
    """The builder's name for a registry key: ``"convmixer_256_8"`` -> ``"ConvMixer256_8"``."""
    return "ConvMixer" + key[len("convmixer_") :]


def canonical_name(name):
    """Map ``"ConvMixer1536_20"``, ``"convmixer-1536-20"``, timm's names etc. to a registry key."""
    key = re.sub(r"[-\s]", "_", str(name).strip().lower())
    if key.startswith("convmixer") and not key.startswith("convmixer_"):
        key = "convmixer_" + key[len("convmixer") :]
    key = _FROM_TIMM.get(key, key)
    if key not in MODEL_CONFIGS:
        raise ValueError(f"Unknown model {name!r}. Available: {', '.join(list_models())}.")
    return key


def trainable_params(dim, depth, kernel_size, patch_size, classes):
    """Trainable parameters of a ConvMixer with a classification head (BN statistics excluded)."""
    stem = 3 * dim * patch_size**2 + dim + 2 * dim
    block = (dim * kernel_size**2 + dim) + 2 * dim + (dim * dim + dim) + 2 * dim
    return stem + depth * block + dim * classes + classes


def eval_preset(name):
    """How a variant's published accuracy was measured: ``image_size``, ``crop_pct``, ``interpolation``,
    ``mean`` and ``std`` (fractions of 1), for evaluation, export and converted checkpoints."""
    row = MODEL_CONFIGS[canonical_name(name)]
    return dict(
        image_size=row["default_size"],
        crop_pct=row["crop_pct"],
        interpolation=row["interpolation"],
        mean=row["mean"],
        std=row["std"],
    )


# The released ImageNet-1k weights, like timm's ``pretrained_cfg``: where ``weights="imagenet"`` downloads each
# variant's from and its published top-1 (timm's results table, 224 px). How they are evaluated (size, crop,
# interpolation, normalisation) is the variant's row above: one definition, which these rows repeat for readers.
def _pretrained(key, hub_id, top1):
    row = MODEL_CONFIGS[key]
    return dict(
        hub_id=hub_id,
        filename="model.safetensors",
        mean=row["mean"],
        std=row["std"],
        crop_pct=row["crop_pct"],
        interpolation=row["interpolation"],
        image_size=row["default_size"],
        classes=row["classes"],
        top1=top1,
        license="mit",
    )


PRETRAINED = {
    "convmixer_1536_20": _pretrained("convmixer_1536_20", "timm/convmixer_1536_20.in1k", 81.37),
    "convmixer_768_32": _pretrained("convmixer_768_32", "timm/convmixer_768_32.in1k", 80.16),
    "convmixer_1024_20": _pretrained("convmixer_1024_20", "timm/convmixer_1024_20_ks9_p14.in1k", 76.94),
}
