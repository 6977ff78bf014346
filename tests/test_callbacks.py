"""The training callbacks on small real ``fit`` runs (RunCheckpoint runs end to end in test_training/test_rundir)."""

import csv
import json
import math

import keras
import numpy as np
import pytest

from keras_convmixer import curves, rundir
from keras_convmixer.callbacks import (
    FiniteGuard,
    LearningRateLogger,
    RunCheckpoint,
    ThroughputLogger,
    UnreadableFilesLogger,
)
from keras_convmixer.data import DecodeAudit
from keras_convmixer.schedules import OneCycle
from tests.test_schedules import reference_one_cycle


def _dense(optimizer="sgd"):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer, "mse")
    return model


def test_lr_logger_puts_lr_into_epoch_logs():
    schedule = OneCycle(0.1, 10, steps_per_epoch=5, breakpoints="official")
    model = _dense(keras.optimizers.SGD(learning_rate=schedule))
    history = model.fit(
        np.ones((10, 2)), np.ones((10, 1)), batch_size=2, epochs=2, verbose=0, callbacks=[LearningRateLogger()]
    )
    # After epoch 1 (5 steps) the next step's lr is at t = 6/5 epochs.
    assert history.history["lr"][0] == pytest.approx(reference_one_cycle(5, 0.1, 2, 5), rel=1e-5)
    assert history.history["lr"][1] == pytest.approx(0.0, abs=1e-9)


def test_throughput_counts_the_training_images_of_each_epoch():
    model = _dense()
    history = model.fit(
        np.ones((20, 2)),
        np.ones((20, 1)),
        batch_size=4,
        epochs=2,
        verbose=0,
        validation_data=(np.ones((40, 2)), np.ones((40, 1))),
        callbacks=[ThroughputLogger(4)],
    )
    for ips, seconds in zip(history.history["images_per_sec"], history.history["epoch_time_s"], strict=True):
        assert ips > 0 and seconds > 0
        # 20 training images in less time than the whole epoch (validation included) took.
        assert ips * seconds >= 20 * (1 - 1e-9)


def test_finite_guard_stops_at_the_first_non_finite_epoch():
    model = _dense()
    guard = FiniteGuard()

    class Poison(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):  # runs before the guard: epoch 2 ends with NaN weights
            if epoch == 1:
                kernel = self.model.layers[0].kernel
                kernel.assign(np.full(kernel.shape, np.nan, "float32"))

    history = model.fit(np.ones((8, 2)), np.ones((8, 1)), epochs=5, verbose=0, callbacks=[Poison(), guard])
    assert guard.diverged_epoch == 2 and not guard.ok
    assert len(history.history["loss"]) == 2 and all(math.isfinite(v) for v in history.history["loss"])


def test_unreadable_files_are_named_once_each():
    audit, lines = DecodeAudit(), []
    logger = UnreadableFilesLogger(audit, log=lines.append)
    logger.on_epoch_end(0)
    assert lines == []
    audit.add("/d/a.jpg", "truncated")
    logger.on_epoch_end(0)
    logger.on_epoch_end(1)  # nothing new
    for i in range(7):
        audit.add(f"/d/b{i}.jpg", "not an image")
    logger.on_epoch_end(2)
    assert lines[0] == "Left out 1 unreadable image file: /d/a.jpg: truncated"
    assert len(lines) == 2 and lines[1].startswith("Left out 7 unreadable image files: /d/b0.jpg: not an image; ")
    assert lines[1].endswith("and 2 more (all in metrics.json)") and "/d/a.jpg" not in lines[1]


def _checkpointed_fit(run_dir, epochs=5):
    """A small classifier fitted with RunCheckpoint into ``run_dir``; returns Keras's History."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)).astype("float32"), rng.integers(0, 3, 64)
    classifier = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    top1 = keras.metrics.SparseCategoricalAccuracy(name="top1")
    classifier.compile(
        keras.optimizers.SGD(0.5), keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=[top1]
    )
    run = rundir.RunDir(run_dir).create()
    check = RunCheckpoint(classifier, run, "val_top1")
    return classifier.fit(
        x[:48], y[:48], validation_data=(x[48:], y[48:]), epochs=epochs, batch_size=16, verbose=0, callbacks=[check]
    )


def _history_csv(run_dir):
    with open(run_dir / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_history_csv_and_the_curves_number_epochs_as_keras_does(tmp_path):
    history = _checkpointed_fit(tmp_path / "run")
    table = _history_csv(tmp_path / "run")
    assert [int(r["epoch"]) for r in table] == history.epoch == [0, 1, 2, 3, 4]
    figure = curves.curves_figure(table)
    (loss, _) = next(ax for ax in figure.axes if ax.get_title() == "loss").lines
    assert list(loss.get_xdata()) == history.epoch


def test_best_json_names_the_history_row_of_the_best_score(tmp_path):
    _checkpointed_fit(tmp_path / "run")
    scores = [float(r["val_top1"]) for r in _history_csv(tmp_path / "run")]
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert best["monitor"] == "val_top1" and best["value"] == pytest.approx(max(scores))
    assert best["epoch"] == scores.index(max(scores))  # the first epoch with the best score, 0-based
