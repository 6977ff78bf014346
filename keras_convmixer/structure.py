"""Which parts of a ConvMixer are its stem, its blocks and its head: the one statement of the naming contract.

A model built by ``models.ConvMixer`` names its layers ``normalize`` (optional), ``stem``, ``block_0`` ...
``block_<d-1>``, then ``pool``, ``dropout`` (optional) and ``head``; timm's state dicts name the same parts
``stem.*``, ``blocks.<i>.*`` and ``head.*`` (timm's ``group_matcher``). The backbone is the stem and the
blocks. Freezing, the grouped learning rate, weight porting, feature extraction and ``logits_model`` all
ask this module, so the contract is written once. No Keras import: it reads names and layer attributes.
"""

import re

NORMALIZE = "normalize"
STEM = "stem"
POOL = "pool"
DROPOUT = "dropout"
HEAD = "head"

_BLOCK = re.compile(r"^block_(\d+)$")
# Variable paths (``block_3/depthwise/kernel``) of the backbone, a regular expression as
# ``GroupedAdamW(scaled_variables=...)`` takes it.
BACKBONE_VARIABLES = r"^(stem|block_\d+)/"
# timm's group_matcher for its ConvMixer, over state-dict keys.
TIMM_GROUPS = {
    "stem": re.compile(r"^stem\."),
    "blocks": re.compile(r"^blocks\.(\d+)\."),
    "head": re.compile(r"^head\."),
}


def block_name(i):
    """The layer name of block ``i``."""
    return f"block_{i}"


def block_index(layer_name):
    """``i`` for ``block_<i>``, None for any other name."""
    found = _BLOCK.match(layer_name)
    return int(found.group(1)) if found else None


def is_backbone(layer_name):
    """Whether a layer of that name is part of the backbone (the stem or a block)."""
    return layer_name == STEM or block_index(layer_name) is not None


def backbone_layers(model):
    """The stem and every block of ``model``, in model order."""
    return [layer for layer in model.layers if is_backbone(layer.name)]


def has_layer(model, name):
    return any(layer.name == name for layer in model.layers)


def depth(model):
    """How many blocks ``model`` has."""
    return sum(1 for layer in model.layers if block_index(layer.name) is not None)


def timm_group(key):
    """``"stem"``, ``"blocks"`` or ``"head"`` for a timm state-dict key, None for anything else."""
    return next((group for group, pattern in TIMM_GROUPS.items() if pattern.match(key)), None)


def timm_block_ids(keys):
    """The block indices that timm-named ``keys`` hold."""
    return {int(found.group(1)) for key in keys if (found := TIMM_GROUPS["blocks"].match(key))}


def model_arch(model):
    """dim, depth, kernel_size, patch_size, activation and classes (None without a head) of a ConvMixer."""
    names = {layer.name: layer for layer in model.layers}
    if STEM not in names or block_name(0) not in names:
        raise ValueError(f"Model {model.name!r} is not a ConvMixer built by ConvMixer() (no 'stem'/'block_0' layer).")
    stem, block = names[STEM], names[block_name(0)]
    head = names.get(HEAD)
    return dict(
        dim=int(stem.dim),
        depth=depth(model),
        kernel_size=int(block.kernel_size),
        patch_size=int(stem.patch_size),
        activation=block.activation if isinstance(block.activation, str) else str(block.activation),
        classes=int(head.units) if head is not None else None,
    )


def describe(arch):
    """``ConvMixer-768/32 (kernel 7, patch 7)``, as error messages name an architecture."""
    return f"ConvMixer-{arch['dim']}/{arch['depth']} (kernel {arch['kernel_size']}, patch {arch['patch_size']})"
