"""Training: the model, ``model.fit`` on what ``inputs`` prepares, and the run directory it fills.

``train(config)`` takes a config from ``recipes.resolve_config``, writes the run directory
(config.json, history.csv, best.keras/last.keras, TensorBoard logs, the backup checkpoints,
curves.png, metrics.json) and returns the final metrics. TensorFlow is imported only for
tf.data sources and TensorFlow strategies.
"""

import errno
import time
import types
import warnings

import keras
import numpy as np
from keras import ops

from keras_convmixer import artifacts, callbacks, distribute, inputs, report, resume, rundir
from keras_convmixer import augment as aug
from keras_convmixer.config import Config, RunRecord, run_json, view
from keras_convmixer.finetune import build_model, follow_weights, freeze_backbone, load_backbone
from keras_convmixer.schedules import OneCycle, cosine_with_warmup

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

    def build(self, input_shape):
        # Keras builds a subclassed model on its first batch and warns when nothing says how: the
        # augmentation keeps the image shape the classifier then takes.
        images = tuple(input_shape["images"])
        if not self.augment.built:
            self.augment.build(images)
        if not self.classifier.built:
            self.classifier.build(self.augment.compute_output_shape(images))
        self.built = True

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


def train(config):
    """Train per ``config`` (from ``recipes.resolve_config``, a dict or a ``Config``); returns the metrics
    written to metrics.json. A run that has trained all its epochs already says so and returns its metrics.

    Everything that can fail on what the user passed (the data, the strategy, the weights, a busy or unusable
    run directory) is checked before the run directory is made; a run that fails before its first epoch is
    recorded takes away what it made (never a directory that was there before, nor a recorded epoch)."""
    config = config if isinstance(config, Config) else Config(config)
    t_start = time.perf_counter()
    run = rundir.RunDir(resume.run_path(config))
    done = resume.finished(config)
    if done is not None:
        print(resume.complete_line(done, run.path))
        return done
    distribute.init_distributed(config)  # before any JAX computation
    keras.utils.set_random_seed(int(config.seed))
    previous_policy = keras.mixed_precision.global_policy()
    try:
        plan = _plan(config, run.check().check_free())
        with run.claimed():
            if run.read_config() != plan.saved or len(run.history()) != plan.epochs_done:
                raise rundir.RunDirBusy(
                    errno.EBUSY,
                    f"run dir {run.path} was written by another run while this one started: re-run the command",
                )
            return _run(plan, run, t_start)
    except Exception as err:
        lost = distribute.peer_lost(err, config)  # from a step, a data transfer or a save alike
        if lost is None:
            raise
        raise lost from None
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _build(config, record, load_weights):
    """``(classifier, model)``: the model that ``fit`` trains wraps the classifier when the augmentation runs
    on the device. With ``load_weights`` the classifier starts from the weights, and ``record`` keeps what was
    loaded. Call inside the strategy's scope."""
    device = config.augment_on == "device"
    if device:  # augmentation layers stay float32 whatever the policy
        augment = aug.DeviceAugment(config, crop=bool(config.in_memory), name="device_augment")
        mix = aug.make_batch_mix(config, record.num_classes, host=False)
    record.precision_used = distribute.set_precision(config)
    classifier = build_model(view(config, record))
    if load_weights:
        record.weights = load_backbone(classifier, view(config, record))
    if config.freeze_backbone:
        freeze_backbone(classifier)
    if not device:
        return classifier, classifier
    model = AugmentedClassifier(classifier, augment, mix, record.num_classes)
    # A subclassed model builds on its first call; restoring a checkpoint needs it built.
    size = config.image_size
    model({"images": np.zeros((1, size, size, 3), "float32"), "labels": np.zeros((1,), "int32")})
    if keras.backend.backend() == "jax":
        _allow_jit(augment)
        _allow_jit(mix)
    return classifier, model


def _optimizer(config, total_steps, steps_per_epoch):
    """``(optimizer, schedule)``: AdamW (grouped where the backbone steps with a lower lr) on the schedule."""
    lr = float(config.lr)
    if config.schedule == "onecycle":
        schedule = OneCycle(lr, total_steps, steps_per_epoch=steps_per_epoch, breakpoints=config.lr_breakpoints)
    else:
        schedule = cosine_with_warmup(lr, total_steps, int(config.warmup_epochs * steps_per_epoch))
    adamw = dict(
        learning_rate=schedule,
        weight_decay=float(config.weight_decay),
        epsilon=float(config.epsilon),
        global_clipnorm=config.clip_norm or None,
    )
    if float(config.backbone_lr_scale) != 1.0:
        from keras_convmixer.optim import BACKBONE_VARIABLES, GroupedAdamW

        scale = float(config.backbone_lr_scale)
        optimizer = GroupedAdamW(**adamw, lr_scale=scale, scaled_variables=BACKBONE_VARIABLES)
    else:
        optimizer = keras.optimizers.AdamW(**adamw)
    if config.wd_exclude_bias_bn:
        # Matches Keras variable names: every bias, and BN's gamma/beta (timm: all 1-D params).
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer, schedule


def _compile(config, record, total_steps, steps_per_epoch, load_weights=False):
    """``(classifier, model, schedule)``, compiled. Call inside the strategy's scope."""
    classifier, model = _build(config, record, load_weights)
    optimizer, schedule = _optimizer(config, total_steps, steps_per_epoch)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=[
            keras.metrics.CategoricalAccuracy(name="top1"),
            keras.metrics.TopKCategoricalAccuracy(k=min(5, record.num_classes), name="top5"),
        ],
    )
    return classifier, model, schedule


def _follow_weights(config):
    """``config`` with the settings that follow the pretrained weights set to their metadata."""
    values = config.as_dict()
    follow_weights(values)  # sets them in ``values`` (and checks them)
    return Config(values)


def _data(config, record, saved, run_dir):
    """``inputs.prepare``'s ``(train, val, fit_kwargs, info)``, checked: at least one batch, and on resume the
    classes the run began with; ``record`` gets the classes."""
    prepared = inputs.prepare(config, record.strategy_used)
    info = prepared[3]
    if info["num_train"] == 0 or info["steps_per_epoch"] == 0:
        raise ValueError(f"{config.data}: fewer training images than one batch of {config.batch_size}.")
    record.class_names, record.num_classes = list(info["class_names"]), len(info["class_names"])
    resume.check_data(saved, record.class_names, config.data, run_dir)
    return prepared


def _fit(model, train_data, val_data, config, hooks, fit_kwargs):
    with warnings.catch_warnings():
        # Training streams never run out (they repeat); the validation set, whose length is
        # unknown when undecodable files are skipped, ends each pass with this warning.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        model.fit(
            train_data[0] if isinstance(train_data, tuple) else train_data,
            train_data[1] if isinstance(train_data, tuple) else None,
            validation_data=val_data,
            epochs=int(config.epochs),
            callbacks=hooks,
            verbose=config.verbose,
            **fit_kwargs,
        )


def _plan(config, run):
    """Everything a run needs before it writes: the settings reconciled with the run it resumes, the strategy,
    the data and the compiled model (pretrained weights loaded where it starts). Writes nothing into ``run``."""
    saved = run.read_config()
    epochs_done = len(run.history())
    # A run with committed epochs resumes from its own checkpoint; pretrained weights only start one.
    starting = bool(config.weights) and not epochs_done
    backend = keras.backend.backend()
    config, weights = resume.reconcile(config, saved, run.path, backend, starting)
    if starting:
        config = _follow_weights(config)
    record = RunRecord(backend=backend, weights=weights)
    scope, record.strategy_used, replicas = distribute.make_strategy(config)
    prepared = _data(config, record, saved, run.path)
    steps = prepared[3]["steps_per_epoch"]
    total_steps = steps * int(config.epochs)
    with scope:
        compiled = _compile(config, record, total_steps, steps, load_weights=starting)
    return types.SimpleNamespace(
        config=config,
        record=record,
        saved=saved,
        epochs_done=epochs_done,
        starting=starting,
        replicas=replicas,
        prepared=prepared,
        compiled=compiled,
        total_steps=total_steps,
    )


def _run(plan, run, t_start):
    """Train ``plan`` into the locked ``run``, then write the closing artefacts."""
    config, record = plan.config, plan.record
    train_data, val_data, fit_kwargs, info = plan.prepared
    classifier, model, schedule = plan.compiled
    run.write_config(run_json(config, record))
    guard = callbacks.FiniteGuard()
    hooks = callbacks.for_run(
        classifier,
        run,
        batch_size=config.batch_size,
        unreadable=info["unreadable"],
        validated=val_data is not None,
        guard=guard,
        entries=artifacts.preset_entries(view(config, record)),  # a copied best.keras predicts as the run
        stream=info.get("stream"),
    )
    print(report.banner(config, record, info, plan.replicas, plan.starting, run.path))
    _fit(model, train_data, val_data, config, hooks, fit_kwargs)
    if not guard.ok:
        raise report.diverged(guard, run, int(config.epochs))
    return report.finish(config, record, run, (classifier, model, schedule, plan.total_steps), info, t_start)
