"""What a training run tells its user and leaves in its run directory at the end: the banner, the divergence
message, curves.png, metrics.json and the closing line."""

import os
import time

import keras
import numpy as np
from keras import ops

from keras_convmixer import atomic, callbacks, curves, rundir
from keras_convmixer.recipes import describe_model
from keras_convmixer.resume import count
from keras_convmixer.schedules import learning_rate_curve


def start_note(config, weights, loaded):
    """Where the weights come from and what trains, for the banner; empty for a plain run. ``weights`` is the
    record of the loaded weights ({source, head_loaded, ...}) or None."""
    parts = []
    if weights:
        how = "loaded" if loaded else "resumed from the run's checkpoint"
        head = "head loaded" if weights.get("head_loaded") else "new head"
        parts.append(f"from {weights['source']} ({how}, {head})")
    if config.freeze_backbone:
        parts.append("backbone frozen")
    if float(config.backbone_lr_scale) != 1.0:
        parts.append(f"backbone lr x{float(config.backbone_lr_scale):g}")
    return f" {', '.join(parts)}" if parts else ""


def banner(config, record, info, replicas, loaded, run_dir):
    """The line that opens a run: what trains on what, how long, where and how."""
    unreadable = len(info["unreadable"])
    stream = info.get("stream")
    streamed = f", streamed: {count(stream.local_batch, 'image')} of each batch per process" if stream else ""
    return (
        f"Training {describe_model(config)}{start_note(config, record.weights, loaded)} on {config.data}: "
        f"{info['num_train']} train / {count(info['num_val'], 'val image')}, "
        f"{count(len(info['class_names']), 'class', 'classes')}, "
        f"{count(int(config.epochs), 'epoch')} x {count(info['steps_per_epoch'], 'step')}, "
        f"batch {config.batch_size}, strategy {record.strategy_used} ({count(replicas, 'replica')}), "
        f"{record.precision_used}, augment on {config.augment_on}{streamed}; run dir {run_dir}"
        + (f"; left out {count(unreadable, 'unreadable file')}" if unreadable else "")
    )


def diverged(guard, run, epochs):
    """The error a diverged run ends with: where it diverged and which checkpoint is left."""
    last = run / rundir.LAST_MODEL
    kept = (
        f"the last finite checkpoint is {last} (after {count(guard.diverged_epoch - 1, 'epoch')})"
        if guard.diverged_epoch > 1 and os.path.exists(last)
        else "no checkpoint was written"
    )
    return callbacks.TrainingDiverged(
        f"training diverged in epoch {guard.diverged_epoch} of {epochs}: the loss or weights became non-finite (lower "
        f"--lr, or set --clip-norm); nothing from that epoch was saved, {kept}."
    )


def curves_note(config):
    """Why the training curves sit where they do next to the validation ones."""
    targets = []
    if config.label_smoothing:
        targets.append(f"label smoothing {config.label_smoothing:g}")
    if config.mixup_alpha or config.cutmix_alpha:
        targets.append("MixUp/CutMix")
    soft = f" whose targets include {' and '.join(targets)}" if targets else ""
    return (
        f"Train loss and top-1 are measured on augmented batches{soft}, averaged over each epoch; "
        "validation uses unaugmented images and one-hot labels."
    )


def metrics(rows, classifier, model, info, t_start, record, run_dir):
    """The summary metrics.json holds, from the history and the trained model."""
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
        strategy=record.strategy_used,
        run_dir=run_dir,
        unreadable_files=info["unreadable"].failures,
    )


def done_line(summary, rows):
    """The line that closes a run: its scores, time, speed and size."""
    if summary["val_top1"] is None:  # no validation split: say what best.keras was chosen on
        scores = f"train top-1 {summary['train_top1']:.2%} (no validation)" if rows else "no epochs"
    else:
        top5 = "n/a" if summary["val_top5"] is None else f"{summary['val_top5']:.2%}"
        scores = f"val top-1 {summary['val_top1']:.2%}, top-5 {top5}"
    left_out = len(summary["unreadable_files"])
    unreadable = f", {count(left_out, 'unreadable file')} left out" if left_out else ""
    return (
        f"Done: {count(summary['epochs'], 'epoch')}, {scores}{unreadable}, {summary['wall_time_s']:.0f} s, "
        f"{summary['images_per_sec'] or 0:.0f} img/s, {summary['params']:,} params -> {summary['run_dir']}"
    )


def finish(config, record, run, fitted, info, t_start):
    """Write curves.png and metrics.json, print the closing line and return the metrics. ``fitted`` is
    ``(classifier, model, schedule, total_steps)``."""
    classifier, model, schedule, total_steps = fitted
    rows = run.history()
    title = f"{describe_model(config)}, recipe {config.recipe}, {record.backend} backend"
    curves.plot_curves(
        rows,
        run / rundir.CURVES,
        lr_curve=learning_rate_curve(schedule, total_steps, info["steps_per_epoch"]),
        title=title[0].upper() + title[1:],
        note=curves_note(config),
    )
    summary = metrics(rows, classifier, model, info, t_start, record, run.path)
    atomic.write_json(run / rundir.METRICS, summary)
    print(done_line(summary, rows))
    return summary
