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
    schedule = OneCycle(peak, total, steps_per_epoch=steps_per_epoch, breakpoints="official")
    knot_steps = [k * steps_per_epoch - 1 + d for k in (2 * epochs // 5, 4 * epochs // 5) for d in (-1, 0, 1)]
    steps = np.unique(
        np.concatenate([np.arange(0, total + 3, max(total // 400, 1)), np.arange(total - 3, total + 2), knot_steps])
    )
    got = np.array([float(to_numpy(schedule(keras.ops.convert_to_tensor(s, "int64")))) for s in steps])
    want = reference_one_cycle(steps, peak, epochs, steps_per_epoch)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=peak * 1e-6)
    assert got.max() == pytest.approx(peak, rel=1e-5)  # the peak is reached exactly at floor(2T/5)


def _lrs(schedule, total):
    return np.array([float(to_numpy(schedule(keras.ops.convert_to_tensor(s, "int64")))) for s in range(total)])


@pytest.mark.parametrize("epochs, steps_per_epoch", [(1, 10), (2, 5), (3, 5), (7, 5), (1, 7), (2, 3), (3, 7), (7, 9)])
def test_the_default_one_cycle_reaches_the_peak_lr_however_short_the_run(epochs, steps_per_epoch):
    peak, total = 0.05, epochs * steps_per_epoch
    got = _lrs(OneCycle(peak, total, steps_per_epoch=steps_per_epoch), total)
    assert got.max() == pytest.approx(peak, rel=1e-5)
    # The shape of the fractional formula np.interp(t, [0, 2T/5, 4T/5, T], [0, lr, lr/20, 0]): the breakpoints
    # move to the nearest step (exactly on it where the run's steps divide by 5), so within half a step's slope.
    t = (np.arange(total) + 1) / steps_per_epoch
    want = np.interp(t, [0, 2 * epochs / 5, 4 * epochs / 5, epochs], [0, peak, peak / 20, 0])
    atol = 1e-7 if total % 5 == 0 else 0.5 * peak / (2 * total / 5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)
    assert got[0] < peak and got[-1] == 0  # a warm-up, and the end at 0
    # The official integer-epoch breakpoints: one epoch stays under lr/20, two start at their top (no warm-up).
    official = _lrs(OneCycle(peak, total, steps_per_epoch=steps_per_epoch, breakpoints="official"), total)
    np.testing.assert_allclose(
        official, reference_one_cycle(np.arange(total), peak, epochs, steps_per_epoch), rtol=1e-5, atol=1e-9
    )
    if epochs == 1:
        assert official.max() < peak / 20
    if epochs == 2:
        assert official.max() == official[0] < peak


@pytest.mark.parametrize("epochs, steps_per_epoch", [(25, 88), (25, 98), (25, 13), (150, 7)])
def test_both_breakpoints_give_the_official_schedule_when_epochs_divide_by_5(epochs, steps_per_epoch):
    # 25 epochs is the paper's CIFAR recipe (the cifar10 recipe): it reproduces the official script either way.
    total = epochs * steps_per_epoch
    want = reference_one_cycle(np.arange(total), 0.05, epochs, steps_per_epoch)
    for breakpoints in ("steps", "official"):
        got = _lrs(OneCycle(0.05, total, steps_per_epoch=steps_per_epoch, breakpoints=breakpoints), total)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9, err_msg=breakpoints)


def test_the_settings_pick_the_breakpoints():
    from keras_convmixer import recipes

    assert recipes.resolve_config("cifar10", {"output_dir": "x"})["lr_breakpoints"] == "steps"
    with pytest.raises(ValueError, match="^--lr-breakpoints must be one of steps, official, got 'floor'"):
        recipes.resolve_config("cifar10", {"output_dir": "x", "lr_breakpoints": "floor"})
    with pytest.raises(ValueError, match="breakpoints must be one of steps, official"):
        OneCycle(0.1, 10, breakpoints="floor")


def test_one_cycle_serializes_and_saves_with_the_optimizer(tmp_path):
    schedule = OneCycle(0.05, 250, steps_per_epoch=10)
    clone = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    assert isinstance(clone, OneCycle)
    assert clone.get_config() == schedule.get_config()
    # A schedule saved before the breakpoints were a setting is the official one it was.
    old = {k: v for k, v in schedule.get_config().items() if k != "breakpoints"}
    assert OneCycle.from_config(old).breakpoints == "official"

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
    steps = np.round(t * steps_per_epoch).astype(int)  # t: the 0-based epoch index, plus the fraction done
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
    steps = np.round(t * steps_per_epoch).astype(int)
    np.testing.assert_array_equal(steps, np.arange(total))
    np.testing.assert_allclose(lr, cosine_reference(steps, 0.1, total, warmup), rtol=1e-4, atol=1e-7)


def test_a_run_steps_its_lr_on_the_breakpoints_its_settings_name():
    from keras_convmixer import recipes, training
    from keras_convmixer.config import Config

    epochs, steps_per_epoch, peak = 2, 6, 0.05
    config = Config(
        recipes.resolve_config("cifar10", {"output_dir": "x", "epochs": epochs, "lr_breakpoints": "official"})
    )
    _, schedule = training._optimizer(config, epochs * steps_per_epoch, steps_per_epoch)
    want = reference_one_cycle(np.arange(epochs * steps_per_epoch), peak, epochs, steps_per_epoch)
    np.testing.assert_allclose(_lrs(schedule, epochs * steps_per_epoch), want, rtol=1e-5, atol=1e-9)
