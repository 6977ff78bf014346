"""``train()`` end to end on the digits demo with a tiny model: every artefact, both augmentation paths,
the TensorFlow-free path, and resuming after a real SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import keras
import numpy as np
import pytest

from keras_convmixer import recipes, training
from tests.helpers import HIDE_TENSORFLOW, ROOT, TINY_DEMO, TINY_FLAGS, cli_flags, rows, run_script, to_numpy

BACKEND = keras.backend.backend()
TINY = dict(TINY_DEMO, epochs=2, verbose=0)


def test_demo_run_writes_every_artefact(tmp_path):
    run = tmp_path / "run"
    config = recipes.resolve_config("demo", dict(TINY, output_dir=str(run)))
    resolved = json.loads(json.dumps(config))
    metrics = training.train(config)
    assert config == resolved  # training writes what it found into the run record, not into the config

    saved = json.loads((run / "config.json").read_text())
    # config.json: the settings as resolved, then what the run used beside them.
    assert {k: saved[k] for k in resolved} == resolved
    assert set(saved) - set(resolved) == {"backend", "strategy_used", "precision_used", "num_classes", "class_names"}
    assert (saved["backend"], saved["strategy_used"], saved["precision_used"]) == (BACKEND, "none", "float32")
    assert saved["class_names"] == [str(d) for d in range(10)]
    for key in (
        "model",
        "model_kwargs",
        "image_size",
        "num_classes",
        "class_names",
        "crop_pct",
        "interpolation",
        "data",
        "val_split",
        "seed",
    ):
        assert key in saved, key
    assert saved["model"] == "custom" and saved["num_classes"] == 10 and saved["data"] == "digits"
    # best.keras copied away from its run dir still carries the run's eval transform and class names.
    from keras_convmixer.artifacts import open_model

    alone = tmp_path / "alone.keras"
    shutil.copy(run / "best.keras", alone)
    carried = open_model(alone).config
    for key in ("image_size", "crop_pct", "interpolation", "class_names", "num_classes"):
        assert carried[key] == saved[key], key

    history = rows(run / "history.csv")
    assert [int(r["epoch"]) for r in history] == [0, 1]
    for key in ("loss", "top1", "top5", "val_top1", "val_top5", "lr", "images_per_sec"):
        assert history[-1][key] != "", key
    assert float(history[0]["images_per_sec"]) > 0

    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if BACKEND == "tensorflow" or _importable("tensorboard"):
        assert any(files for _, _, files in os.walk(run / "tensorboard"))
    assert any((run / "backup").iterdir())

    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk == metrics
    for key in ("val_top1", "val_top5", "wall_time_s", "images_per_sec", "params"):
        assert on_disk[key] is not None, key
    assert metrics["val_top1"] > 0.3  # chance is 0.1
    assert metrics["val_top1"] == pytest.approx(float(history[-1]["val_top1"]))

    # best/last.keras: the bare classifier, raw pixels in, logits out.
    model = keras.saving.load_model(run / "last.keras")
    assert model.count_params() == metrics["params"]
    x = np.random.default_rng(0).uniform(0, 255, (4, 8, 8, 3)).astype("float32")
    logits = to_numpy(model(x))
    assert logits.shape == (4, 10) and not np.allclose(logits.sum(axis=1), 1.0)
    assert keras.saving.load_model(run / "best.keras").output_shape == (None, 10)


def _importable(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def device_mix_run(tmp_path, **settings):
    """Train TINY with MixUp/CutMix in the train step (augment_on="device"); returns ``(metrics, run dir)``."""
    run = tmp_path / "run"
    settings = dict(TINY, output_dir=str(run), augment_on="device", mixup_alpha=0.5, cutmix_alpha=0.5, **settings)
    return training.train(recipes.resolve_config("demo", settings)), run


def test_device_augmentation_trains_from_arrays(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics, run = device_mix_run(
            tmp_path, in_memory=True, hflip=0.5, reprob=0.25, label_smoothing=0.1, crop_scale=(0.35, 1.0)
        )
    # The wrapper builds itself: Keras has nothing to warn about ("`build()` was called on layer ...").
    assert not [w for w in caught if "build()" in str(w.message)], [str(w.message) for w in caught]
    assert metrics["epochs"] == 2 and np.isfinite(float(rows(run / "history.csv")[-1]["loss"]))
    assert metrics["val_top1"] > 0.2
    # The saved model is the classifier alone (the augmentation wrapper is not saved).
    model = keras.saving.load_model(run / "best.keras")
    assert model.input_shape == (None, 8, 8, 3) and model.output_shape == (None, 10)


def test_device_augmentation_trains_from_tf_data(tmp_path):
    pytest.importorskip("tensorflow")
    metrics, _ = device_mix_run(tmp_path, epochs=1, steps_per_epoch=4, val_steps=2)
    assert metrics["epochs"] == 1 and metrics["val_top1"] is not None


# Run scripts/train.py with TensorFlow made unimportable (see HIDE_TENSORFLOW).
NO_TF = (
    HIDE_TENSORFLOW
    + """
import runpy
sys.argv = ["train.py"] + sys.argv[1:]
try:
    runpy.run_path("scripts/train.py", run_name="__main__")
finally:
    print("TF_LOADED", any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules))
"""
)


@pytest.mark.skipif(BACKEND == "tensorflow", reason="the TF-free path is for the JAX and PyTorch backends")
def test_in_memory_device_path_trains_without_tensorflow(tmp_path):
    run = tmp_path / "run"
    flags = cli_flags(output_dir=run, in_memory=True, augment_on="device", epochs=1, mixup=0.5, cutmix=0.5)
    proc = run_script(["-c", NO_TF, *flags, *TINY_FLAGS])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TF_LOADED False" in proc.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["val_top1"] > 0.15
    assert (run / "best.keras").exists() and (run / "curves.png").exists()


def test_resume_after_sigkill(tmp_path):
    run = tmp_path / "run"
    args = ["scripts/train.py", "--output-dir", str(run), "--epochs", "3", *TINY_FLAGS]
    env = {**os.environ, "KERAS_BACKEND": BACKEND, "PYTHONPATH": ROOT}
    # The python process itself (no wrapper), so SIGKILL hits the trainer.
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    history = run / "history.csv"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if history.exists() and len(rows(history)) >= 1:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(rows(history)) == 1, "the run was not killed between epochs 1 and 2"

    second = run_script(args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Epoch 2/3" in second.stdout and "Epoch 1/3" not in second.stdout
    assert [int(r["epoch"]) for r in rows(history)] == [0, 1, 2]
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 3
