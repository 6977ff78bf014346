"""timm / official PyTorch ConvMixer checkpoints as tensors: read them, infer the architecture, port them.

A leaf under the model builder, in keras-hub's style: ``convert_backbone_config`` reads the architecture off a
state dict's shapes, and ``convert_weights`` / ``convert_head`` copy the backbone / the head into a model that
already exists, through one primitive, ``port_weight``. ``export_state`` is the inverse (a model's weights as a
timm-named state dict), which the weights cache stores. timm's ``model.safetensors`` is read with
``safetensors.numpy`` (no torch); the official ``.pth.tar`` needs torch. This module imports neither Keras nor
the model builder.
"""

import os

import numpy as np

from keras_convmixer import presets, structure
from keras_convmixer.errors import first_line

TORCH_SUFFIXES = (".pth", ".pth.tar", ".pt", ".tar", ".bin", ".ckpt")
CHECKPOINT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
_BN_PARTS = ("weight", "bias", "running_mean", "running_var")  # Keras: gamma, beta, moving mean/var


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def read_checkpoint(path, use_ema=False):
    """Read a checkpoint into ``{timm_name: np.ndarray}``.

    Accepts safetensors files and torch pickles (``.pth``/``.pth.tar``, with or
    without a ``state_dict`` wrapper or ``module.`` prefixes). Like timm's
    ``load_checkpoint``, a training checkpoint gives its ``state_dict`` (or
    ``model``); its EMA weights (``state_dict_ema``) only with ``use_ema=True``.
    """
    return open_checkpoint(path, use_ema)[0]


def open_checkpoint(path, use_ema=False):
    """``(state, taken, ema_key)``: the state dict, which part of the file it is, and the EMA entry the file
    holds (None when it has none)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {path!r} does not exist.")
    if path.endswith(".safetensors"):
        if use_ema:
            raise CheckpointError(
                f"{os.path.basename(path)!r} is a safetensors file: it holds one state dict and no EMA weights, "
                "so use_ema (--use-ema) does not apply."
            )
        state, taken, ema_key = _read_safetensors(path), "the safetensors state dict", None
    elif path.endswith(TORCH_SUFFIXES):
        state, taken, ema_key = _read_torch(path, use_ema)
    else:
        raise CheckpointError(
            f"Unknown checkpoint type {os.path.basename(path)!r}: expected a .safetensors file "
            "(timm) or a .pth/.pth.tar file (official release)."
        )
    return to_timm_names(state), taken, ema_key


def _read_safetensors(path):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path!r} is not a readable safetensors file (truncated or corrupt?): {first_line(err)}"
        ) from None


def _read_torch(path, use_ema=False):
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"Reading {os.path.basename(path)!r} needs PyTorch (pip install torch); "
            "safetensors checkpoints (timm's model.safetensors) convert without it."
        ) from None
    import argparse
    import pickle

    # timm's checkpoint saver stores its argparse Namespace next to the weights;
    # allow just that class so loading stays weights_only (no arbitrary code).
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError) as err:
        raise CheckpointError(
            f"{path!r} is not a readable PyTorch checkpoint (truncated or corrupt?): {first_line(err)}"
        ) from None
    obj, taken, ema_key = _pick_state_dict(path, obj, use_ema)
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path!r} holds no state dict (got {type(obj).__name__}).")
    state = {}
    for name, value in obj.items():
        if hasattr(value, "detach"):
            state[name] = value.detach().cpu().float().numpy() if value.is_floating_point() else value.numpy()
    return state, taken, ema_key


_WEIGHT_KEYS = ("state_dict", "model")  # timm's order for the trained weights
_EMA_KEYS = ("state_dict_ema", "model_ema")


def _pick_state_dict(path, obj, use_ema):
    """The state dict inside a training checkpoint: timm's choice, which never takes the EMA weights unasked."""
    if not isinstance(obj, dict):
        return obj, "the file's object", None
    ema_key = next((k for k in _EMA_KEYS if isinstance(obj.get(k), dict)), None)
    weight_key = next((k for k in _WEIGHT_KEYS if isinstance(obj.get(k), dict)), None)
    name = os.path.basename(path)
    if use_ema:
        if ema_key is None:
            raise CheckpointError(
                f"{name!r} has no EMA weights ({' or '.join(map(repr, _EMA_KEYS))}): convert without use_ema "
                "(--use-ema)."
            )
        return obj[ema_key], repr(ema_key), ema_key
    if weight_key is not None:
        return obj[weight_key], repr(weight_key), ema_key
    if ema_key is not None:
        raise CheckpointError(
            f"{name!r} holds only EMA weights ({ema_key!r}) and no 'state_dict': pass use_ema=True (--use-ema) "
            "to convert them."
        )
    return obj, "the top-level state dict", None


def to_timm_names(state):
    """Strip ``module.`` prefixes and map the official ``nn.Sequential`` names
    (``0.weight``, ``3.0.fn.0.weight``, ...) onto timm's (``stem.0.weight`` ...)."""
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}
    if "stem.0.weight" in state or "0.weight" not in state:
        return state
    # Official layout: 0 conv, 1 act, 2 BN, 3..3+d-1 blocks, then pool, flatten, Linear.
    indices = {int(k.split(".")[0]) for k in state if k.split(".")[0].isdigit()}
    head_index = max(indices)
    renamed = {}
    for key, value in state.items():
        first, _, rest = key.partition(".")
        if not first.isdigit():
            renamed[key] = value
            continue
        i = int(first)
        if i in (0, 2):
            renamed[f"stem.{i}.{rest}"] = value
        elif i == head_index:
            renamed[f"head.{rest}"] = value
        else:
            renamed[f"blocks.{i - 3}.{rest}"] = value
    return renamed


# --------------------------------------------------------------------------- the architecture


def convert_backbone_config(shapes, variant=None, activation=None):
    """Architecture from tensor shapes (``{name: shape}`` or a state dict).

    Returns a dict with dim, depth, kernel_size, patch_size, classes, activation, ``variant`` (registry key,
    or None when the shapes match no named variant) and ``activation_from`` ("given", "variant" or "default").
    ``variant`` (ours or timm's name) is checked against the shapes. ``activation`` defaults to the variant's;
    an unnamed architecture gets GELU unless it is given.
    """
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}
    arch = _shape_arch(shapes)
    matched = presets.variant_of(arch)
    if variant is not None:
        try:
            variant = presets.canonical_name(variant)
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        if variant != matched:
            cfg = presets.MODEL_CONFIGS[variant]
            raise CheckpointError(
                f"Checkpoint shapes give ConvMixer-{arch['dim']}/{arch['depth']} (k{arch['kernel_size']}, "
                f"p{arch['patch_size']}), not {variant} ({cfg['dim']}/{cfg['depth']}, k{cfg['kernel_size']}, "
                f"p{cfg['patch_size']})."
            )
    variant = matched
    if activation is not None:
        activation_from = "given"
    elif variant:
        activation, activation_from = presets.MODEL_CONFIGS[variant]["activation"], "variant"
    else:
        activation, activation_from = "gelu", "default"
    return dict(arch, activation=activation, variant=variant, activation_from=activation_from)


def _shape_arch(shapes):
    for key in ("stem.0.weight", "head.weight"):
        if key not in shapes:
            raise CheckpointError(
                f"Checkpoint has no tensor {key!r}: not a ConvMixer state dict "
                f"(first tensors: {', '.join(list(shapes)[:3]) or 'none'})."
            )
    dim, in_channels, patch, patch_w = shapes["stem.0.weight"]
    if in_channels != 3 or patch != patch_w:
        raise CheckpointError(f"'stem.0.weight' has shape {shapes['stem.0.weight']}: expected (dim, 3, p, p).")
    block_ids = structure.timm_block_ids(shapes)
    depth = len(block_ids)
    if block_ids != set(range(depth)):
        raise CheckpointError(f"Checkpoint blocks are not numbered 0..{depth - 1}: found {sorted(block_ids)}.")
    if depth == 0:
        raise CheckpointError("Checkpoint has no 'blocks.*' tensors: not a ConvMixer state dict.")
    if "blocks.0.0.fn.0.weight" not in shapes:
        raise CheckpointError("Checkpoint has no tensor 'blocks.0.0.fn.0.weight' (depthwise conv).")
    kernel = shapes["blocks.0.0.fn.0.weight"][-1]
    classes = shapes["head.weight"][0]
    return dict(dim=int(dim), depth=depth, kernel_size=int(kernel), patch_size=int(patch), classes=int(classes))


# --------------------------------------------------------------------------- porting


def _backbone_targets(model):
    """``(timm_name, keras_variable, layout)`` of the stem and every block, in checkpoint order."""
    stem = model.get_layer(structure.STEM)
    targets = [("stem.0.weight", stem.conv.kernel, "conv"), ("stem.0.bias", stem.conv.bias, None)]
    targets += _bn_targets("stem.2", stem.bn)
    for i in range(structure.depth(model)):
        block = model.get_layer(structure.block_name(i))
        targets += [
            (f"blocks.{i}.0.fn.0.weight", block.depthwise.kernel, "depthwise"),
            (f"blocks.{i}.0.fn.0.bias", block.depthwise.bias, None),
        ]
        targets += _bn_targets(f"blocks.{i}.0.fn.2", block.dw_bn)
        targets += [
            (f"blocks.{i}.1.weight", block.pointwise.kernel, "conv"),
            (f"blocks.{i}.1.bias", block.pointwise.bias, None),
        ]
        targets += _bn_targets(f"blocks.{i}.3", block.pw_bn)
    return targets


def _head_targets(model):
    head = model.get_layer(structure.HEAD)
    return [("head.weight", head.kernel, "dense"), ("head.bias", head.bias, None)]


def _bn_targets(prefix, bn):
    variables = (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance)
    return [(f"{prefix}.{part}", var, None) for part, var in zip(_BN_PARTS, variables, strict=True)]


# torch layout -> Keras layout; each is its own inverse's transpose.
_TO_KERAS = {
    "conv": (2, 3, 1, 0),  # (out, in, kh, kw) -> (kh, kw, in, out)
    "depthwise": (2, 3, 0, 1),  # (h, 1, k, k) -> (k, k, h, 1)
    "dense": (1, 0),  # (out, in) -> (in, out)
}


def port_weight(variable, state, name, layout=None):
    """The value of timm tensor ``name`` for the Keras ``variable``: transposed into Keras's layout and checked
    against the variable's shape (one line naming both otherwise). Assigning is left to the caller, so that a
    whole state dict is checked before any variable changes."""
    if name not in state:
        raise CheckpointError(f"Checkpoint is missing tensor {name!r}.")
    array = np.asarray(state[name])
    if layout is not None:
        array = np.transpose(array, _TO_KERAS[layout])
    if tuple(array.shape) != tuple(variable.shape):
        raise CheckpointError(
            f"Tensor {name!r} has shape {tuple(np.shape(state[name]))} (Keras layout {tuple(array.shape)}) "
            f"but {variable.path} expects {tuple(variable.shape)}."
        )
    return array


def _port(targets, state, ignore=()):
    """Check every tensor of ``targets``, and that ``state`` holds no other (but those of the ``ignore``
    groups), then assign them all."""
    values = [port_weight(variable, state, name, layout) for name, variable, layout in targets]
    known = {name for name, _, _ in targets}
    unexpected = [
        k
        for k in state
        if k not in known and not k.endswith("num_batches_tracked") and structure.timm_group(k) not in ignore
    ]
    if unexpected:
        raise CheckpointError(f"Checkpoint has tensors the model does not use, first: {unexpected[0]!r}.")
    for (_, variable, _), array in zip(targets, values, strict=True):
        variable.assign(array.astype(variable.dtype))


def convert_weights(model, state):
    """Copy the stem and every block of a timm-named state dict into ``model``; its head tensors are not used."""
    _port(_backbone_targets(model), state, ignore=("head",))
    return model


def convert_head(model, state):
    """Copy the head of a timm-named state dict into ``model``'s ``head`` layer."""
    _port(_head_targets(model), state, ignore=("stem", "blocks"))
    return model


def load_state_dict(model, state, head=True):
    """Copy a timm-named state dict into a ConvMixer built by ``ConvMixer``: the backbone, and the head with
    ``head=True``. Every tensor is checked before anything is assigned; the first missing, unexpected or
    mismatching tensor is named in the error."""
    targets = _backbone_targets(model) + (_head_targets(model) if head else [])
    _port(targets, state, ignore=() if head else ("head",))
    return model


def export_state(model, head=True):
    """``model``'s weights as a timm-named state dict of NumPy arrays (torch layouts), the inverse of
    ``load_state_dict``."""
    import keras

    targets = _backbone_targets(model) + (_head_targets(model) if head else [])
    state = {}
    for name, variable, layout in targets:
        array = keras.ops.convert_to_numpy(variable)
        if layout is not None:
            array = np.transpose(array, np.argsort(_TO_KERAS[layout]))
        state[name] = np.ascontiguousarray(array)
    return state
