"""Training: recipes, config resolution, strategies, compile, callbacks and ``model.fit``.

``resolve_config(recipe, overrides)`` gives one flat dict; ``train(config)`` writes the run
directory (config.json, history.csv, best.keras/last.keras, TensorBoard logs, a
BackupAndRestore dir, curves.png, metrics.json) and returns the final metrics.
TensorFlow is imported only for tf.data sources and TF strategies.
"""

import contextlib
import datetime
import math
import os
import time
import warnings

import keras
import numpy as np
from keras import ops

from keras_convmixer import augment as aug
from keras_convmixer import data, rundir
from keras_convmixer.models import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODEL_CONFIGS,
    ConvMixer,
    canonical_name,
    get_model,
)
from keras_convmixer.schedules import LearningRateLogger, OneCycle, cosine_with_warmup

_BASE = dict(
    data="digits", val_split=0.1, val_source=None, data_dir=None, download=False, in_memory=False,
    seed=0, split_seed=0, dropout=0.0, mean=None, std=None,
    crop_pct=1.0, interpolation="bilinear", train_interpolation="bilinear",
    schedule="onecycle", warmup_epochs=0, epsilon=1e-8, clip_norm=None, wd_exclude_bias_bn=True,
    crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=0.5,
    randaug_n=0, randaug_m=0.0, randaug_mstd=0.0, randaug_scale="timm",
    color_jitter=0.0, reprob=0.0,
    mixup_alpha=0.0, cutmix_alpha=0.0, mix_prob=1.0, switch_prob=0.5, label_smoothing=0.0,
    augment_impl="convmixer", augment_on="host", precision="auto", strategy="auto", logical_cpus=None,
    coordinator=None, num_processes=1, process_id=0,
    output_dir=None, steps_per_epoch=None, val_steps=None, verbose="auto",
    dim=None, depth=None, kernel_size=None, patch_size=None, activation="gelu", initializer="torch",
)

# Values from REFERENCE.md (the paper's timm command; the official CIFAR script).
RECIPES = {
    "imagenet": dict(
        model="convmixer_1536_20", data="tfds:imagenet2012", image_size=224, epochs=150, batch_size=640,
        lr=0.01, epsilon=1e-3, weight_decay=2e-5, wd_exclude_bias_bn=True, clip_norm=1.0, schedule="onecycle",
        crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), train_interpolation="random", hflip=0.5,
        randaug_n=2, randaug_m=9, randaug_mstd=0.5, randaug_scale="timm", color_jitter=0.0, reprob=0.25,
        mixup_alpha=0.5, cutmix_alpha=0.5, mix_prob=1.0, switch_prob=0.5, label_smoothing=0.1,
        crop_pct=0.96, interpolation="bicubic", precision="auto", mean=IMAGENET_MEAN, std=IMAGENET_STD,
    ),
    "cifar10": dict(
        # torch AdamW's default eps (the script sets none); weight decay on all parameters.
        model="convmixer_256_8", data="tfds:cifar10", image_size=32, epochs=25, batch_size=512,
        lr=0.05, epsilon=1e-8, weight_decay=0.005, wd_exclude_bias_bn=False, clip_norm=None, schedule="onecycle",
        crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.5,
        randaug_n=2, randaug_m=12, randaug_mstd=0.0, randaug_scale="torchvision", color_jitter=0.0, reprob=0.0,
        mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0, crop_pct=1.0, interpolation="bilinear",
        precision="auto", mean=CIFAR10_MEAN, std=CIFAR10_STD,
    ),
    # Small ConvMixer on sklearn digits: a few minutes on a 2-core CPU, well above 90% val top-1.
    "demo": dict(
        model="custom", dim=96, depth=4, kernel_size=3, patch_size=4, data="digits", image_size=16,
        epochs=10, batch_size=64, lr=0.01, epsilon=1e-3, weight_decay=0.005, wd_exclude_bias_bn=True,
        clip_norm=1.0, schedule="onecycle", crop_scale=(0.5, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=0.0,
        label_smoothing=0.1, precision="float32",
    ),
}

_ARCHITECTURE = ("dim", "depth", "kernel_size", "patch_size", "activation")
STRATEGIES = ("auto", "none", "mirrored", "multiworker", "tpu", "data-parallel")
_STRATEGY_BACKEND = {"mirrored": "tensorflow", "multiworker": "tensorflow", "tpu": "tensorflow",
                     "data-parallel": "jax"}
_PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")


def resolve_config(recipe="demo", overrides=None):
    """Recipe values, then ``overrides`` (None values are ignored), checked; JSON-able."""
    if recipe not in RECIPES:
        raise ValueError(f"Unknown recipe {recipe!r}. Available: {', '.join(RECIPES)}.")
    cfg = {**_BASE, **RECIPES[recipe], "recipe": recipe}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key, value in given.items():
        if key not in cfg:
            raise ValueError(f"Unknown config key {key!r}.")
        cfg[key] = value
    if cfg["model"] != "custom":
        cfg["model"] = canonical_name(cfg["model"])  # one-line ValueError naming the choices
        architecture = [k for k in _ARCHITECTURE if k in given]
        if architecture:
            raise ValueError(f"--{architecture[0].replace('_', '-')} sets the architecture of --model custom, "
                             f"not of the named model {cfg['model']}.")
        for key in _ARCHITECTURE:
            cfg[key] = MODEL_CONFIGS[cfg["model"]][key]
    _check(cfg)
    cfg["crop_scale"], cfg["crop_ratio"] = list(cfg["crop_scale"]), list(cfg["crop_ratio"])
    if cfg["mean"] is None:  # the model's own normalisation (ImageNet's for a custom model)
        defaults = MODEL_CONFIGS.get(cfg["model"], {})
        cfg["mean"], cfg["std"] = defaults.get("mean", IMAGENET_MEAN), defaults.get("std", IMAGENET_STD)
    cfg["mean"], cfg["std"] = [float(m) for m in cfg["mean"]], [float(v) for v in cfg["std"]]
    cfg["model_kwargs"] = _model_kwargs(cfg)
    if cfg["output_dir"] is None:
        cfg["output_dir"] = os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return cfg


# The valid range of every numeric setting: (low, high, low included, high included). None (unset)
# passes for the optional ones; the message names the flag, the value and the range.
_RANGES = dict(
    epochs=(1, math.inf, True, False), batch_size=(1, math.inf, True, False), image_size=(1, math.inf, True, False),
    dim=(1, math.inf, True, False), depth=(1, math.inf, True, False), kernel_size=(1, math.inf, True, False),
    patch_size=(1, math.inf, True, False), lr=(0, math.inf, False, False), weight_decay=(0, math.inf, True, False),
    epsilon=(0, math.inf, False, False), clip_norm=(0, math.inf, True, False), warmup_epochs=(0, math.inf, True, False),
    dropout=(0, 1, True, False), label_smoothing=(0, 1, True, False), hflip=(0, 1, True, True),
    reprob=(0, 1, True, True), mix_prob=(0, 1, True, True), switch_prob=(0, 1, True, True),
    mixup_alpha=(0, math.inf, True, False), cutmix_alpha=(0, math.inf, True, False),
    color_jitter=(0, 1, True, True), randaug_n=(0, math.inf, True, False), randaug_m=(0, math.inf, True, False),
    randaug_mstd=(0, math.inf, True, False), crop_pct=(0, 1, False, True), num_processes=(1, math.inf, True, False),
    logical_cpus=(1, math.inf, True, False), steps_per_epoch=(1, math.inf, True, False),
    val_steps=(1, math.inf, True, False), seed=(0, math.inf, True, False), split_seed=(0, math.inf, True, False),
)
_INTEGERS = ("epochs", "batch_size", "image_size", "dim", "depth", "kernel_size", "patch_size", "randaug_n",
             "num_processes", "logical_cpus", "steps_per_epoch", "val_steps", "seed", "split_seed")


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
            raise ValueError(f"--{key.replace('_', '-')} {lo},{hi} must be two numbers with 0 < low <= high"
                             f"{' <= 1' if top == 1.0 else ''}.")
    val_split = cfg["val_split"]
    if not (0 <= val_split < 1 or (val_split >= 1 and math.isfinite(val_split) and float(val_split).is_integer())):
        raise ValueError(f"--val-split {val_split} must be a fraction in [0, 1) or a whole number of images.")
    if not 0 <= int(cfg["process_id"]) < int(cfg["num_processes"]):
        raise ValueError(f"--process-id {cfg['process_id']} must be in [0, --num-processes {cfg['num_processes']}).")


def _check(cfg):
    if cfg["model"] == "custom" and None in (cfg["dim"], cfg["depth"], cfg["kernel_size"], cfg["patch_size"]):
        raise ValueError("--model custom needs --dim, --depth, --kernel-size and --patch-size.")
    _check_ranges(cfg)
    size, patch = int(cfg["image_size"]), int(cfg["patch_size"])
    if size % patch:
        raise ValueError(f"--image-size {size} is not divisible by the patch size {patch}: use a multiple of "
                         f"{patch} (e.g. {max(size - size % patch, patch)}).")
    if cfg["strategy"] not in STRATEGIES:
        raise ValueError(f"Unknown strategy {cfg['strategy']!r}. Available: {', '.join(STRATEGIES)}.")
    backend = keras.backend.backend()
    need = _STRATEGY_BACKEND.get(cfg["strategy"])
    if need and need != backend:
        raise ValueError(f"--strategy {cfg['strategy']} needs KERAS_BACKEND={need} (this run uses {backend}).")
    if cfg["precision"] not in _PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(_PRECISIONS)}, got {cfg['precision']!r}.")
    if cfg["augment_on"] not in ("host", "device"):
        raise ValueError(f"--augment-on must be 'host' or 'device', got {cfg['augment_on']!r}.")
    if cfg["augment_impl"] not in aug.AUGMENT_IMPLS:
        raise ValueError(f"--augment-impl must be one of {', '.join(aug.AUGMENT_IMPLS)}, got {cfg['augment_impl']!r}.")
    if cfg["randaug_scale"] not in aug.RANDAUG_SCALES:
        raise ValueError(f"--randaug-scale must be one of {', '.join(aug.RANDAUG_SCALES)}, "
                         f"got {cfg['randaug_scale']!r}.")
    if cfg["augment_impl"] == "keras_cv" and cfg["augment_on"] != "host":
        raise ValueError("--augment-impl keras_cv runs only in the tf.data map: use --augment-on host.")
    if cfg["in_memory"] and cfg["augment_on"] != "device":
        raise ValueError("--in-memory feeds arrays without tf.data: it needs --augment-on device.")
    if int(cfg["num_processes"]) > 1 and not cfg["in_memory"]:
        raise ValueError("--num-processes > 1 (JAX multi-process) feeds per-process array shards: add --in-memory "
                         "--augment-on device.")
    if cfg["initializer"] not in ("torch", "keras"):
        raise ValueError(f"--initializer must be 'torch' or 'keras', got {cfg['initializer']!r}.")
    if cfg["train_interpolation"] not in aug.TRAIN_INTERPOLATIONS:
        raise ValueError(f"--train-interpolation must be one of {', '.join(aug.TRAIN_INTERPOLATIONS)}, "
                         f"got {cfg['train_interpolation']!r}.")
    if cfg["schedule"] not in ("onecycle", "cosine"):
        raise ValueError(f"--schedule must be 'onecycle' or 'cosine', got {cfg['schedule']!r}.")
    kind, arg = data.parse_source(cfg["data"])
    if kind == "folder" and os.path.isfile(os.path.expanduser(arg)):
        raise ValueError(f"Data folder {arg!r} is a file, not a directory of class folders.")
    if kind == "folder" and not os.path.isdir(os.path.expanduser(arg)):
        raise FileNotFoundError(f"Data folder {arg!r} does not exist.")


def _model_kwargs(cfg):
    kwargs = dict(input_shape=[cfg["image_size"], cfg["image_size"], 3], classifier_activation=None,
                  dropout=float(cfg["dropout"]), initializer=cfg["initializer"])
    kwargs.update(mean=list(cfg["mean"]), std=list(cfg["std"]))
    if cfg["model"] == "custom":
        kwargs.update(dim=int(cfg["dim"]), depth=int(cfg["depth"]), kernel_size=int(cfg["kernel_size"]),
                      patch_size=int(cfg["patch_size"]), activation=cfg["activation"])
    return kwargs


def build_model(cfg):
    """The classifier (logits out, raw [0, 255] pixels in) described by ``cfg``."""
    kwargs = dict(cfg["model_kwargs"], classes=cfg["num_classes"])
    if cfg["model"] == "custom":
        return ConvMixer(**kwargs, name="convmixer")
    return get_model(cfg["model"], **kwargs)


# ----------------------------------------------------------------------------- strategies


def _has_accelerator():
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.devices()[0].platform != "cpu"
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    return False


def _tf_logical_cpus(n):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * int(n))


def make_strategy(cfg):
    """Return ``(scope, name, num_replicas)`` for ``cfg["strategy"]``. JAX data parallelism is set
    globally with ``keras.distribution`` and its scope is a no-op."""
    name, backend = cfg["strategy"], keras.backend.backend()
    if name == "auto":
        if backend == "tensorflow":
            import tensorflow as tf

            name = "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "none"
        elif backend == "jax":
            import jax

            name = "data-parallel" if len(jax.devices()) > 1 or cfg["num_processes"] > 1 else "none"
        else:
            name = "none"
    if name == "none":
        return contextlib.nullcontext(), name, 1
    if name == "data-parallel":
        distribution = keras.distribution.DataParallel()
        if cfg["num_processes"] > 1:
            # Each process feeds its own shard of the arrays (see _fit_arrays).
            distribution.auto_shard_dataset = False
        keras.distribution.set_distribution(distribution)
        import jax

        return contextlib.nullcontext(), name, len(jax.devices())
    import tensorflow as tf

    if name == "mirrored":
        if cfg["logical_cpus"]:
            _tf_logical_cpus(cfg["logical_cpus"])
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    elif name == "multiworker":
        # Keras 3 fit under MultiWorkerMirroredStrategy fails in keras/src/backend/tensorflow/trainer.py
        # (keras-team/keras#20585, open since TF 2.16). We do not patch private Keras code.
        raise ValueError("--strategy multiworker: Keras 3 fit is broken under MultiWorkerMirroredStrategy "
                         "upstream (keras-team/keras#20585); use KERAS_BACKEND=jax --strategy data-parallel "
                         "with --num-processes/--process-id/--coordinator for multi-machine training.")
    else:  # tpu
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=os.environ.get("TPU_NAME", ""))
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.OpError) as err:
            raise ValueError(f"--strategy tpu: no TPU found ({str(err).splitlines()[0]}).") from None
        strategy = tf.distribute.TPUStrategy(resolver)
    return strategy.scope(), name, strategy.num_replicas_in_sync


# ----------------------------------------------------------------------------- device augmentation model


class AugmentedClassifier(keras.Model):
    """Wraps the classifier for ``augment_on="device"``: inputs ``{"images", "labels"}``.

    Training: ``DeviceAugment`` then MixUp/CutMix, then the classifier. The soft targets the mix
    makes travel as a model output and replace ``y`` in ``compute_loss``/``compute_metrics``, so
    the stock train step of every backend runs it (and threads the layers' seed state).
    """

    def __init__(self, classifier, augment, mix, num_classes, **kwargs):
        super().__init__(**kwargs)
        self.classifier = classifier
        self.augment = augment
        self.mix = mix
        self.num_classes = num_classes

    def call(self, inputs, training=False):
        images, labels = inputs["images"], inputs["labels"]
        if training:
            images = self.augment(images, training=True)
            images, targets = self.mix(images, labels)
        else:
            images = self.augment(images, training=False)
            targets = ops.one_hot(labels, self.num_classes)
        return {"logits": self.classifier(images, training=training), "targets": targets}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return super().compute_loss(x=x, y=y_pred["targets"], y_pred=y_pred["logits"],
                                    sample_weight=sample_weight, training=training)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return super().compute_metrics(x, y_pred["targets"], y_pred["logits"], sample_weight)


def _allow_jit(layer):
    # Keras's geometric layers and RandAugment declare supports_jit=False, which makes the whole
    # train step run without jit on JAX (~3.5x slower); they do trace under jax.jit.
    for sub in layer._flatten_layers(include_self=True, recursive=True):
        sub.supports_jit = True


# ----------------------------------------------------------------------------- data


def _subset(n, size, labels, seed):
    """A seeded, stratified random subset of ``size`` of ``n`` indices, in random order."""
    if size >= n:
        return np.random.default_rng(seed).permutation(n)
    keep, _ = data.stratified_split(labels, n - size, seed)  # the "val" part is what is left out
    return np.random.default_rng(seed).permutation(keep)


def array_batches(images, labels, batch_size, seed):
    """Endless seeded stream of ``({"images", "labels"}, labels)`` batches over in-memory arrays.

    Successive shuffled passes are chained, as the tf.data path's repeated shuffle: an epoch of
    ``steps_per_epoch`` batches that ends inside a pass continues it in the next epoch, so a short
    epoch still draws from every image. NumPy only (no TensorFlow needed).
    """
    rng = np.random.default_rng(seed)
    pending = np.zeros(0, dtype=np.int64)
    while True:
        while len(pending) < batch_size:
            pending = np.concatenate([pending, rng.permutation(len(labels))])
        index, pending = pending[:batch_size], pending[batch_size:]
        yield {"images": images[index], "labels": labels[index]}, labels[index]


def _prepare_data(cfg):
    """Return ``(train, val, fit_kwargs, source_info)`` for the host/device and tf.data/in-memory paths.

    Every path gives ``model.fit`` an endless training stream and a known number of steps per
    epoch, so the optimizer takes exactly ``epochs x steps`` steps and the one-cycle schedule ends
    where it should (a dataset of unknown length makes Keras count one extra step per epoch when
    it runs out). The validation split depends on ``split_seed`` only, not on the training seed.
    """
    batch = int(cfg["batch_size"])
    steps_cap = int(cfg["steps_per_epoch"] or 0)
    if cfg["in_memory"]:
        mem = data.load_in_memory(cfg["data"], image_size=cfg["image_size"], val_split=cfg["val_split"],
                                  seed=cfg["split_seed"], val_source=cfg["val_source"])
        x, y = mem.x_train, mem.y_train
        if cfg["num_processes"] > 1:  # each process feeds its own shard, batch_size per process
            # Equal shard lengths, so every process runs the same steps with the same batch shapes.
            per_process = len(y) // cfg["num_processes"]
            shard = slice(cfg["process_id"], per_process * cfg["num_processes"], cfg["num_processes"])
            x, y = x[shard], y[shard]
            batch //= cfg["num_processes"]
        steps = len(y) // batch
        if steps_cap:
            steps = min(steps, steps_cap)
        xv, yv = mem.x_val, mem.y_val
        if cfg["val_steps"]:
            # A random stratified subset, not a prefix: the arrays are ordered by class.
            keep = _subset(len(yv), int(cfg["val_steps"]) * batch, yv, cfg["split_seed"])
            xv, yv = xv[keep], yv[keep]
        val = ({"images": xv, "labels": yv}, yv) if len(yv) else None
        unreadable = data.DecodeAudit()
        for path, reason in mem.failures.items():
            unreadable.add(path, reason)
        info = dict(class_names=mem.class_names, num_train=len(y), num_val=len(yv), unreadable=unreadable,
                    steps_per_epoch=steps)
        stream = array_batches(x, y, batch, cfg["seed"])
        return stream, val, dict(validation_batch_size=batch, steps_per_epoch=steps, shuffle=False), info

    try:
        import tensorflow as tf
    except ImportError:
        raise ImportError(
            "The tf.data input path needs TensorFlow, which is not installed: "
            "train with --in-memory --augment-on device instead."
        ) from None

    src = data.load_source(cfg["data"], val_split=cfg["val_split"], val_source=cfg["val_source"],
                           seed=cfg["split_seed"], data_dir=cfg["data_dir"], download=cfg["download"])
    n = src.num_classes
    common = dict(image_size=cfg["image_size"], batch_size=batch, seed=cfg["seed"], crop_pct=cfg["crop_pct"],
                  interpolation=cfg["interpolation"])
    image_map = aug.host_image_map(cfg)
    if cfg["augment_on"] == "host":
        train = data.make_dataset(src.train, training=True, image_map=image_map,
                                  batch_map=aug.host_batch_map(cfg, n), repeat=True, **common)
    else:
        train = data.make_dataset(src.train, training=True, image_map=image_map, repeat=True, **common)
        train = train.map(lambda x, y: ({"images": x, "labels": y}, y))
    steps = src.num_train // batch
    if steps_cap:
        steps = min(steps, steps_cap)
    val = None
    if src.val is not None:
        val = data.make_dataset(src.val, training=False, **common)
        if cfg["augment_on"] == "host":
            val = val.map(lambda x, y: (x, tf.one_hot(y, n)))
        else:
            val = val.map(lambda x, y: ({"images": x, "labels": y}, y))
        if cfg["val_steps"]:
            val = val.take(int(cfg["val_steps"]))
    info = dict(class_names=src.class_names, num_train=src.num_train, num_val=src.num_val, unreadable=src.audit,
                steps_per_epoch=steps)
    return train, val, dict(shuffle=False, steps_per_epoch=steps), info  # tf.data shuffles itself


# ----------------------------------------------------------------------------- callbacks


class ThroughputLogger(keras.callbacks.Callback):
    """Adds ``images_per_sec`` (training steps only) and ``epoch_time_s`` to the epoch logs.

    It counts the batches it saw, so the figure is right whatever Keras knows of the epoch's length.
    The count is taken at batch *begin*: a batch-end hook would turn off Keras's asynchronous
    callback dispatch and sync with the device after every step.
    """

    def __init__(self, images_per_step):
        super().__init__()
        self.images_per_step = images_per_step

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._train_end, self._batches = time.perf_counter(), None, 0

    def on_train_batch_begin(self, batch, logs=None):
        self._batches = batch + 1  # the step index (steps_per_execution is 1)

    def on_test_begin(self, logs=None):
        # Validation starts once the epoch's training steps are done.
        if self._train_end is None:
            self._train_end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        if logs is not None:
            train_time = (self._train_end or now) - self._start
            logs["images_per_sec"] = self._batches * self.images_per_step / max(train_time, 1e-9)
            logs["epoch_time_s"] = now - self._start


class UnreadableFilesLogger(keras.callbacks.Callback):
    """Names, once, each image file the input pipeline could not use (the decode step records them as
    the stream passes them), so a damaged file is never silently left out."""

    def __init__(self, audit, log=print):
        super().__init__()
        self.audit, self.log, self._reported = audit, log, set()

    def on_epoch_end(self, epoch, logs=None):
        new = {p: r for p, r in self.audit.failures.items() if p not in self._reported}
        if new:
            self._reported.update(new)
            listed = "; ".join(f"{p}: {r}" for p, r in list(new.items())[:5])
            more = f" and {len(new) - 5} more (all in metrics.json)" if len(new) > 5 else ""
            self.log(f"Left out {len(new)} unreadable image file{'s' if len(new) > 1 else ''}: {listed}{more}")


class TrainingDiverged(RuntimeError):
    """The loss or the weights became non-finite; nothing from that epoch was saved."""


class FiniteGuard(keras.callbacks.Callback):
    """At each epoch's end, checks that the loss and every float weight are finite. When they are not
    it stops training and records the epoch; the backup and the checkpoints consult ``ok`` first,
    so non-finite weights are never written (a resume then starts from the last finite epoch)."""

    def __init__(self):
        super().__init__()
        self.diverged_epoch = None

    @property
    def ok(self):
        return self.diverged_epoch is None

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        finite = loss is not None and math.isfinite(float(loss)) and all(
            bool(ops.convert_to_numpy(ops.all(ops.isfinite(w))))
            for w in self.model.weights if "float" in str(w.dtype))
        if not finite:
            self.diverged_epoch = epoch + 1
            self.model.stop_training = True


class RunCheckpoint(keras.callbacks.Callback):
    """Saves each finished epoch into the run directory, in an order that survives a kill anywhere:
    ``last.keras``, ``best.keras`` when ``monitor`` improves, the backup checkpoint, and last the
    history row that commits the epoch. On ``train_begin`` it resumes from the last committed epoch.
    The classifier is saved bare (not a training wrapper). With a ``guard``, an epoch whose
    weights are not finite is not saved at all."""

    def __init__(self, classifier, run, monitor="val_top1", guard=None):
        super().__init__()
        self.classifier, self.run, self.monitor, self.guard = classifier, run, monitor, guard
        self.rows = []

    def on_train_begin(self, logs=None):
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:  # its variables must exist to be loaded
            optimizer.build(self.model.trainable_variables)
        done = self.run.restore(self.model)
        self.rows = self.run.history()
        self.model._initial_epoch = done or None  # as keras.callbacks.BackupAndRestore does

    def on_epoch_end(self, epoch, logs=None):
        if self.guard is not None and not self.guard.ok:
            return
        row = {"epoch": epoch, **{k: float(v) for k, v in (logs or {}).items()}}
        monitor = self.monitor if self.monitor in row else "top1"
        best = rundir.best_of(self.rows, monitor)
        rundir.save_model(self.classifier, self.run / rundir.LAST_MODEL)
        value = row.get(monitor)
        if value is not None and math.isfinite(value) and (best is None or value > best["value"]):
            rundir.save_model(self.classifier, self.run / rundir.BEST_MODEL)
        self.rows = [*self.rows, row]
        self.run.commit_epoch(self.model, self.rows, monitor)


def _tensorboard(run_dir):
    try:  # the TensorBoard callback writes with tf.summary, which needs the tensorboard package
        import tensorboard  # noqa: F401
        import tensorflow  # noqa: F401
    except ImportError:
        print("TensorBoard logs skipped: TensorFlow/tensorboard is not installed.")
        return []
    return [keras.callbacks.TensorBoard(log_dir=os.path.join(run_dir, "tensorboard"))]


def _set_precision(cfg):
    policy = cfg["precision"]
    if policy == "auto":
        policy = "mixed_bfloat16" if _has_accelerator() else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def _init_distributed(cfg):
    if cfg["strategy"] in ("data-parallel", "auto") and cfg["num_processes"] > 1:
        if keras.backend.backend() != "jax":
            raise ValueError("--num-processes > 1 needs KERAS_BACKEND=jax --strategy data-parallel.")
        keras.distribution.initialize(job_addresses=cfg["coordinator"], num_processes=cfg["num_processes"],
                                      process_id=cfg["process_id"])


# Settings that may change between a run and its resumption.
_RESUME_MAY_CHANGE = ("output_dir", "verbose")


def train(config):
    """Train per ``config`` (from ``resolve_config``); returns the metrics written to metrics.json."""
    cfg = dict(config)
    t_start = time.perf_counter()
    _init_distributed(cfg)  # before any JAX computation
    keras.utils.set_random_seed(int(cfg["seed"]))
    run_dir = cfg["output_dir"]
    if cfg["process_id"]:
        # Every process trains the same replicated model; on a shared filesystem they would
        # overwrite each other's backup and checkpoints. Process 0 owns the run dir itself.
        run_dir = os.path.join(run_dir, f"process_{cfg['process_id']}")
    run = rundir.RunDir(run_dir).create().lock()
    try:
        return _train_locked(cfg, run, t_start)
    finally:
        run.unlock()


def _train_locked(cfg, run, t_start):
    run_dir = run.path
    saved = run.read_config()
    if saved is not None:
        rundir.check_resumable(saved, dict(cfg, backend=keras.backend.backend()), _RESUME_MAY_CHANGE, run_dir)
    scope, strategy_name, replicas = make_strategy(cfg)
    train_data, val_data, fit_kwargs, info = _prepare_data(cfg)
    if info["num_train"] == 0 or info["steps_per_epoch"] == 0:
        raise ValueError(f"{cfg['data']}: fewer training images than one batch of {cfg['batch_size']}.")
    cfg.update(num_classes=len(info["class_names"]), class_names=list(info["class_names"]))
    if saved is not None:
        rundir.check_resumable(saved, {"class_names": cfg["class_names"], "data": cfg["data"]}, (), run_dir)
    cfg.update(strategy_used=strategy_name, backend=keras.backend.backend())
    steps = info["steps_per_epoch"]
    total_steps = steps * int(cfg["epochs"])

    previous_policy = keras.mixed_precision.global_policy()
    try:
        with scope:
            device = cfg["augment_on"] == "device"
            if device:  # augmentation layers stay float32 whatever the policy
                augment = aug.DeviceAugment(cfg, crop=bool(cfg["in_memory"]), name="device_augment")
                mix = aug.make_batch_mix(cfg, cfg["num_classes"], host=False)
            cfg["precision_used"] = _set_precision(cfg)
            classifier = build_model(cfg)
            model = AugmentedClassifier(classifier, augment, mix, cfg["num_classes"]) if device else classifier
            if device:  # BackupAndRestore needs a built model; a subclassed one builds on its first call
                size = cfg["image_size"]
                model({"images": np.zeros((1, size, size, 3), "float32"), "labels": np.zeros((1,), "int32")})
            if device and keras.backend.backend() == "jax":
                _allow_jit(augment)
                _allow_jit(mix)
            lr = float(cfg["lr"])
            if cfg["schedule"] == "onecycle":
                schedule = OneCycle(lr, total_steps, steps_per_epoch=steps)
            else:
                schedule = cosine_with_warmup(lr, total_steps, int(cfg["warmup_epochs"] * steps))
            optimizer = keras.optimizers.AdamW(
                learning_rate=schedule, weight_decay=float(cfg["weight_decay"]), epsilon=float(cfg["epsilon"]),
                global_clipnorm=cfg["clip_norm"] or None)
            if cfg["wd_exclude_bias_bn"]:
                # Matches Keras variable names: every bias, and BN's gamma/beta (timm: all 1-D params).
                optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
            model.compile(
                optimizer=optimizer,
                loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                metrics=[keras.metrics.CategoricalAccuracy(name="top1"),
                         keras.metrics.TopKCategoricalAccuracy(k=min(5, cfg["num_classes"]), name="top5")],
            )
        run.write_config(cfg)

        guard = FiniteGuard()
        callbacks = [
            LearningRateLogger(),
            ThroughputLogger(int(cfg["batch_size"])),
            keras.callbacks.TerminateOnNaN(),
            guard,  # before everything that saves
            UnreadableFilesLogger(info["unreadable"]),
            # After the loggers, whose figures it records in history.csv.
            RunCheckpoint(classifier, run, "val_top1" if val_data is not None else "top1", guard),
            *_tensorboard(run_dir),
        ]
        verbose = cfg["verbose"]
        print(f"Training {cfg['model']} on {cfg['data']}: {info['num_train']} train / {info['num_val']} val "
              f"images, {len(info['class_names'])} classes, {cfg['epochs']} epochs x {steps} steps, "
              f"batch {cfg['batch_size']}, strategy {strategy_name} ({replicas} replicas), "
              f"{cfg['precision_used']}, augment on {cfg['augment_on']}; run dir {run_dir}"
              + (f"; left out {len(info['unreadable'])} unreadable files" if len(info["unreadable"]) else ""))
        with warnings.catch_warnings():
            # Training streams never run out (they repeat); the validation set, whose length is
            # unknown when undecodable files are skipped, ends each pass with this warning.
            warnings.filterwarnings("ignore", message="Your input ran out of data")
            model.fit(train_data[0] if isinstance(train_data, tuple) else train_data,
                      train_data[1] if isinstance(train_data, tuple) else None,
                      validation_data=val_data, epochs=int(cfg["epochs"]), callbacks=callbacks,
                      verbose=verbose, **fit_kwargs)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    if not guard.ok:
        last = run / rundir.LAST_MODEL
        kept = (f"the last finite checkpoint is {last} (epoch {guard.diverged_epoch - 1})"
                if guard.diverged_epoch > 1 and os.path.exists(last) else "no checkpoint was written")
        raise TrainingDiverged(f"training diverged at epoch {guard.diverged_epoch}: the loss or weights became "
                               f"non-finite (lower --lr, or set --clip-norm); nothing from that epoch was saved, "
                               f"{kept}.")
    rows = run.history()
    rundir.plot_curves(rows, run / rundir.CURVES)
    last = rows[-1] if rows else {}

    num = rundir.history_value
    ips = [num(r, "images_per_sec") for r in rows if num(r, "images_per_sec") is not None]
    metrics = dict(
        val_top1=num(last, "val_top1"), val_top5=num(last, "val_top5"),
        best_val_top1=max((num(r, "val_top1") for r in rows if num(r, "val_top1") is not None), default=None),
        train_top1=num(last, "top1"), epochs=len(rows),
        wall_time_s=round(time.perf_counter() - t_start, 2),
        train_time_s=round(sum(num(r, "epoch_time_s") or 0.0 for r in rows), 2),
        images_per_sec=round(float(np.mean(ips)), 1) if ips else None,
        params=int(classifier.count_params()),
        # epochs x steps_per_epoch on a run that finished; a resumed run restores the count.
        optimizer_steps=int(ops.convert_to_numpy(model.optimizer.iterations)),
        steps_per_epoch=steps, backend=keras.backend.backend(), strategy=strategy_name, run_dir=run_dir,
        unreadable_files=info["unreadable"].failures,
    )
    rundir.write_json(run / rundir.METRICS, metrics)
    if metrics["val_top1"] is None:  # no validation split: say what best.keras was chosen on
        scores = f"train top-1 {metrics['train_top1']:.2%} (no validation)" if rows else "no epochs"
    else:
        top5 = "n/a" if metrics["val_top5"] is None else f"{metrics['val_top5']:.2%}"
        scores = f"val top-1 {metrics['val_top1']:.2%}, top-5 {top5}"
    left_out = len(metrics["unreadable_files"])
    unreadable = f", {left_out} unreadable files left out" if left_out else ""
    print(f"Done: {metrics['epochs']} epochs, {scores}{unreadable}, {metrics['wall_time_s']:.0f} s, "
          f"{metrics['images_per_sec'] or 0:.0f} img/s, {metrics['params']:,} params -> {run_dir}")
    return metrics
