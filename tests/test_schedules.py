import math

import keras
import numpy as np
import pytest

from keras_convmixer.schedules import LearningRateLogger, OneCycle, cosine_with_warmup
from tests.helpers import to_numpy


def reference_one_cycle(step, peak, epochs, steps_per_epoch):
    """REFERENCE.md's formula, written with numpy: t in fractional epochs, knots floored in epochs."""
    t = (step + 1) / steps_per_epoch
    return np.interp(t, [0, math.floor(2 * epochs / 5), math.floor(4 * epochs / 5), epochs], [0, peak, peak / 20, 0])


@pytest.mark.parametrize("epochs, steps_per_epoch, peak", [(25, 97, 0.05), (150, 13, 0.01), (7, 5, 1.0)])
def test_one_cycle_matches_numpy_interp(epochs, steps_per_epoch, peak):
    total = epochs * steps_per_epoch
    schedule = OneCycle(peak, total, steps_per_epoch=steps_per_epoch)
    knot_steps = [k * steps_per_epoch - 1 + d for k in (2 * epochs // 5, 4 * epochs // 5) for d in (-1, 0, 1)]
    steps = np.unique(np.concatenate([np.arange(0, total + 3, max(total // 400, 1)), np.arange(total - 3, total + 2),
                                      knot_steps]))
    got = np.array([float(to_numpy(schedule(keras.ops.convert_to_tensor(s, "int64")))) for s in steps])
    want = reference_one_cycle(steps, peak, epochs, steps_per_epoch)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=peak * 1e-6)
    assert got.max() == pytest.approx(peak, rel=1e-5)  # the peak is reached exactly at floor(2T/5)


def test_one_cycle_serializes_and_saves_with_the_optimizer(tmp_path):
    schedule = OneCycle(0.05, 250, steps_per_epoch=10)
    clone = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    assert isinstance(clone, OneCycle)
    assert clone.get_config() == schedule.get_config()

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.AdamW(learning_rate=schedule), "mse")
    model.fit(np.ones((8, 3)), np.ones((8, 2)), batch_size=4, epochs=1, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer.learning_rate_schedule if hasattr(loaded.optimizer, "learning_rate_schedule")
                      else loaded.optimizer._learning_rate, OneCycle)
    # After 2 steps the optimizer's lr is the schedule's value at step 2.
    assert float(to_numpy(loaded.optimizer.learning_rate)) == pytest.approx(reference_one_cycle(2, 0.05, 25, 10))


def test_cosine_with_warmup_matches_formula():
    peak, total, warmup = 0.1, 100, 10
    schedule = cosine_with_warmup(peak, total, warmup)
    for step in (0, 5, 10, 30, 55, 99, 100):
        got = float(to_numpy(schedule(step)))
        if step < warmup:
            want = peak * step / warmup
        else:
            want = peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert got == pytest.approx(want, rel=1e-4, abs=1e-7), step


def test_lr_logger_puts_lr_into_epoch_logs():
    schedule = OneCycle(0.1, 10, steps_per_epoch=5)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(learning_rate=schedule), "mse")
    history = model.fit(np.ones((10, 2)), np.ones((10, 1)), batch_size=2, epochs=2, verbose=0,
                        callbacks=[LearningRateLogger()])
    # After epoch 1 (5 steps) the next step's lr is at t = 6/5 epochs.
    assert history.history["lr"][0] == pytest.approx(reference_one_cycle(5, 0.1, 2, 5), rel=1e-5)
    assert history.history["lr"][1] == pytest.approx(0.0, abs=1e-9)
