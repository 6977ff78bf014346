"""Learning-rate schedules evaluated per optimizer step, and the lr curve of a whole run.

``OneCycle`` is the paper's triangular schedule. It is a ``LearningRateSchedule`` written
with ``keras.ops`` so it runs inside the compiled train step on every backend and is saved
with the optimizer (a callback could only change the lr once per epoch).
"""

import keras
import numpy as np
from keras import ops

from keras_convmixer.settings import LR_BREAKPOINTS as BREAKPOINTS


@keras.saving.register_keras_serializable(package="keras_convmixer")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """``lr(t) = interp(t, [0, t1, t2, T], [0, peak, peak/20, 0])``: a linear warm-up to ``peak`` at 2/5 of
    the run, down to ``peak/20`` at 4/5 and to 0 at its end.

    ``t`` is in fractional epochs, ``(step + 1) / steps_per_epoch`` (the official CIFAR script's
    ``epoch + (i + 1) / len(loader)``), and ``T`` is ``total_steps / steps_per_epoch`` epochs.
    ``breakpoints="steps"`` puts ``t1, t2`` on the optimizer steps nearest ``2T/5`` and ``4T/5``, so every run
    of two steps or more reaches ``peak``. ``"official"`` floors them to whole epochs, ``floor(2T/5)`` and
    ``floor(4T/5)``, as the official script does: the same schedule where ``T`` is a multiple of 5 (its
    25 epochs), but one epoch then stays under ``peak/20`` and two start at ``peak`` with no warm-up.
    With the default ``steps_per_epoch=1`` everything is in steps.
    """

    def __init__(self, peak_lr, total_steps, steps_per_epoch=1, breakpoints="steps", name="one_cycle"):
        if total_steps <= 0 or steps_per_epoch <= 0:
            raise ValueError(
                f"OneCycle needs total_steps > 0 and steps_per_epoch > 0, got {total_steps}, {steps_per_epoch}."
            )
        if breakpoints not in BREAKPOINTS:
            raise ValueError(f"OneCycle breakpoints must be one of {', '.join(BREAKPOINTS)}, got {breakpoints!r}.")
        self.peak_lr = float(peak_lr)
        self.total_steps = int(total_steps)
        self.steps_per_epoch = int(steps_per_epoch)
        self.breakpoints = breakpoints
        self.name = name
        epochs = self.total_steps / self.steps_per_epoch
        if breakpoints == "official":
            inner = (float(int(2 * epochs / 5)), float(int(4 * epochs / 5)))
        else:  # whole steps, so that a step lands on the peak itself
            inner = tuple(round(f * self.total_steps / 5) / self.steps_per_epoch for f in (2, 4))
        self.knots = (0.0, *inner, epochs)

    def __call__(self, step):
        t = (ops.cast(step, "float32") + 1.0) / self.steps_per_epoch
        x0, x1, x2, x3 = self.knots
        y1, y2 = self.peak_lr, self.peak_lr / 20.0

        def ramp(t0, t1, v0, v1):
            # Repeated knots (very short runs) make a segment empty; where() below never selects it.
            return v0 + (v1 - v0) * (t - t0) / max(t1 - t0, 1e-12)

        lr = ops.where(t < x1, ramp(x0, x1, 0.0, y1), ramp(x1, x2, y1, y2))
        lr = ops.where(t < x2, lr, ramp(x2, x3, y2, 0.0))
        return ops.where(t < x3, lr, ops.zeros_like(lr))

    def get_config(self):
        return dict(
            peak_lr=self.peak_lr,
            total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch,
            breakpoints=self.breakpoints,
            name=self.name,
        )

    @classmethod
    def from_config(cls, config):
        # Saved before the breakpoints were a choice: that schedule floored them to whole epochs.
        return cls(**{"breakpoints": "official", **config})


def cosine_with_warmup(peak_lr, total_steps, warmup_steps=0, final_fraction=0.0):
    """Linear warmup from 0 to ``peak_lr`` over ``warmup_steps``, then cosine decay to
    ``final_fraction * peak_lr`` at ``total_steps``. Keras core's ``CosineDecay`` does it."""
    warmup_steps = int(min(max(warmup_steps, 0), total_steps - 1))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else peak_lr,
        decay_steps=max(int(total_steps) - warmup_steps, 1),
        alpha=final_fraction,
        warmup_target=peak_lr if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


def learning_rate_curve(schedule, total_steps, steps_per_epoch, max_points=2048):
    """``(t, lr)``: the lr of optimizer steps across a run, ``t`` on the axis of Keras's 0-based epoch index
    (``history.csv``'s ``epoch``): step ``j`` of epoch ``i`` at ``i + j / steps_per_epoch``.

    Up to ``max_points`` evenly spread steps plus the last step of every epoch, where the one-cycle
    knots lie, so its peak is drawn at its true height.
    """
    total_steps, steps_per_epoch = int(total_steps), int(steps_per_epoch)
    spread = np.linspace(0, total_steps - 1, min(total_steps, max_points)).round()
    ends = np.arange(steps_per_epoch - 1, total_steps, steps_per_epoch)
    steps = np.unique(np.concatenate([spread, ends])).astype("int64")
    # A schedule that branches with ops.cond (Keras's warm-up CosineDecay) cannot take a vector of
    # steps; vectorized_map turns the branch into a select where the backend can (JAX, TensorFlow).
    for evaluate in (lambda s: schedule(s), lambda s: ops.vectorized_map(schedule, s)):
        try:
            lr = np.asarray(ops.convert_to_numpy(evaluate(ops.convert_to_tensor(steps))), dtype="float64")
            if lr.shape == steps.shape:
                break
        except Exception:  # each backend fails its own way on a branch over a vector
            pass
    else:
        lr = np.array([float(ops.convert_to_numpy(schedule(int(s)))) for s in steps])
    return steps / steps_per_epoch, lr
