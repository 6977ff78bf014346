"""Every training setting, declared once: its default, type, range or choices, help and group.

``SETTINGS`` is the one table. From it come ``BASE`` (the value a recipe that does not name a setting
gets), the checks of each value on its own (``check_values``), the flags and groups of
``convmixer-train`` and the keys a ``--config`` file may hold. Checks that relate settings to each
other live in ``recipes.check_config``. Neither Keras nor a backend is imported here.
"""

import argparse
import dataclasses
import math

from keras_convmixer.data.transforms import INTERPOLATIONS, TRAIN_INTERPOLATIONS
from keras_convmixer.vocabulary import INITIALIZERS, RANDAUG_SCALES

STRATEGIES = ("auto", "none", "mirrored", "tpu", "data-parallel")
# The Keras backend each explicit strategy runs on.
STRATEGY_BACKEND = {"mirrored": "tensorflow", "tpu": "tensorflow", "data-parallel": "jax"}
# Choices refused with their reason, at argument time (before any framework loads), rather than as unknown.
RETIRED = {
    ("strategy", "multiworker"): "Keras 3 fit is broken under TensorFlow's MultiWorkerMirroredStrategy upstream "
    "(keras-team/keras#20585); for several machines use KERAS_BACKEND=jax --strategy data-parallel with "
    "--coordinator/--num-processes/--process-id",
}
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
AUGMENT_IMPLS = ("convmixer", "keras_cv")
AUGMENT_ON = ("host", "device")
SCHEDULES = ("onecycle", "cosine")
# Where the one-cycle's 2/5 and 4/5 breakpoints fall: on the nearest optimizer steps, or floored to whole
# epochs as the official CIFAR script floors them (which a run whose epochs do not divide by 5 feels).
LR_BREAKPOINTS = ("steps", "official")

# A setting every recipe must give (the model, its data size and the optimisation budget): no one default fits.
REQUIRED = object()
INF = math.inf


def pair(text):
    """``"0.08,1"`` -> ``[0.08, 1.0]``: a range of the training crop."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers like 0.08,1.0, got {text!r}") from None
    return [lo, hi]


def triple(text):
    """``"0.485,0.456,0.406"`` -> three floats: a per-channel normalisation."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers (R,G,B), got {text!r}")
    return values


def split(text):
    """A held-out fraction (``0.1``) or image count (``5000``)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1) or a whole number of images, got {text!r}")
    return int(value) if value >= 1 and value.is_integer() else value


def strategy(text):
    """A ``--strategy`` name; a retired one is refused with its reason, not as an unknown choice."""
    reason = RETIRED.get(("strategy", text))
    if reason:
        raise argparse.ArgumentTypeError(f"{text} is not available: {reason}")
    return text


# How a type reads from the command line (bool is an on/off flag pair).
PARSERS = {"int": int, "float": float, "str": str, "pair": pair, "triple": triple, "split": split, "strategy": strategy}


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    group: str
    help: str
    default: object = None
    type: str = "str"  # a key of PARSERS, or "bool"
    range: tuple = None  # (low, high, low included, high included)
    choices: tuple = None
    flags: tuple = ()  # the spellings on the command line; the first is named in errors
    metavar: str = None
    shown: str = None  # the default as --help states it, where the recipes' values do not say it

    @property
    def flag(self):
        return self.flags[0] if self.flags else "--" + self.name.replace("_", "-")

    @property
    def spellings(self):
        return self.flags or (self.flag,)


def _s(name, group, help, default=None, type="str", **kw):
    return Setting(name, group, help, default, type, **kw)


POSITIVE, NON_NEGATIVE = (1, INF, True, False), (0, INF, True, False)
ABOVE_ZERO, PROBABILITY, FRACTION = (0, INF, False, False), (0, 1, True, True), (0, 1, True, False)

_TOP, _MODEL, _TUNE, _DATA = "", "model", "fine-tuning", "data"
_OPT, _AUG, _SCALE, _RUN = "optimisation", "augmentation", "scale", "run length and output"
_CUSTOM = "of --model custom"

SETTINGS = (
    _s("output_dir", _TOP, "run directory; re-run with the same one to resume", shown="runs/<date-time>"),
    # model
    _s("model", _MODEL, "registry name (e.g. convmixer_256_8) or 'custom', sized by --dim/--depth/...", REQUIRED),
    _s("dim", _MODEL, f"channels {_CUSTOM}", type="int", range=POSITIVE),
    _s("depth", _MODEL, f"number of ConvMixer blocks {_CUSTOM}", type="int", range=POSITIVE),
    _s("kernel_size", _MODEL, f"depthwise kernel size {_CUSTOM}", type="int", range=POSITIVE),
    _s("patch_size", _MODEL, f"patch size (stem stride) {_CUSTOM}", type="int", range=POSITIVE),
    _s("activation", _MODEL, f"activation {_CUSTOM}, e.g. gelu or relu", "gelu"),
    _s("dropout", _MODEL, "dropout before the classifier", 0.0, "float", range=FRACTION),
    _s(
        "initializer",
        _MODEL,
        "torch: PyTorch's default init, as the paper's models; keras: Keras's defaults",
        "torch",
        choices=INITIALIZERS,
    ),
    # fine-tuning
    _s(
        "weights",
        _TUNE,
        "start a new run from pretrained weights (never reloaded on resume): imagenet (the released "
        "weights of --model), a timm-format Hub repo, or a local checkpoint (.safetensors/.pth/.pth.tar), "
        ".keras model or run directory; the head is loaded when its class count matches the data's, else "
        "new; --mean/--std, --crop-pct, --interpolation and --image-size follow the weights unless given "
        "(any --image-size that is a multiple of the patch size works: ConvMixer is fully convolutional)",
        metavar="imagenet|hf://OWNER/REPO[@REV]|PATH",
    ),
    _s(
        "freeze_backbone",
        _TUNE,
        "linear probe: train only the head; the stem and blocks keep their weights and their "
        "BatchNorm layers run in inference mode",
        False,
        "bool",
    ),
    _s(
        "backbone_lr_scale",
        _TUNE,
        "the stem and blocks step with lr x this in (0, 1], Adam step and weight decay alike "
        "(a PyTorch parameter group with a lower lr); the head keeps --lr",
        1.0,
        "float",
        range=(0, 1, False, True),
    ),
    # data
    _s("data", _DATA, "digits | folder:<path> (a sub-folder per class) | tfds:<name>", "digits"),
    _s("data_dir", _DATA, "TFDS data directory"),
    _s("download", _DATA, "let TFDS download the dataset", False, "bool"),
    _s("val_split", _DATA, "fraction (0.1) or image count (5000) held out, stratified; 0: none", 0.1, "split"),
    _s("val_source", _DATA, "separate validation folder, or TFDS split name (instead of --val-split)"),
    _s(
        "split_seed",
        _DATA,
        "seed of --val-split, independent of --seed, so runs with different seeds are scored on the same images",
        0,
        "int",
        range=NON_NEGATIVE,
    ),
    _s(
        "in_memory",
        _DATA,
        "decode once to uint8 arrays (cached .npy), no tf.data; needs --augment-on device",
        False,
        "bool",
    ),
    _s("image_size", _DATA, "training and evaluation resolution", REQUIRED, "int", range=POSITIVE),
    _s(
        "crop_pct",
        _DATA,
        "eval transform: resize the shorter side to size/crop_pct, centre-crop",
        1.0,
        "float",
        range=(0, 1, False, True),
    ),
    _s("interpolation", _DATA, "eval resize", "bilinear", choices=INTERPOLATIONS),
    _s(
        "mean",
        _DATA,
        "per-channel mean the model subtracts from [0, 1] pixels, R,G,B (none: the model's own, ImageNet's "
        "for --model custom; follows --weights unless given)",
        type="triple",
    ),
    _s("std", _DATA, "per-channel std the model divides by, R,G,B (none: as --mean)", type="triple"),
    # optimisation
    _s("epochs", _OPT, "training epochs", REQUIRED, "int", range=POSITIVE),
    _s("batch_size", _OPT, "global batch, split across replicas", REQUIRED, "int", range=POSITIVE),
    _s("lr", _OPT, "peak learning rate (AdamW)", REQUIRED, "float", range=ABOVE_ZERO),
    _s("weight_decay", _OPT, "AdamW decoupled weight decay", REQUIRED, "float", range=NON_NEGATIVE),
    _s("epsilon", _OPT, "AdamW epsilon", 1e-8, "float", range=ABOVE_ZERO),
    _s("clip_norm", _OPT, "clip gradients to this global norm (0 or none: off)", type="float", range=NON_NEGATIVE),
    _s(
        "schedule",
        _OPT,
        "onecycle: the paper's triangular schedule, set every step: linear warm-up from 0 to --lr at 2/5 of "
        "the run, down to --lr/20 at 4/5, to 0 at the end; cosine: cosine decay to 0 after --warmup-epochs",
        "onecycle",
        choices=SCHEDULES,
    ),
    _s(
        "lr_breakpoints",
        _OPT,
        "where --schedule onecycle's 2/5 and 4/5 fall: steps: on the nearest optimizer steps, so any run "
        "reaches --lr; official: floored to whole epochs, as the official CIFAR script (np.interp over "
        "[0, epochs*2//5, epochs*4//5, epochs]): the same schedule when --epochs is a multiple of 5, but "
        "1 epoch then stays under --lr/20 and 2 start at --lr with no warm-up",
        "steps",
        choices=LR_BREAKPOINTS,
    ),
    _s("warmup_epochs", _OPT, "linear warm-up of --schedule cosine", 0, "float", range=NON_NEGATIVE),
    _s("wd_exclude_bias_bn", _OPT, "no weight decay on biases and BatchNorm parameters", True, "bool"),
    _s(
        "precision",
        _OPT,
        "auto: mixed_bfloat16 on a GPU/TPU, float32 on a CPU",
        "auto",
        choices=PRECISIONS,
    ),
    _s("seed", _OPT, "seed of the initial weights, shuffling and augmentation", 0, "int", range=NON_NEGATIVE),
    # augmentation
    _s("crop_scale", _AUG, "RandomResizedCrop area range, e.g. 0.08,1", (0.08, 1.0), "pair"),
    _s("crop_ratio", _AUG, "RandomResizedCrop aspect-ratio range, e.g. 0.75,1.333", (3 / 4, 4 / 3), "pair"),
    _s("train_interpolation", _AUG, "RandomResizedCrop resize", "bilinear", choices=TRAIN_INTERPOLATIONS),
    _s("hflip", _AUG, "horizontal flip probability", 0.5, "float", range=PROBABILITY),
    _s("randaug_n", _AUG, "RandAugment ops per image (0: off)", 0, "int", range=NON_NEGATIVE),
    _s("randaug_m", _AUG, "RandAugment magnitude on --randaug-scale", 0.0, "float", range=NON_NEGATIVE),
    _s("randaug_mstd", _AUG, "std of timm's per-op magnitude noise", 0.0, "float", range=NON_NEGATIVE),
    _s(
        "randaug_scale",
        _AUG,
        "timm: rand-m{m}-mstd{mstd}-inc1 (0-10, each op with p 0.5); torchvision: RandAugment(n, m), 0-30",
        "timm",
        choices=tuple(sorted(RANDAUG_SCALES)),
    ),
    _s("color_jitter", _AUG, "colour jitter strength", 0.0, "float", range=PROBABILITY),
    _s("reprob", _AUG, "random erasing probability", 0.0, "float", range=PROBABILITY),
    _s("mixup_alpha", _AUG, "MixUp alpha (0: off)", 0.0, "float", range=NON_NEGATIVE, flags=("--mixup",)),
    _s("cutmix_alpha", _AUG, "CutMix alpha (0: off)", 0.0, "float", range=NON_NEGATIVE, flags=("--cutmix",)),
    _s("mix_prob", _AUG, "probability that a batch is mixed", 1.0, "float", range=PROBABILITY),
    _s(
        "switch_prob", _AUG, "probability of CutMix rather than MixUp when both are on", 0.5, "float", range=PROBABILITY
    ),
    _s(
        "label_smoothing",
        _AUG,
        "label smoothing",
        0.0,
        "float",
        range=FRACTION,
        flags=("--label-smoothing", "--smoothing"),
    ),
    _s(
        "augment_impl",
        _AUG,
        "convmixer: torchvision's/timm's RandAugment and timm's erasing; keras_cv: keras-cv 0.9's",
        "convmixer",
        choices=AUGMENT_IMPLS,
    ),
    _s(
        "augment_on",
        _AUG,
        "host: in the tf.data pipeline; device: inside the train step",
        "host",
        choices=AUGMENT_ON,
    ),
    # scale
    _s(
        "strategy",
        _SCALE,
        "auto: mirrored on several TensorFlow GPUs, data-parallel on several JAX devices, else none",
        "auto",
        "strategy",
        choices=STRATEGIES,
    ),
    _s(
        "logical_cpus",
        _SCALE,
        "split the CPU into N logical devices (mirrored, for testing)",
        None,
        "int",
        range=POSITIVE,
    ),
    _s("coordinator", _SCALE, "JAX multi-process: host:port of process 0"),
    _s("num_processes", _SCALE, "JAX multi-process: number of processes", 1, "int", range=POSITIVE),
    _s("process_id", _SCALE, "JAX multi-process: this process's index", 0, "int"),
    # run length and output
    _s(
        "steps_per_epoch",
        _RUN,
        "cap each epoch at N batches",
        None,
        "int",
        range=POSITIVE,
        shown="the whole training split",
    ),
    _s(
        "val_steps",
        _RUN,
        "cap validation at N batches",
        None,
        "int",
        range=POSITIVE,
        shown="the whole validation split",
    ),
    # "auto" (the default) is decided by the command line: a progress bar on a terminal, else one line per epoch.
    _s(
        "verbose",
        _RUN,
        "0: silent, 1: a progress bar, 2: one line per epoch",
        "auto",
        "int",
        choices=(0, 1, 2),
        shown="1 on a terminal, else 2",
    ),
)
BY_NAME = {s.name: s for s in SETTINGS}
GROUPS = tuple(dict.fromkeys(s.group for s in SETTINGS))

# The value of every setting that has one before a recipe speaks.
BASE = {s.name: s.default for s in SETTINGS if s.default is not REQUIRED}
REQUIRED_SETTINGS = tuple(s.name for s in SETTINGS if s.default is REQUIRED)


def _bounds(lo, hi, lo_in, hi_in):
    return f"{'[' if lo_in else '('}{lo}, {hi if hi != INF else 'inf'}{']' if hi_in else ')'}"


def check_value(setting, value):
    """Raise a one-line ValueError naming the flag if ``value`` is not a valid ``setting`` on its own
    (None, unset, passes)."""
    if value is None:
        return
    flag = setting.flag
    reason = RETIRED.get((setting.name, value)) if isinstance(value, str) else None
    if reason:
        raise ValueError(f"{flag} {value} is not available: {reason}.")
    if setting.range is not None:
        lo, hi, lo_in, hi_in = setting.range
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{flag} must be a number, got {value!r}.")
        if setting.type == "int" and not float(value).is_integer():
            raise ValueError(f"{flag} must be a whole number, got {value!r}.")
        inside = (value >= lo if lo_in else value > lo) and (value <= hi if hi_in else value < hi)
        if not inside or math.isnan(value):
            raise ValueError(f"{flag} {value} is out of range: it must be in {_bounds(*setting.range)}.")
    if setting.type == "bool" and not isinstance(value, bool):
        raise ValueError(f"{flag} must be true or false, got {value!r}.")
    if setting.choices is not None and isinstance(setting.choices[0], str) and value not in setting.choices:
        raise ValueError(f"{flag} must be one of {', '.join(setting.choices)}, got {value!r}.")


def _kind(setting):
    if setting.range:
        return "range"
    return "bool" if setting.type == "bool" else "choices" if setting.choices else None


def check_values(cfg, kinds=("range", "bool")):
    """``check_value`` for every setting in ``cfg`` of the given kinds: "range" (numbers), "bool" and
    "choices" (names), in table order."""
    for setting in SETTINGS:
        if _kind(setting) in kinds and setting.name in cfg:
            check_value(setting, cfg[setting.name])


def coerce(cfg):
    """Checked numbers in their setting's type (``12`` -> ``12.0`` for a float, ``2.0`` -> ``2`` for a count), so a
    config prints the same whichever way its values were written. Changes ``cfg`` in place and returns it."""
    for setting in SETTINGS:
        value = cfg.get(setting.name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if setting.type == "float":
            cfg[setting.name] = float(value)
        elif setting.type == "int":
            cfg[setting.name] = int(value)
    return cfg
