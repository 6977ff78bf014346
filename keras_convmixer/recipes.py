"""Training recipes, the resolution of a training config and the checks that relate its settings.

A recipe lists what it changes from ``settings.BASE``. ``resolve_config(recipe, overrides)`` gives the
one flat, JSON-able dict of settings (plus ``recipe``, ``from_weights`` and ``model_kwargs``, derived
from them) that ``training.train`` runs; ``check_config(cfg)`` raises a one-line ValueError naming the
flag for every value out of range, out of vocabulary or at odds with another. This module imports
neither Keras nor a backend, so the command line can parse, resolve and reject a config before paying
for those imports.
"""

import datetime
import json
import math
import os
import sys

from keras_convmixer import presets
from keras_convmixer.cache import keras_home
from keras_convmixer.presets import (
    ARCHITECTURE_KEYS,
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODEL_CONFIGS,
    canonical_name,
)
from keras_convmixer.settings import BASE, BY_NAME, REQUIRED_SETTINGS, STRATEGY_BACKEND, check_values, coerce
from keras_convmixer.vocabulary import parse_spec

# What a run started from pretrained weights takes from them unless the command line or the config
# file sets it: the normalisation and the eval transform the weights were trained and measured with.
WEIGHTS_META_KEYS = ("mean", "std", "crop_pct", "interpolation", "image_size")

# What each recipe changes from BASE. imagenet: the paper's timm command; cifar10: the official CIFAR
# script's 25-epoch setting (AdamW with torch's default eps, which BASE has, as the script sets none).
RECIPES = {
    "imagenet": dict(
        model="convmixer_1536_20",
        data="tfds:imagenet2012",
        image_size=224,
        epochs=150,
        batch_size=640,
        lr=0.01,
        epsilon=1e-3,
        weight_decay=2e-5,
        clip_norm=1.0,
        train_interpolation="random",
        randaug_n=2,
        randaug_m=9,
        randaug_mstd=0.5,
        reprob=0.25,
        mixup_alpha=0.5,
        cutmix_alpha=0.5,
        label_smoothing=0.1,
        crop_pct=0.96,
        interpolation="bicubic",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    ),
    "cifar10": dict(
        model="convmixer_256_8",
        data="tfds:cifar10",
        image_size=32,
        epochs=25,
        batch_size=512,
        lr=0.05,
        weight_decay=0.005,
        wd_exclude_bias_bn=False,  # weight decay on all parameters
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        randaug_n=2,
        randaug_m=12,
        randaug_scale="torchvision",
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
    ),
    # Small ConvMixer on sklearn digits: a few minutes on a 2-core CPU, well above 90% val top-1.
    "demo": dict(
        model="custom",
        dim=96,
        depth=4,
        kernel_size=3,
        patch_size=4,
        image_size=16,
        epochs=10,
        batch_size=64,
        lr=0.01,
        epsilon=1e-3,
        weight_decay=0.005,
        clip_norm=1.0,
        crop_scale=(0.5, 1.0),
        hflip=0.0,
        label_smoothing=0.1,
        precision="float32",
    ),
}
DEFAULT_RECIPE = "demo"


def recipe_value(recipe, key):
    """What ``recipe`` sets ``key`` to before any override (the architecture of a named model included)."""
    cfg = {**BASE, **RECIPES[recipe]}
    if key in ARCHITECTURE_KEYS and cfg["model"] != "custom":
        return MODEL_CONFIGS[cfg["model"]][key]
    return cfg[key]


def keras_backend():
    """The backend Keras runs (or will run) on, found as Keras finds it but without importing it:
    ``KERAS_BACKEND``, else ``keras.json`` in ``KERAS_HOME`` or ``~/.keras``, else tensorflow."""
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "backend"):
        return keras.backend.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    try:
        with open(os.path.join(keras_home(), "keras.json")) as f:
            return json.load(f).get("backend") or "tensorflow"
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def resolve_config(recipe=DEFAULT_RECIPE, overrides=None):
    """Recipe values, then ``overrides`` (None values are ignored), checked; JSON-able."""
    if recipe not in RECIPES:
        raise ValueError(f"Unknown recipe {recipe!r}. Available: {', '.join(RECIPES)}.")
    cfg = {**BASE, **RECIPES[recipe], "recipe": recipe}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key, value in given.items():
        if key not in BY_NAME:
            raise ValueError(f"Unknown config key {key!r}.")
        cfg[key] = value
    # Recorded so that training (which reads the weights' metadata) knows what it may replace.
    cfg["from_weights"] = [k for k in WEIGHTS_META_KEYS if k not in given] if cfg["weights"] else []
    if cfg["model"] != "custom":
        _take_architecture(cfg, given)
    if cfg["weights"] == "imagenet" and cfg["model"] in presets.PRETRAINED:
        # The published models' metadata is known without loading them; checked with the rest below.
        apply_weights_meta(cfg, pretrained_meta(cfg["model"]), check=False)
    check_config(cfg)
    coerce(cfg)
    cfg["crop_scale"], cfg["crop_ratio"] = list(cfg["crop_scale"]), list(cfg["crop_ratio"])
    own = MODEL_CONFIGS.get(cfg["model"], {})  # the model's own normalisation (ImageNet's for a custom model)
    for key, fallback in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        cfg[key] = [float(v) for v in (own.get(key, fallback) if cfg[key] is None else cfg[key])]
    cfg["model_kwargs"] = model_kwargs(cfg)
    if cfg["output_dir"] is None:
        cfg["output_dir"] = os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return cfg


def _take_architecture(cfg, given):
    """A named model brings its architecture; a given value that differs from it is refused (one that
    agrees is what a printed config or a run's config.json restates)."""
    cfg["model"] = canonical_name(cfg["model"])  # one-line ValueError naming the choices
    row = MODEL_CONFIGS[cfg["model"]]
    other = [k for k in ARCHITECTURE_KEYS if k in given and given[k] != row[k]]
    if other:
        raise ValueError(
            f"--{other[0].replace('_', '-')} sets the architecture of --model custom, "
            f"not of the named model {cfg['model']} ({other[0]} {row[other[0]]})."
        )
    for key in ARCHITECTURE_KEYS:
        cfg[key] = row[key]


def pretrained_meta(model):
    """The normalisation and eval transform of ``model``'s ImageNet weights (``--weights imagenet``)."""
    row = presets.PRETRAINED[model]
    return {k: row.get(k) for k in WEIGHTS_META_KEYS}


def apply_weights_meta(cfg, meta, check=True):
    """Set the settings listed in ``cfg["from_weights"]`` to the pretrained weights' ``meta`` (a dict
    with some of ``WEIGHTS_META_KEYS``; None values are skipped), then check ``cfg`` again: a size
    taken from the weights must still fit the patch size. Returns ``cfg``, changed in place."""
    for key in cfg.get("from_weights") or ():
        value = (meta or {}).get(key)
        if value is None:
            continue
        if key in ("mean", "std"):
            value = [float(v) for v in value]
        elif key == "crop_pct":
            value = float(value)
        elif key == "image_size":
            value = int(value[0] if isinstance(value, (list, tuple)) else value)
        cfg[key] = value
    if check:
        check_config(cfg)
    if "model_kwargs" in cfg:
        cfg["model_kwargs"] = model_kwargs(cfg)
    return cfg


def model_kwargs(cfg):
    """The model builder's keyword arguments (all but ``classes``, known once the data is read)."""
    kwargs = dict(
        input_shape=[cfg["image_size"], cfg["image_size"], 3],
        classifier_activation=None,
        dropout=float(cfg["dropout"]),
        initializer=cfg["initializer"],
    )
    kwargs.update(mean=list(cfg["mean"]), std=list(cfg["std"]))
    if cfg["model"] == "custom":
        kwargs.update(
            dim=int(cfg["dim"]),
            depth=int(cfg["depth"]),
            kernel_size=int(cfg["kernel_size"]),
            patch_size=int(cfg["patch_size"]),
            activation=cfg["activation"],
        )
    return kwargs


def describe_model(cfg):
    """What a run trains, e.g. ``"ConvMixer-256/8 (dim 256, depth 8, kernel 5, patch 2)"``."""
    shape = f"dim {cfg['dim']}, depth {cfg['depth']}, kernel {cfg['kernel_size']}, patch {cfg['patch_size']}"
    if cfg.get("activation", "gelu") != "gelu":
        shape += f", {cfg['activation']}"
    custom = "a custom " if cfg["model"] == "custom" else ""
    return f"{custom}ConvMixer-{cfg['dim']}/{cfg['depth']} ({shape})"


# ----------------------------------------------------------------------------- checks


def _check_pairs_and_counts(cfg):
    """The checks of the settings whose range depends on more than one number."""
    for key in ("crop_scale", "crop_ratio"):
        lo, hi = (float(v) for v in cfg[key])
        top = 1.0 if key == "crop_scale" else math.inf
        if not 0 < lo <= hi <= top:
            raise ValueError(
                f"--{key.replace('_', '-')} {lo},{hi} must be two numbers with 0 < low <= high"
                f"{' <= 1' if top == 1.0 else ''}."
            )
    for key in ("mean", "std"):
        values = cfg[key]
        if values is None:
            continue
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        if len(values) != 3 or len(numbers) != 3 or (key == "std" and min(numbers) <= 0):
            kind = "positive numbers" if key == "std" else "finite numbers"
            raise ValueError(f"--{key} must be three {kind} (R,G,B), got {values!r}.")
        if max(numbers) > 1 or min(numbers) < 0:  # pixels are normalised on the 0-1 scale, as timm writes it
            raise ValueError(f"--{key} {values!r} must be fractions of 1 (e.g. 0.485,0.456,0.406), not 0-255 values.")
    val_split = cfg["val_split"]
    if not (0 <= val_split < 1 or (val_split >= 1 and math.isfinite(val_split) and float(val_split).is_integer())):
        raise ValueError(f"--val-split {val_split} must be a fraction in [0, 1) or a whole number of images.")
    if not 0 <= int(cfg["process_id"]) < int(cfg["num_processes"]):
        raise ValueError(f"--process-id {cfg['process_id']} must be in [0, --num-processes {cfg['num_processes']}).")


def check_config(cfg):
    """Raise a one-line ValueError (FileNotFoundError for a missing data folder) naming the flag of
    the first setting of ``cfg`` that is out of range, out of vocabulary or at odds with another."""
    missing = [k for k in REQUIRED_SETTINGS if cfg.get(k) is None]
    if missing:
        raise ValueError(f"{BY_NAME[missing[0]].flag} has no value: the recipe or the command line must set it.")
    if cfg["model"] == "custom" and None in (cfg["dim"], cfg["depth"], cfg["kernel_size"], cfg["patch_size"]):
        raise ValueError("--model custom needs --dim, --depth, --kernel-size and --patch-size.")
    check_values(cfg, kinds=("range", "bool"))
    _check_pairs_and_counts(cfg)
    size, patch = int(cfg["image_size"]), int(cfg["patch_size"])
    if size % patch:
        raise ValueError(
            f"--image-size {size} is not divisible by the patch size {patch}: use a multiple of "
            f"{patch} (e.g. {max(size - size % patch, patch)})."
        )
    check_values(cfg, kinds=("choices",))
    backend, need = keras_backend(), STRATEGY_BACKEND.get(cfg["strategy"])
    if need and need != backend:
        raise ValueError(f"--strategy {cfg['strategy']} needs KERAS_BACKEND={need} (this run uses {backend}).")
    if int(cfg["num_processes"]) > 1 and (backend != "jax" or cfg["strategy"] not in ("auto", "data-parallel")):
        raise ValueError("--num-processes > 1 needs KERAS_BACKEND=jax --strategy data-parallel.")
    if cfg["augment_impl"] == "keras_cv" and cfg["augment_on"] != "host":
        raise ValueError("--augment-impl keras_cv runs only in the tf.data map: use --augment-on host.")
    _check_finetuning(cfg)
    if cfg["in_memory"] and cfg["augment_on"] != "device":
        raise ValueError("--in-memory feeds arrays without tf.data: it needs --augment-on device.")
    from keras_convmixer.data import parse_source  # NumPy, but neither Keras nor TensorFlow

    kind, arg = parse_source(cfg["data"])
    _check_processes(cfg, kind)
    if kind == "folder" and os.path.isfile(os.path.expanduser(arg)):
        raise ValueError(f"Data folder {arg!r} is a file, not a directory of class folders.")
    if kind == "folder" and not os.path.isdir(os.path.expanduser(arg)):
        raise FileNotFoundError(f"Data folder {arg!r} does not exist.")


def _check_processes(cfg, kind):
    n = int(cfg["num_processes"])
    if n < 2:
        return
    if int(cfg["batch_size"]) % n:
        raise ValueError(f"--batch-size {cfg['batch_size']} is global: it must split evenly over {n} processes.")
    if cfg["in_memory"]:
        return
    if kind not in ("folder", "tfds"):
        raise ValueError(f"--num-processes {n} streams image folders and TFDS: a {kind} source needs --in-memory.")
    if cfg["augment_on"] != "device":
        raise ValueError(
            f"--num-processes {n} streams its data with the augmentation on the device: add --augment-on device."
        )


def _check_finetuning(cfg):
    weights = cfg["weights"]
    # The spec's grammar is checked where the loader checks it; whether the model has ImageNet weights is ours.
    try:
        spec = None if weights is None else parse_spec(weights)
    except ValueError as error:  # its lines start "weights ...": here the user typed --weights
        raise ValueError(f"--{error}") from None
    if spec is not None and spec.kind == "imagenet":
        released = sorted(presets.PRETRAINED)
        if cfg["model"] not in released:
            choices = ", ".join(released) if released else "none are registered"
            raise ValueError(
                f"--weights imagenet needs --model with released ImageNet weights ({choices}), "
                f"not {cfg['model']}: pass one of them, or a checkpoint path / hf://<owner>/<repo>."
            )
    if cfg["freeze_backbone"] and cfg["backbone_lr_scale"] != 1:
        raise ValueError(
            f"--backbone-lr-scale {cfg['backbone_lr_scale']} has no effect with --freeze-backbone, "
            "which does not train the backbone: drop one of them."
        )
