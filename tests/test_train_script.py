"""``scripts/train.py`` end to end, as the README runs it, on a folder of real image files.

A generated folder of 300 JPEG/PNG files (more than one batch, two epochs), the paper's recipes with
only the model and sizes shrunk. Each run must finish, write every artefact, and step the optimizer
exactly ``epochs x steps_per_epoch`` times (so the one-cycle schedule ends where it should).
"""

import json
import re

import keras
import numpy as np
import pytest
from PIL import Image

from keras_convmixer import recipes, training
from tests.helpers import TINY_MODEL, cli_flags, rows, run_script

COLOURS = {"blue": (40, 60, 210), "green": (40, 190, 60), "red": (210, 40, 40)}
PER_CLASS = 100
BATCH = 64
# No --verbose: with stdout a pipe, the command must choose one line per epoch itself.
TINY = cli_flags(model="custom", **TINY_MODEL, image_size=16, batch_size=BATCH, epochs=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 100 images of varied sizes, JPEG and PNG: class colour plus noise and a bar."""
    root = tmp_path_factory.mktemp("images") / "train"
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            h, w = rng.integers(18, 30, size=2)
            image = np.array(colour, "float32") + rng.normal(0, 30, (h, w, 3))
            image[h // 3 : h // 3 + 3] = 255 - image[h // 3 : h // 3 + 3]
            ext = "png" if i % 4 == 0 else "jpg"
            Image.fromarray(np.clip(image, 0, 255).astype("uint8")).save(root / name / f"{i:03d}.{ext}")
    return root


def train_script(args, tmp_path):
    """Run the command as a user would, and check its log reads well in a file: one line per epoch, no
    progress bar, none of TensorFlow's native INFO/WARNING lines (no TF_CPP_MIN_LOG_LEVEL is set here)."""
    run = tmp_path / "run"
    proc = run_script(
        ["scripts/train.py", *args, *TINY, "--output-dir", str(run)],
        env_extra={"TF_CPP_MIN_LOG_LEVEL": None},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert len([line for line in out.splitlines() if re.match(r"^\d+/\d+ - .*loss: ", line)]) == 2, out
    assert not any(mark in out for mark in ("\r", "\x1b", "\x08", "━")), out
    assert not [line for line in proc.stderr.splitlines() if re.match(r"^[IW]\d{4} ", line)], proc.stderr
    return run, out + proc.stderr  # the log of the run, as `> log 2>&1` keeps it


def assert_complete_run(run, steps_per_epoch, with_val=True):
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 2
    assert metrics["steps_per_epoch"] == steps_per_epoch
    assert metrics["optimizer_steps"] == 2 * steps_per_epoch
    assert [int(r["epoch"]) for r in rows(run / "history.csv")] == [0, 1]
    for name in ("config.json", "best.keras", "last.keras", "best.json"):
        assert (run / name).is_file(), name
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = json.loads((run / "best.json").read_text())
    assert best["monitor"] == ("val_top1" if with_val else "top1")
    if with_val:
        assert 0.0 <= metrics["val_top1"] <= 1.0
    else:
        assert metrics["val_top1"] is None and 0.0 <= metrics["train_top1"] <= 1.0
    model = keras.saving.load_model(run / "best.keras")
    logits = keras.ops.convert_to_numpy(model(np.full((2, 16, 16, 3), 128.0, "float32")))
    assert logits.shape == (2, len(COLOURS)) and np.isfinite(logits).all()
    return metrics


# 300 files, 60 held out (20 per class): 240 // 64 = 3 full training batches per epoch.
@pytest.mark.parametrize("recipe", ["cifar10", "imagenet"])
def test_readme_recipe_on_a_folder_runs_two_epochs(folder, tmp_path, recipe):
    args = ["--recipe", recipe, "--data", f"folder:{folder}", "--val-split", "60"]
    run, out = train_script(args, tmp_path)
    metrics = assert_complete_run(run, steps_per_epoch=3)
    assert (
        f"Training a custom ConvMixer-32/1 (dim 32, depth 1, kernel 3, patch 2) on folder:{folder}: "
        "240 train / 60 val images, 3 classes, 2 epochs x 3 steps, batch 64, strategy none (1 replica)"
    ) in out
    saved = json.loads((run / "config.json").read_text())
    assert saved["recipe"] == recipe and saved["class_names"] == sorted(COLOURS)
    assert metrics["images_per_sec"] > 0
    # --print-config shows the settings config.json then records.
    shown = run_script(["scripts/train.py", *args, *TINY, "--output-dir", str(run), "--print-config"], timeout=120)
    shown = json.loads(shown.stdout)
    assert {key: saved[key] for key in shown} == shown


def test_without_validation_picks_best_on_train_metric(folder, tmp_path):
    run, out = train_script(["--recipe", "cifar10", "--data", f"folder:{folder}", "--val-split", "0"], tmp_path)
    assert_complete_run(run, steps_per_epoch=300 // BATCH, with_val=False)
    assert "(no validation)" in out


def test_in_memory_device_path_with_steps_per_epoch(folder, tmp_path):
    flags = cli_flags(
        recipe="cifar10", data=f"folder:{folder}", val_split=60, in_memory=True, augment_on="device", steps_per_epoch=2
    )
    run, log = train_script(flags, tmp_path)
    assert_complete_run(run, steps_per_epoch=2)
    # The data module's progress reaches the log: where the decoded arrays are cached.
    assert re.search(r"^INFO (cached|read) \d+ decoded images (in|from cache) ", log, re.MULTILINE), log[-3000:]


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains_with_float32_logits(folder, tmp_path, precision):
    config = recipes.resolve_config(
        "cifar10",
        dict(
            model="custom",
            **TINY_MODEL,
            image_size=16,
            batch_size=BATCH,
            epochs=2,
            steps_per_epoch=2,
            data=f"folder:{folder}",
            val_split=60,
            precision=precision,
            output_dir=str(tmp_path / "run"),
            verbose=0,
        ),
    )
    metrics = training.train(config)
    assert metrics["optimizer_steps"] == 4 and np.isfinite(metrics["val_top1"])
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after the run
    model = keras.saving.load_model(tmp_path / "run" / "last.keras")
    assert model.get_layer("head").dtype_policy.compute_dtype == "float32"


@pytest.fixture(scope="module")
def damaged_folder(folder, tmp_path_factory):
    """The same folder plus 4 JPEGs cut after a valid header: the scan passes them, decoding fails."""
    import shutil

    root = tmp_path_factory.mktemp("damaged") / "train"
    shutil.copytree(folder, root)
    damaged = []
    for i, name in enumerate(("blue", "green", "red", "red")):
        good = (root / name / "001.jpg").read_bytes()
        path = root / name / f"cut{i}.jpg"
        path.write_bytes(good[: len(good) // 2])
        damaged.append(str(path))
    return root, sorted(damaged)


@pytest.mark.parametrize("path", ["tf.data", "in-memory"])
def test_every_damaged_file_is_named_in_the_log_and_metrics(damaged_folder, tmp_path, path):
    root, damaged = damaged_folder
    extra = ["--in-memory", "--augment-on", "device"] if path == "in-memory" else []
    if path == "tf.data":
        pytest.importorskip("tensorflow")
    run, out = train_script(["--recipe", "cifar10", "--data", f"folder:{root}", "--val-split", "60", *extra], tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    assert sorted(metrics["unreadable_files"]) == damaged
    assert all(reason for reason in metrics["unreadable_files"].values())
    logged = "\n".join(line for line in out.splitlines() if "unreadable image file" in line)
    assert all(p in logged for p in damaged), out[-3000:]
