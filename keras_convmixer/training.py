"""Training: the model, the data wiring, ``model.fit`` and the run directory it fills.

``train(config)`` takes a config from ``recipes.resolve_config``, writes the run directory
(config.json, history.csv, best.keras/last.keras, TensorBoard logs, the backup checkpoints,
curves.png, metrics.json) and returns the final metrics. TensorFlow is imported only for
tf.data sources and TensorFlow strategies.
"""

import os
import time
import warnings

import keras
import numpy as np
from keras import ops

from keras_convmixer import augment as aug
from keras_convmixer import atomic, callbacks, curves, data, distribute, recipes, rundir
from keras_convmixer.finetune import build_model, follow_weights, freeze_backbone, load_backbone, weights_source
from keras_convmixer.recipes import describe_model
from keras_convmixer.schedules import OneCycle, cosine_with_warmup, learning_rate_curve

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
        return super().compute_loss(
            x=x, y=y_pred["targets"], y_pred=y_pred["logits"], sample_weight=sample_weight, training=training
        )

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
    # Both paths split the same way, so an in-memory run validates on the images a tf.data run would.
    split = dict(val_split=cfg["val_split"], val_source=cfg["val_source"], seed=cfg["split_seed"])
    if cfg["in_memory"]:
        mem = data.load_in_memory(cfg["data"], image_size=cfg["image_size"], **split)
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
        info = dict(
            class_names=mem.class_names, num_train=len(y), num_val=len(yv), unreadable=unreadable, steps_per_epoch=steps
        )
        stream = array_batches(x, y, batch, cfg["seed"])
        return stream, val, dict(validation_batch_size=batch, steps_per_epoch=steps, shuffle=False), info

    try:
        import tensorflow as tf
    except ImportError:
        raise ImportError(
            "The tf.data input path needs TensorFlow, which is not installed: "
            "train with --in-memory --augment-on device instead."
        ) from None

    src = data.load_source(cfg["data"], data_dir=cfg["data_dir"], download=cfg["download"], **split)
    n = src.num_classes
    common = dict(
        image_size=cfg["image_size"],
        batch_size=batch,
        seed=cfg["seed"],
        crop_pct=cfg["crop_pct"],
        interpolation=cfg["interpolation"],
    )
    image_map = aug.host_image_map(cfg)
    if cfg["augment_on"] == "host":
        train = data.make_dataset(
            src.train, training=True, image_map=image_map, batch_map=aug.host_batch_map(cfg, n), repeat=True, **common
        )
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
    info = dict(
        class_names=src.class_names,
        num_train=src.num_train,
        num_val=src.num_val,
        unreadable=src.audit,
        steps_per_epoch=steps,
    )
    return train, val, dict(shuffle=False, steps_per_epoch=steps), info  # tf.data shuffles itself


# Settings that may change between a run and its resumption.
_RESUME_MAY_CHANGE = ("output_dir", "verbose")


def train(config):
    """Train per ``config`` (from ``recipes.resolve_config``); returns the metrics written to metrics.json."""
    cfg = dict(config)
    t_start = time.perf_counter()
    distribute.init_distributed(cfg)  # before any JAX computation
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


def _compile(cfg, total_steps, steps_per_epoch, load_weights=False):
    """``(classifier, model, schedule)``: the model that ``fit`` trains wraps the classifier when the
    augmentation runs on the device. With ``load_weights`` the classifier starts from ``cfg["weights"]``,
    whose record replaces that setting in ``cfg``. Call inside the strategy's scope."""
    device = cfg["augment_on"] == "device"
    if device:  # augmentation layers stay float32 whatever the policy
        augment = aug.DeviceAugment(cfg, crop=bool(cfg["in_memory"]), name="device_augment")
        mix = aug.make_batch_mix(cfg, cfg["num_classes"], host=False)
    cfg["precision_used"] = distribute.set_precision(cfg)
    classifier = build_model(cfg)
    if load_weights:
        cfg["weights"] = load_backbone(classifier, cfg)
    if cfg["freeze_backbone"]:
        freeze_backbone(classifier)
    model = classifier
    if device:
        model = AugmentedClassifier(classifier, augment, mix, cfg["num_classes"])
        # A subclassed model builds on its first call; restoring a checkpoint needs it built.
        size = cfg["image_size"]
        model({"images": np.zeros((1, size, size, 3), "float32"), "labels": np.zeros((1,), "int32")})
        if keras.backend.backend() == "jax":
            _allow_jit(augment)
            _allow_jit(mix)
    lr = float(cfg["lr"])
    if cfg["schedule"] == "onecycle":
        schedule = OneCycle(lr, total_steps, steps_per_epoch=steps_per_epoch)
    else:
        schedule = cosine_with_warmup(lr, total_steps, int(cfg["warmup_epochs"] * steps_per_epoch))
    adamw = dict(
        learning_rate=schedule,
        weight_decay=float(cfg["weight_decay"]),
        epsilon=float(cfg["epsilon"]),
        global_clipnorm=cfg["clip_norm"] or None,
    )
    if float(cfg["backbone_lr_scale"]) != 1.0:
        from keras_convmixer.optim import BACKBONE_VARIABLES, GroupedAdamW

        optimizer = GroupedAdamW(**adamw, lr_scale=float(cfg["backbone_lr_scale"]), scaled_variables=BACKBONE_VARIABLES)
    else:
        optimizer = keras.optimizers.AdamW(**adamw)
    if cfg["wd_exclude_bias_bn"]:
        # Matches Keras variable names: every bias, and BN's gamma/beta (timm: all 1-D params).
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=[
            keras.metrics.CategoricalAccuracy(name="top1"),
            keras.metrics.TopKCategoricalAccuracy(k=min(5, cfg["num_classes"]), name="top5"),
        ],
    )
    return classifier, model, schedule


def _train_locked(cfg, run, t_start):
    run_dir = run.path
    saved = run.read_config()
    # A run with committed epochs resumes from its own checkpoint; pretrained weights only start one.
    start_from_weights = bool(cfg["weights"]) and not run.history()
    if saved is not None:
        # Another --weights is another run, named first (the settings that follow the weights differ too).
        rundir.check_resumable(
            {"weights": weights_source(saved.get("weights"))}, {"weights": cfg["weights"]}, (), run_dir
        )
        if cfg["weights"]:
            # What the weights' metadata set when the run began (no need to read the weights again).
            for key in set(cfg["from_weights"]) & set(saved.get("from_weights") or ()):
                cfg[key] = saved[key]
            cfg["model_kwargs"] = recipes.model_kwargs(cfg)
            if not start_from_weights:
                cfg["weights"] = saved["weights"]
        current = dict(cfg, backend=keras.backend.backend(), weights=weights_source(cfg["weights"]))
        recorded = dict(saved, weights=weights_source(saved.get("weights")))
        rundir.check_resumable(recorded, current, _RESUME_MAY_CHANGE, run_dir)
    if start_from_weights:
        follow_weights(cfg)
    scope, strategy_name, replicas = distribute.make_strategy(cfg)
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
            classifier, model, schedule = _compile(cfg, total_steps, steps, load_weights=start_from_weights)
        run.write_config(cfg)

        guard = callbacks.FiniteGuard()
        hooks = [
            callbacks.LearningRateLogger(),
            callbacks.ThroughputLogger(int(cfg["batch_size"])),
            keras.callbacks.TerminateOnNaN(),
            guard,  # before everything that saves
            callbacks.UnreadableFilesLogger(info["unreadable"]),
            # After the loggers, whose figures it records in history.csv.
            callbacks.RunCheckpoint(classifier, run, "val_top1" if val_data is not None else "top1", guard),
            *callbacks.tensorboard_logs(run_dir),
        ]
        unreadable = len(info["unreadable"])
        start = _start_note(cfg, start_from_weights)
        print(
            f"Training {describe_model(cfg)}{start} on {cfg['data']}: {info['num_train']} train / "
            f"{info['num_val']} val images, {len(info['class_names'])} classes, "
            f"{cfg['epochs']} epochs x {steps} steps, "
            f"batch {cfg['batch_size']}, strategy {strategy_name} ({_count(replicas, 'replica')}), "
            f"{cfg['precision_used']}, augment on {cfg['augment_on']}; run dir {run_dir}"
            + (f"; left out {_count(unreadable, 'unreadable file')}" if unreadable else "")
        )
        with warnings.catch_warnings():
            # Training streams never run out (they repeat); the validation set, whose length is
            # unknown when undecodable files are skipped, ends each pass with this warning.
            warnings.filterwarnings("ignore", message="Your input ran out of data")
            model.fit(
                train_data[0] if isinstance(train_data, tuple) else train_data,
                train_data[1] if isinstance(train_data, tuple) else None,
                validation_data=val_data,
                epochs=int(cfg["epochs"]),
                callbacks=hooks,
                verbose=cfg["verbose"],
                **fit_kwargs,
            )
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    if not guard.ok:
        last = run / rundir.LAST_MODEL
        kept = (
            f"the last finite checkpoint is {last} (epoch {guard.diverged_epoch - 1})"
            if guard.diverged_epoch > 1 and os.path.exists(last)
            else "no checkpoint was written"
        )
        raise callbacks.TrainingDiverged(
            f"training diverged at epoch {guard.diverged_epoch}: the loss or weights became non-finite (lower "
            f"--lr, or set --clip-norm); nothing from that epoch was saved, {kept}."
        )
    rows = run.history()
    title = f"{describe_model(cfg)}, recipe {cfg['recipe']}, {cfg['backend']} backend"
    curves.plot_curves(
        rows,
        run / rundir.CURVES,
        lr_curve=learning_rate_curve(schedule, total_steps, steps),
        title=title[0].upper() + title[1:],
        note=_curves_note(cfg),
    )
    metrics = _metrics(cfg, rows, classifier, model, info, t_start, strategy_name, run_dir)
    atomic.write_json(run / rundir.METRICS, metrics)
    if metrics["val_top1"] is None:  # no validation split: say what best.keras was chosen on
        scores = f"train top-1 {metrics['train_top1']:.2%} (no validation)" if rows else "no epochs"
    else:
        top5 = "n/a" if metrics["val_top5"] is None else f"{metrics['val_top5']:.2%}"
        scores = f"val top-1 {metrics['val_top1']:.2%}, top-5 {top5}"
    left_out = len(metrics["unreadable_files"])
    unreadable = f", {_count(left_out, 'unreadable file')} left out" if left_out else ""
    print(
        f"Done: {metrics['epochs']} epochs, {scores}{unreadable}, {metrics['wall_time_s']:.0f} s, "
        f"{metrics['images_per_sec'] or 0:.0f} img/s, {metrics['params']:,} params -> {run_dir}"
    )
    return metrics


def _start_note(cfg, loaded):
    """Where the weights come from and what trains, for the banner; empty for a plain run."""
    parts = []
    record = cfg["weights"]
    if record:
        how = "loaded" if loaded else "resumed from the run's checkpoint"
        head = "head loaded" if record.get("head_loaded") else "new head"
        parts.append(f"from {record['source']} ({how}, {head})")
    if cfg["freeze_backbone"]:
        parts.append("backbone frozen")
    if float(cfg["backbone_lr_scale"]) != 1.0:
        parts.append(f"backbone lr x{float(cfg['backbone_lr_scale']):g}")
    return f" {', '.join(parts)}" if parts else ""


def _count(n, noun):
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _curves_note(cfg):
    """Why the training curves sit where they do next to the validation ones."""
    targets = []
    if cfg["label_smoothing"]:
        targets.append(f"label smoothing {cfg['label_smoothing']:g}")
    if cfg["mixup_alpha"] or cfg["cutmix_alpha"]:
        targets.append("MixUp/CutMix")
    soft = f" whose targets include {' and '.join(targets)}" if targets else ""
    return (
        f"Train loss and top-1 are measured on augmented batches{soft}, averaged over each epoch; "
        "validation uses unaugmented images and one-hot labels."
    )


def _metrics(cfg, rows, classifier, model, info, t_start, strategy_name, run_dir):
    num = rundir.history_value
    last = rows[-1] if rows else {}
    ips = [num(r, "images_per_sec") for r in rows if num(r, "images_per_sec") is not None]
    return dict(
        val_top1=num(last, "val_top1"),
        val_top5=num(last, "val_top5"),
        best_val_top1=max((num(r, "val_top1") for r in rows if num(r, "val_top1") is not None), default=None),
        train_top1=num(last, "top1"),
        epochs=len(rows),
        wall_time_s=round(time.perf_counter() - t_start, 2),
        train_time_s=round(sum(num(r, "epoch_time_s") or 0.0 for r in rows), 2),
        images_per_sec=round(float(np.mean(ips)), 1) if ips else None,
        params=int(classifier.count_params()),
        # epochs x steps_per_epoch on a run that finished; a resumed run restores the count.
        optimizer_steps=int(ops.convert_to_numpy(model.optimizer.iterations)),
        steps_per_epoch=info["steps_per_epoch"],
        backend=keras.backend.backend(),
        strategy=strategy_name,
        run_dir=run_dir,
        unreadable_files=info["unreadable"].failures,
    )
