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


def read_checkpoint(path, use_ema=False):
    """Read a checkpoint into ``{timm_name: np.ndarray}``.

    Accepts safetensors files and torch pickles (``.pth``/``.pth.tar``, with or
    without a ``state_dict`` wrapper or ``module.`` prefixes). Like timm's
    ``load_checkpoint``, a training checkpoint gives its ``state_dict`` (or
    ``model``); its EMA weights (``state_dict_ema``) only with ``use_ema=True``.
    """
    return _read(path, use_ema)[0]


def _read(path, use_ema=False):
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
    elif path.endswith(_TORCH_SUFFIXES):
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
    if activation is not None:
        activation_from = "given"
    elif variant:
        activation, activation_from = MODEL_CONFIGS[variant]["activation"], "variant"
    else:
        activation, activation_from = "gelu", "default"
    return dict(arch, activation=activation, variant=variant, activation_from=activation_from)


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


def _check_stats(name, values):
    """``mean``/``std`` as 3 fractions of 1 (timm's convention), or a one-line error naming the argument."""
    try:
        stats = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 3 numbers (R, G, B) as fractions of 1, got {values!r}.") from None
    low = 0.0 if name == "mean" else np.nextafter(0.0, 1.0)
    if len(stats) != 3 or not all(np.isfinite(v) and low <= v <= 1.0 for v in stats):
        hint = " (fractions of 1 as timm writes them, not 0-255)" if any(abs(v) > 1 for v in stats) else ""
        bound = "[0, 1]" if name == "mean" else "(0, 1]"
        raise ValueError(f"{name} must be 3 numbers in {bound}{hint}, got {values!r}.")
    return stats


def preprocessing_for(variant, *, image_size=None, mean=None, std=None):
    """What a converted checkpoint is fed and evaluated with: its variant's preset (timm's ConvMixer preset for
    a shape that matches no variant), with ``image_size``/``mean``/``std`` overriding it when given. Returns a
    dict of image_size, mean, std, crop_pct, interpolation and ``normalization_from`` ("preset" or "given")."""
    preset = checkpoint_eval_preset(variant)
    if image_size is None:
        image_size = preset["image_size"] if variant else 224
    elif isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive whole number, got {image_size!r}.")
    given = mean is not None or std is not None
    return dict(
        image_size=int(image_size),
        mean=_check_stats("mean", preset["mean"] if mean is None else mean),
        std=_check_stats("std", preset["std"] if std is None else std),
        crop_pct=preset["crop_pct"],
        interpolation=preset["interpolation"],
        normalization_from="given" if given else "preset",
    )


def build_from_checkpoint(path, *, variant=None, activation=None, image_size=None, mean=None, std=None, use_ema=False):
    """Read a checkpoint and return ``(model, arch)``; the model outputs logits.

    ``image_size`` defaults to the variant's size (32 for the CIFAR shapes, 224 otherwise), ``mean``/``std``
    (fractions of 1) to the variant's normalisation. ``arch`` holds dim, depth, kernel_size, patch_size,
    classes, activation and variant, and what was chosen around them: ``activation_from`` ("given",
    "variant" or "default"), ``weights_from`` (which state dict of the file), ``ema_key`` (the file's EMA
    entry, or None), and the preprocessing: image_size, mean, std, crop_pct, interpolation,
    ``normalization_from``.
    """
    from keras_convmixer.models import ConvMixer

    # The arguments are checked before a checkpoint of hundreds of MB is read.
    if image_size is not None:
        preprocessing_for(None, image_size=image_size)
    for name, values in (("mean", mean), ("std", std)):
        if values is not None:
            _check_stats(name, values)
    # A full-size checkpoint takes tens of seconds to read, build and copy: say where the time goes.
    start = time.perf_counter()
    state, taken, ema_key = _read(path, use_ema)
    arch = infer_config(state, variant=variant, activation=activation)
    prep = preprocessing_for(arch["variant"], image_size=image_size, mean=mean, std=std)
    arch.update(prep, weights_from=taken, ema_key=ema_key)
    image_size = prep["image_size"]
    logger.info(
        "Read %d tensors (%.0f MB, %s) from %s in %.1f s: ConvMixer-%d/%d, kernel %d, patch %d, %s, %d classes.",
        len(state),
        sum(np.asarray(v).nbytes for v in state.values()) / 1e6,
        taken,
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
    model = ConvMixer(
        arch["dim"],
        arch["depth"],
        arch["kernel_size"],
        arch["patch_size"],
        activation=arch["activation"],
        classes=arch["classes"],
        classifier_activation=None,
        input_shape=(image_size, image_size, 3),
        mean=prep["mean"],
        std=prep["std"],
        default_size=image_size,
        name=arch["variant"] or "convmixer",
    )
    logger.info("Built the Keras model at %d px (%.1f s).", image_size, time.perf_counter() - start)
    load_state_dict(model, state, depth=arch["depth"])
    logger.info("Copied the weights (%.1f s).", time.perf_counter() - start)
    return model, arch


def _imagenet_names():
    from keras_convmixer.imagenet import class_names

    return list(class_names())


def convert_checkpoint(
    path,
    output_dir,
    *,
    variant=None,
    activation=None,
    image_size=None,
    mean=None,
    std=None,
    use_ema=False,
    class_names=None,
):
    """Convert a checkpoint into ``output_dir``.

    Writes ``model.weights.h5`` (loadable by the matching builder, e.g.
    ``ConvMixer1536_20(weights=...)``), ``model.keras`` (logits) and a
    ``config.json`` in the run-directory format so that export, evaluate and
    predict accept ``output_dir`` directly. A 1000-class checkpoint without
    ``class_names`` gets ImageNet-1k's. Returns the config dict, with the
    choices made (``arch``) under ``"conversion"``.
    """
    if os.path.exists(os.path.join(output_dir, "config.json")):
        # It may be a training run: its best.keras would be paired with the converted config.
        raise ValueError(f"{output_dir} already holds a config.json (a run or a conversion): choose a new --output.")
    if class_names is not None:
        class_names = list(class_names)
    model, arch = build_from_checkpoint(
        path, variant=variant, activation=activation, image_size=image_size, mean=mean, std=std, use_ema=use_ema
    )
    names_from = "given"
    if class_names is None and arch["classes"] == 1000:
        class_names, names_from = _imagenet_names(), "ImageNet-1k"
    elif class_names is None:
        class_names, names_from = [f"class_{i}" for i in range(arch["classes"])], "numbered"
    elif len(class_names) != arch["classes"]:
        raise ValueError(f"Got {len(class_names)} class names for a checkpoint with {arch['classes']} classes.")
    os.makedirs(output_dir, exist_ok=True)
    model.save_weights(os.path.join(output_dir, "model.weights.h5"))
    rundir.save_model(model, os.path.join(output_dir, "model.keras"))
    kwargs = {k: arch[k] for k in ("dim", "depth", "kernel_size", "patch_size", "activation")}
    config = {
        "model": arch["variant"] or "custom",
        "model_kwargs": dict(kwargs, classes=arch["classes"]),
        "image_size": arch["image_size"],
        "num_classes": arch["classes"],
        "class_names": class_names,
        "crop_pct": arch["crop_pct"],
        "interpolation": arch["interpolation"],
        "mean": list(arch["mean"]),
        "std": list(arch["std"]),
        "data": None,
        "converted_from": os.path.abspath(os.fspath(path)),
        "conversion": {
            "weights_from": arch["weights_from"],
            "use_ema": bool(use_ema),
            "ema_in_file": arch["ema_key"],
            "activation_from": arch["activation_from"],
            "normalization_from": arch["normalization_from"],
            "class_names_from": names_from,
        },
    }
    rundir.write_json(os.path.join(output_dir, rundir.CONFIG), config)
    return config
