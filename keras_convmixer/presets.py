"""The named ConvMixer variants and their data statistics, without importing Keras.

One row per variant holds everything the rest of the package needs to know about it: the
architecture, the input size and class count its builder defaults to, the normalisation and the
evaluation transform its published numbers were measured with. This module is also the one lookup
for a variant: by name (``canonical_name``, ``variant_named``), by architecture (``variant_of``), for
its eval transform (``eval_transform``, with ``UNNAMED_EVAL`` for a shape that is no variant) and
for its default class names (``default_class_names``). Configuration checks, command-line parsers
and converters read it without paying for a Keras import.
"""

import re

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)

# The fields of a row that describe the network itself; the rest are defaults for the data around it.
ARCHITECTURE_KEYS = ("dim", "depth", "kernel_size", "patch_size", "activation")
# What tensor shapes can tell: the activation is not in the weights.
SHAPE_KEYS = ARCHITECTURE_KEYS[:4]

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
    """Map ``"ConvMixer1536_20"``, ``"convmixer-1536-20"``, timm's names (with or without a pretrained tag
    such as ``.in1k``) etc. to a registry key; an unknown name is a one-line ValueError naming the keys."""
    key = re.sub(r"[-\s]", "_", str(name).strip().lower()).split(".")[0]
    if key.startswith("convmixer") and not key.startswith("convmixer_"):
        key = "convmixer_" + key[len("convmixer") :]
    key = _FROM_TIMM.get(key, key)
    if key not in MODEL_CONFIGS:
        raise ValueError(f"Unknown model {name!r}. Available: {', '.join(list_models())}.")
    return key


def variant_named(name):
    """``canonical_name(name)``, or None where ``name`` (a model's name, say) is no variant's."""
    try:
        return canonical_name(name)
    except ValueError:
        return None


def variant_of(arch):
    """The registry key of the variant with this shape (``arch`` holds at least ``SHAPE_KEYS``), or None.
    The activation is not compared: tensor shapes do not show it."""
    for key, row in MODEL_CONFIGS.items():
        if all(row[k] == arch[k] for k in SHAPE_KEYS):
            return key
    return None


def trainable_params(dim, depth, kernel_size, patch_size, classes):
    """Trainable parameters of a ConvMixer with a classification head (BN statistics excluded)."""
    stem = 3 * dim * patch_size**2 + dim + 2 * dim
    block = (dim * kernel_size**2 + dim) + 2 * dim + (dim * dim + dim) + 2 * dim
    return stem + depth * block + dim * classes + classes


def eval_preset(name):
    """How a variant's published accuracy was measured: ``image_size``, ``crop_pct``, ``interpolation``,
    ``mean`` and ``std`` (fractions of 1), for evaluation, export and converted checkpoints."""
    row = MODEL_CONFIGS[canonical_name(name)]
    return {k: row[_EVAL_FIELDS[k]] for k in _EVAL_FIELDS}


_EVAL_FIELDS = dict(
    image_size="default_size", crop_pct="crop_pct", interpolation="interpolation", mean="mean", std="std"
)

# The one fallback for a ConvMixer whose shape is no named variant (a converted checkpoint, a Hub
# repository, a bare .keras file): the transform timm gives every ConvMixer it registers, which all
# published ConvMixer weights were measured with.
UNNAMED_EVAL = dict(image_size=224, crop_pct=0.96, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)


def eval_transform(variant):
    """``eval_preset(variant)`` for a registry key or name, ``UNNAMED_EVAL`` for None or an unknown name."""
    key = variant_named(variant) if variant is not None else None
    return eval_preset(key) if key else dict(UNNAMED_EVAL)


def default_class_names(variant, classes):
    """The class names a model that names none is taken to have: ImageNet-1k's for a 1000-class head on one
    of the ImageNet variants (a released builder's default head, as ``keras.applications`` takes it), else
    None (the caller numbers them or leaves them unknown)."""
    key = variant_named(variant) if variant is not None else None
    if classes != 1000 or key is None or MODEL_CONFIGS[key]["classes"] != 1000:
        return None
    from keras_convmixer.imagenet import class_names

    return class_names()


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


def released_variants():
    """The builders that ``weights="imagenet"`` works for."""
    return [public_name(key) for key in PRETRAINED]


def imagenet_variant(variant):
    """The registry key of a variant with released ImageNet weights, or one line naming the ones that have them."""
    key = canonical_name(variant) if variant is not None else None
    if key not in PRETRAINED:
        named = f"{public_name(key)} has none" if key else "no variant was named"
        raise ValueError(
            f"weights='imagenet' exists for {', '.join(released_variants())} only ({named}): "
            "pass weights=None, a local path or 'hf://owner/repo'."
        )
    return key


def released_repo(repo):
    """The registry key whose released weights live in the Hub repository ``repo``, or None."""
    return next((key for key, row in PRETRAINED.items() if row["hub_id"] == repo), None)
