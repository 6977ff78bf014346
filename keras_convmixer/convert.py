"""Convert timm / official PyTorch ConvMixer checkpoints into Keras models.

timm's ``model.safetensors`` is read with ``safetensors.numpy`` (no torch);
the official ``.pth.tar`` needs torch. The architecture (dim, depth, kernel,
patch, classes) is read off the tensor shapes; the activation comes from the
matching named variant (the released 768/32 uses ReLU), or is given.
"""

import logging
import os
import re
import time

import numpy as np

from keras_convmixer import rundir
from keras_convmixer.errors import first_line
from keras_convmixer.presets import MODEL_CONFIGS, TIMM_NAMES, canonical_name, eval_preset

_TORCH_SUFFIXES = (".pth", ".pth.tar", ".pt", ".tar", ".bin", ".ckpt")
_BN_PARTS = ("weight", "bias", "running_mean", "running_var")  # Keras: gamma, beta, moving mean/var
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


# --------------------------------------------------------------------------- reading


def read_checkpoint(path):
    """Read a checkpoint into ``{timm_name: np.ndarray}``.

    Accepts safetensors files and torch pickles (``.pth``/``.pth.tar``, with or
    without a ``state_dict`` wrapper or ``module.`` prefixes).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {path!r} does not exist.")
    if path.endswith(".safetensors"):
        state = _read_safetensors(path)
    elif path.endswith(_TORCH_SUFFIXES):
        state = _read_torch(path)
    else:
        raise CheckpointError(
            f"Unknown checkpoint type {os.path.basename(path)!r}: expected a .safetensors file "
            "(timm) or a .pth/.pth.tar file (official release)."
        )
    return to_timm_names(state)


def _read_safetensors(path):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path!r} is not a readable safetensors file (truncated or corrupt?): {first_line(err)}"
        ) from None


def _read_torch(path):
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
    if isinstance(obj, dict):
        for key in ("state_dict_ema", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path!r} holds no state dict (got {type(obj).__name__}).")
    state = {}
    for name, value in obj.items():
        if hasattr(value, "detach"):
            state[name] = value.detach().cpu().float().numpy() if value.is_floating_point() else value.numpy()
    return state


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


# --------------------------------------------------------------------------- detection


def infer_config(shapes, variant=None, activation=None):
    """Architecture from tensor shapes (``{name: shape}`` or a state dict).

    Returns a dict with dim, depth, kernel_size, patch_size, classes,
    activation and ``variant`` (registry name, or None when the shapes match
    no named variant). ``activation`` defaults to the variant's; an unnamed
    architecture needs it given unless it is the default GELU.
    """
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}
    for key in ("stem.0.weight", "head.weight"):
        if key not in shapes:
            raise CheckpointError(
                f"Checkpoint has no tensor {key!r}: not a ConvMixer state dict "
                f"(first tensors: {', '.join(list(shapes)[:3]) or 'none'})."
            )
    dim, in_channels, patch, patch_w = shapes["stem.0.weight"]
    if in_channels != 3 or patch != patch_w:
        raise CheckpointError(f"'stem.0.weight' has shape {shapes['stem.0.weight']}: expected (dim, 3, p, p).")
    block_ids = {int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.match(k))}
    depth = len(block_ids)
    if block_ids != set(range(depth)):
        raise CheckpointError(f"Checkpoint blocks are not numbered 0..{depth - 1}: found {sorted(block_ids)}.")
    if depth == 0:
        raise CheckpointError("Checkpoint has no 'blocks.*' tensors: not a ConvMixer state dict.")
    if "blocks.0.0.fn.0.weight" not in shapes:
        raise CheckpointError("Checkpoint has no tensor 'blocks.0.0.fn.0.weight' (depthwise conv).")
    kernel = shapes["blocks.0.0.fn.0.weight"][-1]
    classes = shapes["head.weight"][0]
    arch = dict(dim=int(dim), depth=depth, kernel_size=int(kernel), patch_size=int(patch), classes=int(classes))

    matched = [
        name
        for name, cfg in MODEL_CONFIGS.items()
        if all(cfg[k] == arch[k] for k in ("dim", "depth", "kernel_size", "patch_size"))
    ]
    if variant is not None:
        variant = _variant_key(variant)
        if variant not in matched:
            cfg = MODEL_CONFIGS[variant]
            raise CheckpointError(
                f"Checkpoint shapes give ConvMixer-{dim}/{depth} (k{kernel}, p{patch}), "
                f"not {variant} ({cfg['dim']}/{cfg['depth']}, k{cfg['kernel_size']}, p{cfg['patch_size']})."
            )
    elif matched:
        variant = matched[0]
    if activation is None:
        activation = MODEL_CONFIGS[variant]["activation"] if variant else "gelu"
    return dict(arch, activation=activation, variant=variant)


def _variant_key(name):
    """Registry key for ours or timm's names (``convmixer_1024_20_ks9_p14``, with or without a pretrained tag
    such as ``.in1k``)."""
    try:
        return canonical_name(str(name).strip().split(".")[0])
    except ValueError as err:
        raise CheckpointError(str(err)) from None


# --------------------------------------------------------------------------- loading


def _keras_targets(model, depth):
    """``(timm_name, keras_variable, layout)`` in checkpoint order."""
    stem = model.get_layer("stem")
    targets = [("stem.0.weight", stem.conv.kernel, "conv"), ("stem.0.bias", stem.conv.bias, None)]
    targets += _bn_targets("stem.2", stem.bn)
    for i in range(depth):
        block = model.get_layer(f"block_{i}")
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
    head = model.get_layer("head")
    targets += [("head.weight", head.kernel, "dense"), ("head.bias", head.bias, None)]
    return targets


def _bn_targets(prefix, bn):
    variables = (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance)
    return [(f"{prefix}.{part}", var, None) for part, var in zip(_BN_PARTS, variables, strict=True)]


def _to_keras_layout(array, layout):
    if layout == "conv":  # (out, in, kh, kw) -> (kh, kw, in, out)
        return np.transpose(array, (2, 3, 1, 0))
    if layout == "depthwise":  # (h, 1, k, k) -> (k, k, h, 1)
        return np.transpose(array, (2, 3, 0, 1))
    if layout == "dense":  # (out, in) -> (in, out)
        return np.transpose(array)
    return array


def load_state_dict(model, state, depth=None):
    """Copy a timm-named state dict into a ConvMixer built by ``ConvMixer``.

    Every tensor is checked before anything is assigned; the first missing,
    unexpected or mismatching tensor is named in the error.
    """
    if depth is None:
        depth = sum(1 for layer in model.layers if layer.name.startswith("block_"))
    targets = _keras_targets(model, depth)
    values = []
    for name, variable, layout in targets:
        if name not in state:
            raise CheckpointError(f"Checkpoint is missing tensor {name!r}.")
        array = _to_keras_layout(np.asarray(state[name]), layout)
        if tuple(array.shape) != tuple(variable.shape):
            raise CheckpointError(
                f"Tensor {name!r} has shape {tuple(np.shape(state[name]))} (Keras layout {tuple(array.shape)}) "
                f"but {variable.path} expects {tuple(variable.shape)}."
            )
        values.append(array)
    known = {name for name, _, _ in targets}
    unexpected = [k for k in state if k not in known and not k.endswith("num_batches_tracked")]
    if unexpected:
        raise CheckpointError(f"Checkpoint has tensors the model does not use, first: {unexpected[0]!r}.")
    for (_, variable, _), array in zip(targets, values, strict=True):
        variable.assign(array.astype(variable.dtype))
    return model


def checkpoint_eval_preset(variant):
    """The eval transform and normalisation a checkpoint was trained and measured with: its variant's, and for
    a shape that matches no named variant, that of timm's ConvMixer checkpoints (which all share one)."""
    return eval_preset(variant or next(iter(TIMM_NAMES)))


def build_from_checkpoint(path, *, variant=None, activation=None, image_size=224):
    """Read a checkpoint and return ``(model, arch)``; the model outputs logits."""
    from keras_convmixer.models import ConvMixer

    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive whole number, got {image_size!r}.")
    image_size = int(image_size)
    # A full-size checkpoint takes tens of seconds to read, build and copy: say where the time goes.
    start = time.perf_counter()
    state = read_checkpoint(path)
    arch = infer_config(state, variant=variant, activation=activation)
    logger.info(
        "Read %d tensors (%.0f MB) from %s in %.1f s: ConvMixer-%d/%d, kernel %d, patch %d, %s, %d classes.",
        len(state),
        sum(np.asarray(v).nbytes for v in state.values()) / 1e6,
        path,
        time.perf_counter() - start,
        arch["dim"],
        arch["depth"],
        arch["kernel_size"],
        arch["patch_size"],
        arch["activation"],
        arch["classes"],
    )
    if image_size % arch["patch_size"]:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {arch['patch_size']}.")
    preset = checkpoint_eval_preset(arch["variant"])
    model = ConvMixer(
        arch["dim"],
        arch["depth"],
        arch["kernel_size"],
        arch["patch_size"],
        activation=arch["activation"],
        classes=arch["classes"],
        classifier_activation=None,
        input_shape=(image_size, image_size, 3),
        mean=preset["mean"],
        std=preset["std"],
        name=arch["variant"] or "convmixer",
    )
    logger.info("Built the Keras model at %d px (%.1f s).", image_size, time.perf_counter() - start)
    load_state_dict(model, state, depth=arch["depth"])
    logger.info("Copied the weights (%.1f s).", time.perf_counter() - start)
    return model, arch


def convert_checkpoint(path, output_dir, *, variant=None, activation=None, image_size=224, class_names=None):
    """Convert a checkpoint into ``output_dir``.

    Writes ``model.weights.h5`` (loadable by the matching builder, e.g.
    ``ConvMixer1536_20(weights=...)``), ``model.keras`` (logits) and a
    ``config.json`` in the run-directory format so that export, evaluate and
    predict accept ``output_dir`` directly. Returns the config dict.
    """
    if os.path.exists(os.path.join(output_dir, "config.json")):
        # It may be a training run: its best.keras would be paired with the converted config.
        raise ValueError(f"{output_dir} already holds a config.json (a run or a conversion): choose a new --output.")
    model, arch = build_from_checkpoint(path, variant=variant, activation=activation, image_size=image_size)
    if class_names is None:
        class_names = [f"class_{i}" for i in range(arch["classes"])]
    elif len(class_names) != arch["classes"]:
        raise ValueError(f"Got {len(class_names)} class names for a checkpoint with {arch['classes']} classes.")
    os.makedirs(output_dir, exist_ok=True)
    model.save_weights(os.path.join(output_dir, "model.weights.h5"))
    rundir.save_model(model, os.path.join(output_dir, "model.keras"))
    kwargs = {k: arch[k] for k in ("dim", "depth", "kernel_size", "patch_size", "activation")}
    preset = checkpoint_eval_preset(arch["variant"])
    config = {
        "model": arch["variant"] or "custom",
        "model_kwargs": dict(kwargs, classes=arch["classes"]),
        "image_size": image_size,
        "num_classes": arch["classes"],
        "class_names": list(class_names),
        "crop_pct": preset["crop_pct"],
        "interpolation": preset["interpolation"],
        "mean": list(preset["mean"]),
        "std": list(preset["std"]),
        "data": None,
        "converted_from": os.path.abspath(os.fspath(path)),
    }
    rundir.write_json(os.path.join(output_dir, rundir.CONFIG), config)
    return config
