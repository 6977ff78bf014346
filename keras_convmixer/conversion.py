"""Convert timm / official PyTorch ConvMixer checkpoints into Keras models and converted folders.

Above the model builder: ``build_from_checkpoint`` builds the model with ``models.ConvMixer`` and ports the
tensors with ``convert`` (the leaf that reads them and infers the architecture); ``convert_checkpoint`` (the
convmixer-convert command) writes the result as a folder that works as a run directory. The architecture is
read off the tensor shapes; the activation comes from the matching named variant (the released 768/32 uses
ReLU), or is given.
"""

import logging
import os
import time

import numpy as np

from keras_convmixer import artifacts, atomic, convert, presets, rundir
from keras_convmixer.models import ConvMixer

logger = logging.getLogger(__name__)


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
    preset = presets.eval_transform(variant)
    if image_size is None:
        image_size = preset["image_size"]
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
    # The arguments are checked before a checkpoint of hundreds of MB is read.
    if image_size is not None:
        preprocessing_for(None, image_size=image_size)
    for name, values in (("mean", mean), ("std", std)):
        if values is not None:
            _check_stats(name, values)
    # A full-size checkpoint takes tens of seconds to read, build and copy: say where the time goes.
    start = time.perf_counter()
    state, taken, ema_key = convert.open_checkpoint(path, use_ema)
    arch = convert.convert_backbone_config(state, variant=variant, activation=activation)
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
    convert.load_state_dict(model, state)
    logger.info("Copied the weights (%.1f s).", time.perf_counter() - start)
    return model, arch


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
    predict accept ``output_dir`` directly. Without ``class_names``, a 1000-class
    checkpoint of an ImageNet variant's shape gets ImageNet-1k's
    (``presets.default_class_names``), any other numbered ones. Returns the config dict, with the
    choices made (``arch``) under ``"conversion"``.
    """
    blocker = atomic.file_in_the_way(output_dir)
    if blocker:
        where = "is a file" if blocker == os.path.abspath(output_dir) else f"is under {blocker!r}, a file"
        raise ValueError(f"--output {output_dir!r} {where}, not a folder: choose a folder.")
    if os.path.exists(os.path.join(output_dir, "config.json")):
        # It may be a training run: its best.keras would be paired with the converted config.
        raise ValueError(f"{output_dir} already holds a config.json (a run or a conversion): choose a new --output.")
    if class_names is not None:
        class_names = list(class_names)
    model, arch = build_from_checkpoint(
        path, variant=variant, activation=activation, image_size=image_size, mean=mean, std=std, use_ema=use_ema
    )
    class_names, names_from = _class_names(class_names, arch)
    os.makedirs(output_dir, exist_ok=True)
    atomic.save_weights(model, os.path.join(output_dir, "model.weights.h5"))
    config = _folder_config(path, arch, class_names, names_from, use_ema)
    atomic.save_model(model, os.path.join(output_dir, "model.keras"), entries=artifacts.preset_entries(config))
    atomic.write_json(os.path.join(output_dir, rundir.CONFIG), config)
    return config


def _class_names(class_names, arch):
    """The names a converted folder records, and where they came from ("given", "ImageNet-1k" or "numbered")."""
    if class_names is not None:
        if len(class_names) != arch["classes"]:
            raise ValueError(f"Got {len(class_names)} class names for a checkpoint with {arch['classes']} classes.")
        return class_names, "given"
    names = presets.default_class_names(arch["variant"], arch["classes"])
    if names is not None:
        return list(names), "ImageNet-1k"
    return [f"class_{i}" for i in range(arch["classes"])], "numbered"


def _folder_config(path, arch, class_names, names_from, use_ema):
    """config.json of a converted folder, in the run-directory format."""
    kwargs = {k: arch[k] for k in presets.ARCHITECTURE_KEYS}
    return {
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
