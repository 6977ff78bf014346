import math

import keras
import numpy as np
import pytest

from keras_convmixer.schedules import OneCycle, cosine_with_warmup, learning_rate_curve
from tests.helpers import to_numpy


def reference_one_cycle(step, peak, epochs, steps_per_epoch):
    """The paper's one-cycle formula, written with numpy: t in fractional epochs, knots floored in epochs."""
    t = (step + 1) / steps_per_epoch
    return np.interp(t, [0, math.floor(2 * epochs / 5), math.floor(4 * epochs / 5), epochs], [0, peak, peak / 20, 0])


@pytest.mark.parametrize("epochs, steps_per_epoch, peak", [(25, 97, 0.05), (150, 13, 0.01), (7, 5, 1.0)])
def test_one_cycle_matches_numpy_interp(epochs, steps_per_epoch, peak):
    total = epochs * steps_per_epoch
    schedule = OneCycle(peak, total, steps_per_epoch=steps_per_epoch)
    knot_steps = [k * steps_per_epoch - 1 + d for k in (2 * epochs // 5, 4 * epochs // 5) for d in (-1, 0, 1)]
    steps = np.unique(
        np.concatenate([np.arange(0, total + 3, max(total // 400, 1)), np.arange(total - 3, total + 2), knot_steps])
    )
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
    assert isinstance(
        loaded.optimizer.learning_rate_schedule
        if hasattr(loaded.optimizer, "learning_rate_schedule")
        else loaded.optimizer._learning_rate,
        OneCycle,
    )
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


def cosine_reference(step, peak, total, warmup):
    step = np.minimum(step, total)
    decay = peak * 0.5 * (1 + np.cos(np.pi * (step - warmup) / (total - warmup)))
    return np.where(step < warmup, peak * step / max(warmup, 1), decay)


def test_learning_rate_curve_samples_every_epoch_end_and_reaches_the_peak():
    epochs, steps_per_epoch, peak = 25, 97, 0.05
    total = epochs * steps_per_epoch
    t, lr = learning_rate_curve(OneCycle(peak, total, steps_per_epoch), total, steps_per_epoch, max_points=300)
    steps = np.round(t * steps_per_epoch).astype(int) - 1
    assert set(np.arange(1, epochs + 1) * steps_per_epoch - 1) <= set(steps)  # every epoch's last step
    assert steps.min() == 0 and steps.max() == total - 1 and np.all(np.diff(steps) > 0)
    np.testing.assert_allclose(
        lr, reference_one_cycle(steps, peak, epochs, steps_per_epoch), rtol=1e-5, atol=peak * 1e-6
    )
    assert lr.max() == pytest.approx(peak, rel=1e-6)  # the peak itself, not a neighbouring sample


def test_learning_rate_curve_of_a_schedule_that_branches():
    # Keras's CosineDecay with warm-up branches with ops.cond, which takes no vector of steps.
    total, warmup, steps_per_epoch = 200, 40, 20
    t, lr = learning_rate_curve(cosine_with_warmup(0.1, total, warmup), total, steps_per_epoch)
    steps = np.round(t * steps_per_epoch).astype(int) - 1
    np.testing.assert_array_equal(steps, np.arange(total))
    np.testing.assert_allclose(lr, cosine_reference(steps, 0.1, total, warmup), rtol=1e-4, atol=1e-7)
