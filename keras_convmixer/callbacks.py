"""The callbacks a training run uses: figures for the logs, a guard against divergence, and the checkpointing
that makes a run directory resumable after a kill."""

import math
import os
import time

import keras
from keras import ops

from keras_convmixer import atomic, rundir
from keras_convmixer.data.stream import StreamState


class LearningRateLogger(keras.callbacks.Callback):
    """Puts ``lr`` into the epoch logs, so the progress bar, history.csv and TensorBoard show it.
    Put it before those callbacks: they read the same logs dict. Epoch-level only: a per-batch
    read would evaluate the schedule and sync with the device after every step."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            # Evaluates a schedule at optimizer.iterations: the lr of the next step.
            logs["lr"] = float(ops.convert_to_numpy(self.model.optimizer.learning_rate))


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
    so non-finite weights are never written (a resume then starts from the last finite epoch).
    ``diverged_epoch`` is a count for messages (1: the first epoch), not Keras's 0-based index."""

    def __init__(self):
        super().__init__()
        self.diverged_epoch = None

    @property
    def ok(self):
        return self.diverged_epoch is None

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        finite = (
            loss is not None
            and math.isfinite(float(loss))
            and all(
                bool(ops.convert_to_numpy(ops.all(ops.isfinite(w))))
                for w in self.model.weights
                if "float" in str(w.dtype)
            )
        )
        if not finite:
            self.diverged_epoch = epoch + 1
            self.model.stop_training = True


class RunCheckpoint(keras.callbacks.Callback):
    """Saves each finished epoch into the run directory, in an order that survives a kill anywhere:
    ``last.keras``, ``best.keras`` when ``monitor`` improves, the backup checkpoint, and last the
    history row that commits the epoch. On ``train_begin`` it resumes from the last committed epoch.
    The classifier is saved bare (not a training wrapper), with ``entries`` (``{name: text}``, the eval
    preset) inside each ``.keras``. With a ``guard``, an epoch whose weights are not finite is not saved."""

    def __init__(self, classifier, run, monitor="val_top1", guard=None, entries=None, stream=None):
        super().__init__()
        self.classifier, self.run, self.monitor, self.guard = classifier, run, monitor, guard
        self.entries = entries
        self.stream = stream  # a ShardedStream read through its restartable_dataset
        self.rows = []

    def on_train_begin(self, logs=None):
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:  # its variables must exist to be loaded
            optimizer.build(self.model.trainable_variables)
        done = self.run.restore(self.model)
        self.rows = self.run.history()
        self.model._initial_epoch = done or None  # as keras.callbacks.BackupAndRestore does
        if self.stream is not None:
            # fit makes its data iterator after this hook: the resumed run reads on where the backup was made.
            saved = self.run.stream_state(done) if done else None
            self.stream.start_at(
                StreamState.from_dict(saved) if saved is not None else self.stream.state_at(self._steps_done())
            )

    def _steps_done(self):
        return int(ops.convert_to_numpy(self.model.optimizer.iterations))

    def on_epoch_end(self, epoch, logs=None):
        if self.guard is not None and not self.guard.ok:
            return
        row = {"epoch": epoch, **{k: float(v) for k, v in (logs or {}).items()}}
        monitor = self.monitor if self.monitor in row else "top1"
        best = rundir.best_of(self.rows, monitor)
        atomic.save_model(self.classifier, self.run / rundir.LAST_MODEL, self.entries)
        value = row.get(monitor)
        if value is not None and math.isfinite(value) and (best is None or value > best["value"]):
            atomic.save_model(self.classifier, self.run / rundir.BEST_MODEL, self.entries)
        self.rows = [*self.rows, row]
        state = None if self.stream is None else self.stream.state_at(self._steps_done()).to_dict()
        self.run.commit_epoch(self.model, self.rows, monitor, stream_state=state)


def tensorboard_logs(run_dir, log=print):
    """A TensorBoard callback writing into ``<run_dir>/tensorboard``, as a list: empty (and said once)
    where it cannot write, since it writes with tf.summary, which needs TensorFlow and tensorboard."""
    try:
        import tensorboard  # noqa: F401
        import tensorflow  # noqa: F401
    except ImportError:
        log("TensorBoard logs skipped: TensorFlow/tensorboard is not installed.")
        return []
    return [keras.callbacks.TensorBoard(log_dir=os.path.join(run_dir, "tensorboard"))]


def for_run(classifier, run, *, batch_size, unreadable, validated, guard, entries=None, stream=None):
    """The callbacks of a training run, in the order they must run: the loggers put their figures into the
    logs before ``guard`` checks the epoch, and the checkpoint (which records the logs in history.csv and
    saves nothing once ``guard`` has tripped) comes after both. ``guard`` checks the loss and the weights once
    per epoch, so keras.callbacks.TerminateOnNaN is not added: its per-batch hook would turn every step's logs
    into Python numbers (a host sync per step) to find what the guard finds at the epoch's end."""
    return [
        LearningRateLogger(),
        ThroughputLogger(int(batch_size)),
        guard,
        UnreadableFilesLogger(unreadable),
        RunCheckpoint(classifier, run, "val_top1" if validated else "top1", guard, entries, stream),
        *tensorboard_logs(run.path),
    ]
