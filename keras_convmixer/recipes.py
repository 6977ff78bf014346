"""Training recipes, the vocabulary of a training config, its resolution and its checks.

``resolve_config(recipe, overrides)`` gives the one flat, JSON-able dict that ``training.train`` runs
and ``config.json`` records; ``check_config(cfg)`` raises a one-line ValueError naming the flag for
every value out of range or out of vocabulary. This module imports neither Keras nor a backend, so
the command line can parse, resolve and reject a config before paying for those imports.
"""

import datetime
import json
import math
import os
import sys

from keras_convmixer.presets import (
    ARCHITECTURE_KEYS,
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODEL_CONFIGS,
    canonical_name,
)

# ----------------------------------------------------------------------------- vocabulary

STRATEGIES = ("auto", "none", "mirrored", "multiworker", "tpu", "data-parallel")
# The Keras backend each explicit strategy runs on.
STRATEGY_BACKEND = {"mirrored": "tensorflow", "multiworker": "tensorflow", "tpu": "tensorflow", "data-parallel": "jax"}
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
AUGMENT_IMPLS = ("convmixer", "keras_cv")
AUGMENT_ON = ("host", "device")
# The top of each RandAugment magnitude scale: timm's 0-10, torchvision's 31 bins (0-30).
RANDAUG_SCALES = {"timm": 10.0, "torchvision": 30.0}
TRAIN_INTERPOLATIONS = ("bilinear", "bicubic", "random")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area")
SCHEDULES = ("onecycle", "cosine")
INITIALIZERS = ("torch", "keras")

# ----------------------------------------------------------------------------- recipes

# Every setting, with the value a recipe that does not name it gets.
BASE = dict(
    data="digits",
    val_split=0.1,
    val_source=None,
    data_dir=None,
    download=False,
    in_memory=False,
    seed=0,
    split_seed=0,
    dropout=0.0,
    mean=None,
    std=None,
    crop_pct=1.0,
    interpolation="bilinear",
    train_interpolation="bilinear",
    schedule="onecycle",
    warmup_epochs=0,
    epsilon=1e-8,
    clip_norm=None,
    wd_exclude_bias_bn=True,
    crop_scale=(0.08, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    hflip=0.5,
    randaug_n=0,
    randaug_m=0.0,
    randaug_mstd=0.0,
    randaug_scale="timm",
    color_jitter=0.0,
    reprob=0.0,
    mixup_alpha=0.0,
    cutmix_alpha=0.0,
    mix_prob=1.0,
    switch_prob=0.5,
    label_smoothing=0.0,
    augment_impl="convmixer",
    augment_on="host",
    precision="auto",
    strategy="auto",
    logical_cpus=None,
    coordinator=None,
    num_processes=1,
    process_id=0,
    output_dir=None,
    steps_per_epoch=None,
    val_steps=None,
    verbose="auto",
    dim=None,
    depth=None,
    kernel_size=None,
    patch_size=None,
    activation="gelu",
    initializer="torch",
    weights=None,
    freeze_backbone=False,
    backbone_lr_scale=1.0,
)

# What a run started from pretrained weights takes from them unless the command line or the config
# file sets it: the normalisation and the eval transform the weights were trained and measured with.
WEIGHTS_META_KEYS = ("mean", "std", "crop_pct", "interpolation", "image_size")

# imagenet: the paper's timm command; cifar10: the official CIFAR script's 25-epoch setting.
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
        wd_exclude_bias_bn=True,
        clip_norm=1.0,
        schedule="onecycle",
        crop_scale=(0.08, 1.0),
        crop_ratio=(3 / 4, 4 / 3),
        train_interpolation="random",
        hflip=0.5,
        randaug_n=2,
        randaug_m=9,
        randaug_mstd=0.5,
        randaug_scale="timm",
        color_jitter=0.0,
        reprob=0.25,
        mixup_alpha=0.5,
        cutmix_alpha=0.5,
        mix_prob=1.0,
        switch_prob=0.5,
        label_smoothing=0.1,
        crop_pct=0.96,
        interpolation="bicubic",
        precision="auto",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    ),
    "cifar10": dict(
        # torch AdamW's default eps (the script sets none); weight decay on all parameters.
        model="convmixer_256_8",
        data="tfds:cifar10",
        image_size=32,
        epochs=25,
        batch_size=512,
        lr=0.05,
        epsilon=1e-8,
        weight_decay=0.005,
        wd_exclude_bias_bn=False,
        clip_norm=None,
        schedule="onecycle",
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        hflip=0.5,
        randaug_n=2,
        randaug_m=12,
        randaug_mstd=0.0,
        randaug_scale="torchvision",
        color_jitter=0.0,
        reprob=0.0,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        label_smoothing=0.0,
        crop_pct=1.0,
        interpolation="bilinear",
        precision="auto",
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
        data="digits",
        image_size=16,
        epochs=10,
        batch_size=64,
        lr=0.01,
        epsilon=1e-3,
        weight_decay=0.005,
        wd_exclude_bias_bn=True,
        clip_norm=1.0,
        schedule="onecycle",
        crop_scale=(0.5, 1.0),
        crop_ratio=(3 / 4, 4 / 3),
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
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
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
        if key not in cfg:
            raise ValueError(f"Unknown config key {key!r}.")
        cfg[key] = value
    # Recorded so that training (which reads the weights' metadata) knows what it may replace.
    cfg["from_weights"] = [k for k in WEIGHTS_META_KEYS if k not in given] if cfg["weights"] else []
    if cfg["model"] != "custom":
        cfg["model"] = canonical_name(cfg["model"])  # one-line ValueError naming the choices
        architecture = [k for k in ARCHITECTURE_KEYS if k in given]
        if architecture:
            raise ValueError(
                f"--{architecture[0].replace('_', '-')} sets the architecture of --model custom, "
                f"not of the named model {cfg['model']}."
            )
        for key in ARCHITECTURE_KEYS:
            cfg[key] = MODEL_CONFIGS[cfg["model"]][key]
    if cfg["weights"] == "imagenet" and cfg["model"] in pretrained_table():
        # The published models' metadata is known without loading them; checked with the rest below.
        apply_weights_meta(cfg, pretrained_meta(cfg["model"]), check=False)
    check_config(cfg)
    cfg["crop_scale"], cfg["crop_ratio"] = list(cfg["crop_scale"]), list(cfg["crop_ratio"])
    if cfg["mean"] is None:  # the model's own normalisation (ImageNet's for a custom model)
        defaults = MODEL_CONFIGS.get(cfg["model"], {})
        cfg["mean"], cfg["std"] = defaults.get("mean", IMAGENET_MEAN), defaults.get("std", IMAGENET_STD)
    cfg["mean"], cfg["std"] = [float(m) for m in cfg["mean"]], [float(v) for v in cfg["std"]]
    cfg["model_kwargs"] = model_kwargs(cfg)
    if cfg["output_dir"] is None:
        cfg["output_dir"] = os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return cfg


def pretrained_table():
    """``presets.PRETRAINED``: the released weights of the named variants (empty where unknown)."""
    from keras_convmixer import presets

    return getattr(presets, "PRETRAINED", {})


def pretrained_meta(model):
    """The normalisation and eval transform of ``model``'s ImageNet weights (``--weights imagenet``)."""
    row = pretrained_table()[model]
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

# The valid range of every numeric setting: (low, high, low included, high included). None (unset)
# passes for the optional ones; the message names the flag, the value and the range.
_RANGES = dict(
    epochs=(1, math.inf, True, False),
    batch_size=(1, math.inf, True, False),
    image_size=(1, math.inf, True, False),
    dim=(1, math.inf, True, False),
    depth=(1, math.inf, True, False),
    kernel_size=(1, math.inf, True, False),
    patch_size=(1, math.inf, True, False),
    lr=(0, math.inf, False, False),
    weight_decay=(0, math.inf, True, False),
    epsilon=(0, math.inf, False, False),
    clip_norm=(0, math.inf, True, False),
    warmup_epochs=(0, math.inf, True, False),
    dropout=(0, 1, True, False),
    label_smoothing=(0, 1, True, False),
    hflip=(0, 1, True, True),
    reprob=(0, 1, True, True),
    mix_prob=(0, 1, True, True),
    switch_prob=(0, 1, True, True),
    mixup_alpha=(0, math.inf, True, False),
    cutmix_alpha=(0, math.inf, True, False),
    color_jitter=(0, 1, True, True),
    randaug_n=(0, math.inf, True, False),
    randaug_m=(0, math.inf, True, False),
    randaug_mstd=(0, math.inf, True, False),
    crop_pct=(0, 1, False, True),
    num_processes=(1, math.inf, True, False),
    logical_cpus=(1, math.inf, True, False),
    steps_per_epoch=(1, math.inf, True, False),
    val_steps=(1, math.inf, True, False),
    backbone_lr_scale=(0, 1, False, True),
    seed=(0, math.inf, True, False),
    split_seed=(0, math.inf, True, False),
)
_INTEGERS = (
    "epochs",
    "batch_size",
    "image_size",
    "dim",
    "depth",
    "kernel_size",
    "patch_size",
    "randaug_n",
    "num_processes",
    "logical_cpus",
    "steps_per_epoch",
    "val_steps",
    "seed",
    "split_seed",
)
# Settings whose value must be one of a list: (setting, choices).
_CHOICES = (
    ("strategy", STRATEGIES),
    ("precision", PRECISIONS),
    ("augment_on", AUGMENT_ON),
    ("augment_impl", AUGMENT_IMPLS),
    ("randaug_scale", tuple(RANDAUG_SCALES)),
    ("initializer", INITIALIZERS),
    ("train_interpolation", TRAIN_INTERPOLATIONS),
    ("interpolation", INTERPOLATIONS),
    ("schedule", SCHEDULES),
)


def _check_ranges(cfg):
    for key, (lo, hi, lo_in, hi_in) in _RANGES.items():
        value = cfg.get(key)
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{flag} must be a number, got {value!r}.")
        if key in _INTEGERS and not float(value).is_integer():
            raise ValueError(f"{flag} must be a whole number, got {value!r}.")
        inside = (value >= lo if lo_in else value > lo) and (value <= hi if hi_in else value < hi)
        if not inside or math.isnan(value):
            bounds = f"{'[' if lo_in else '('}{lo}, {hi if hi != math.inf else 'inf'}{']' if hi_in else ')'}"
            raise ValueError(f"{flag} {value} is out of range: it must be in {bounds}.")
    for key in ("crop_scale", "crop_ratio"):
        lo, hi = (float(v) for v in cfg[key])
        top = 1.0 if key == "crop_scale" else math.inf
        if not 0 < lo <= hi <= top:
            raise ValueError(
                f"--{key.replace('_', '-')} {lo},{hi} must be two numbers with 0 < low <= high"
                f"{' <= 1' if top == 1.0 else ''}."
            )
    val_split = cfg["val_split"]
    if not (0 <= val_split < 1 or (val_split >= 1 and math.isfinite(val_split) and float(val_split).is_integer())):
        raise ValueError(f"--val-split {val_split} must be a fraction in [0, 1) or a whole number of images.")
    if not 0 <= int(cfg["process_id"]) < int(cfg["num_processes"]):
        raise ValueError(f"--process-id {cfg['process_id']} must be in [0, --num-processes {cfg['num_processes']}).")


def check_config(cfg):
    """Raise a one-line ValueError (FileNotFoundError for a missing data folder) naming the flag of
    the first setting of ``cfg`` that is out of range, out of vocabulary or at odds with another."""
    if cfg["model"] == "custom" and None in (cfg["dim"], cfg["depth"], cfg["kernel_size"], cfg["patch_size"]):
        raise ValueError("--model custom needs --dim, --depth, --kernel-size and --patch-size.")
    _check_ranges(cfg)
    size, patch = int(cfg["image_size"]), int(cfg["patch_size"])
    if size % patch:
        raise ValueError(
            f"--image-size {size} is not divisible by the patch size {patch}: use a multiple of "
            f"{patch} (e.g. {max(size - size % patch, patch)})."
        )
    for key, choices in _CHOICES:
        if cfg[key] not in choices:
            raise ValueError(f"--{key.replace('_', '-')} must be one of {', '.join(choices)}, got {cfg[key]!r}.")
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
    if int(cfg["num_processes"]) > 1 and not cfg["in_memory"]:
        raise ValueError(
            "--num-processes > 1 (JAX multi-process) feeds per-process array shards: add --in-memory "
            "--augment-on device."
        )
    from keras_convmixer.data import parse_source  # NumPy, but neither Keras nor TensorFlow

    kind, arg = parse_source(cfg["data"])
    if kind == "folder" and os.path.isfile(os.path.expanduser(arg)):
        raise ValueError(f"Data folder {arg!r} is a file, not a directory of class folders.")
    if kind == "folder" and not os.path.isdir(os.path.expanduser(arg)):
        raise FileNotFoundError(f"Data folder {arg!r} does not exist.")


def _check_finetuning(cfg):
    weights = cfg["weights"]
    if weights is not None and (not isinstance(weights, str) or not weights.strip()):
        raise ValueError(f"--weights must be imagenet, hf://<owner>/<repo> or a path, got {weights!r}.")
    if weights == "imagenet":
        released = sorted(pretrained_table())
        if cfg["model"] not in released:
            choices = ", ".join(released) if released else "none are registered"
            raise ValueError(
                f"--weights imagenet needs --model with released ImageNet weights ({choices}), "
                f"not {cfg['model']}: pass one of them, or a checkpoint path / hf://<owner>/<repo>."
            )
    elif weights is not None and weights.startswith("hf://"):
        if not weights[len("hf://") :].strip("/"):
            raise ValueError(f"--weights {weights} names no repository: use hf://<owner>/<repo>[@<revision>].")
    if not isinstance(cfg["freeze_backbone"], bool):
        raise ValueError(f"--freeze-backbone must be true or false, got {cfg['freeze_backbone']!r}.")
    if cfg["freeze_backbone"] and cfg["backbone_lr_scale"] != 1:
        raise ValueError(
            f"--backbone-lr-scale {cfg['backbone_lr_scale']} has no effect with --freeze-backbone, "
            "which does not train the backbone: drop one of them."
        )
