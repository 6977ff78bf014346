"""keras_convmixer.artifacts: opening run dirs, .keras files and SavedModels, and their logits."""

import json
import logging
import shutil
import zipfile

import keras
import numpy as np
import pytest

import keras_convmixer as kc
from keras_convmixer import atomic
from keras_convmixer.artifacts import (
    PRESET_ENTRY,
    KerasFileError,
    ModelPathError,
    UntrustedSavedModelError,
    logits_model,
    open_model,
    preset_entries,
    read_preset,
)
from tests.helpers import randomize_batchnorm
from tests.shipping import make_run_dir

SIZE = 16
BROKEN_KERAS_FILES = {
    "empty": lambda good: b"",
    "truncated": lambda good: good[: len(good) // 2],  # a kill halfway through the write
    "garbage": lambda good: b"definitely not a zip archive" * 4,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    keras.utils.set_random_seed(0)
    return make_run_dir(tmp_path_factory.mktemp("artifacts") / "run", image_size=SIZE)


def _images(n=3, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")


def _run_dir_with(source_run, tmp_path, files):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_bytes((source_run / "config.json").read_bytes())
    good = (source_run / "best.keras").read_bytes()
    for name, kind in files.items():
        (run / name).write_bytes(good if kind == "good" else BROKEN_KERAS_FILES[kind](good))
    return run


def test_a_run_dir_gives_its_config_and_logits(run):
    path, model = run
    bundle = open_model(path)
    assert bundle.kind == "run" and bundle.model_file == str(path / "best.keras")
    assert bundle.class_names == ["a", "b", "c", "d", "e", "f"] and bundle.num_classes == 6
    assert (bundle.image_size, bundle.crop_pct, bundle.interpolation) == (SIZE, 0.875, "bilinear")
    x = _images()
    np.testing.assert_allclose(bundle.logits(x, batch_size=2), model.predict(x, verbose=0), atol=1e-4)


def test_a_bare_keras_file_gets_its_shapes_and_the_unnamed_shape_eval_transform(tmp_path):
    model = kc.ConvMixer(8, 1, 3, 4, classes=3, input_shape=(20, 20, 3))  # softmax head: the builders' default
    randomize_batchnorm(model)
    model.save(tmp_path / "model.keras")
    bundle = open_model(tmp_path / "model.keras")
    assert bundle.kind == "keras"
    assert bundle.config["image_size"] == 20 and bundle.class_names == ["class_0", "class_1", "class_2"]
    # A shape that is no variant is evaluated as timm evaluates every ConvMixer it registers (crop 0.96, bicubic).
    assert (bundle.crop_pct, bundle.interpolation) == (0.96, "bicubic")
    # Logits from a softmax head: the pooled features times the head's weights, as NumPy computes them.
    x = np.random.default_rng(1).uniform(0, 255, (2, 20, 20, 3)).astype("float32")
    features = keras.Model(model.inputs, model.get_layer("pool").output).predict(x, verbose=0)
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in model.get_layer("head").weights)
    np.testing.assert_allclose(bundle.logits(x), features @ kernel + bias, atol=1e-4)


def test_a_bare_keras_file_of_a_named_variant_gets_timms_eval_transform(tmp_path):
    from tests.vision_reference import vision_or_skip

    _, _, timm = vision_or_skip()
    kc.ConvMixer768_32(input_shape=(28, 28, 3), classes=5).save(tmp_path / "named.keras")
    bundle = open_model(tmp_path / "named.keras")
    cfg = timm.models.get_pretrained_cfg("convmixer_768_32")
    assert (bundle.crop_pct, bundle.interpolation) == (cfg.crop_pct, cfg.interpolation)
    assert bundle.config["model"] == "convmixer_768_32"


def test_a_bare_keras_file_of_a_released_variant_with_1000_outputs_names_imagenet_classes(tmp_path):
    from tests.vision_reference import vision_or_skip

    vision_or_skip()
    from torchvision.models._meta import _IMAGENET_CATEGORIES  # the reference list: torchvision's, not ours

    # The released variant's name on a small network: only the name and the 1000 outputs matter here.
    kc.ConvMixer(8, 1, 3, 7, classes=1000, input_shape=(28, 28, 3), name="convmixer_768_32").save(tmp_path / "a.keras")
    assert open_model(tmp_path / "a.keras").class_names == list(_IMAGENET_CATEGORIES)
    kc.ConvMixer(8, 1, 3, 7, classes=1000, input_shape=(28, 28, 3), name="mine").save(tmp_path / "b.keras")
    assert open_model(tmp_path / "b.keras").class_names[:2] == ["class_0", "class_1"]


def test_class_names_that_do_not_fit_the_model_are_refused(run, tmp_path):
    path = _run_dir_with(run[0], tmp_path, {"best.keras": "good"})
    config = json.loads((path / "config.json").read_text())
    config["class_names"] = ["only", "three", "names"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelPathError, match="lists 3 class names but the model has 6 outputs"):
        open_model(path)


def test_a_model_that_is_not_a_convmixer_classifier_is_named(tmp_path):
    inputs = keras.Input((4,))
    keras.Model(inputs, keras.layers.Dense(2, name="dense")(inputs), name="not_ours").save(tmp_path / "m.keras")
    with pytest.raises(ModelPathError, match="'not_ours' is not a ConvMixer classifier"):
        open_model(tmp_path / "m.keras")
    with pytest.raises(ModelPathError, match="no 'pool' and 'head' layers"):
        logits_model(keras.saving.load_model(tmp_path / "m.keras"))


@pytest.mark.parametrize("kind", list(BROKEN_KERAS_FILES))
def test_a_broken_best_keras_falls_back_with_one_warning(run, tmp_path, caplog, kind):
    path = _run_dir_with(run[0], tmp_path, {"best.keras": kind, "last.keras": "good"})
    with caplog.at_level(logging.WARNING):
        bundle = open_model(path)
    assert bundle.model_file == str(path / "last.keras")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("keras_convmixer")]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "\n" not in message and "best.keras" in message and "using last.keras instead" in message
    assert "File not found" not in message
    x = _images()
    np.testing.assert_allclose(bundle.model.predict(x, verbose=0), run[1].predict(x, verbose=0), atol=1e-6)


def test_a_broken_keras_file_given_directly_says_why(run, tmp_path):
    path = tmp_path / "model.keras"
    path.write_bytes(b"")
    with pytest.raises(KerasFileError, match="the file is empty"):
        open_model(path)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "missing", "does not exist"),
        (lambda tmp: tmp, "neither a run dir"),
        (lambda tmp: (tmp / "weights.h5").write_bytes(b"x") and tmp / "weights.h5", "is not a .keras file"),
    ],
)
def test_paths_that_are_no_model(tmp_path, make, message):
    with pytest.raises((ModelPathError, FileNotFoundError), match=message):
        open_model(make(tmp_path))


def test_a_savedmodel_is_refused_before_its_graph_loads(tmp_path):
    # Not a real graph: loading it would fail with a parse error, not this one.
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"not a graph")
    with pytest.raises(UntrustedSavedModelError, match="--trust-savedmodel"):
        open_model(tmp_path / "sm")


# --------------------------------------------------------------------------- the preset inside a .keras file


def _alone(source, tmp_path, name="copy.keras"):
    """``source`` copied into a fresh folder with nothing beside it."""
    folder = tmp_path / "alone"
    folder.mkdir()
    shutil.copy(source, folder / name)
    return folder / name


def test_a_keras_file_alone_has_lost_its_run_without_a_preset(run, tmp_path):
    bundle = open_model(_alone(run[0] / "best.keras", tmp_path))
    # What a copied file knew before the preset travelled in it: its shape, nothing of the run.
    assert bundle.class_names == [f"class_{i}" for i in range(6)]
    assert (bundle.crop_pct, bundle.interpolation) == (0.96, "bicubic")


def test_the_embedded_preset_travels_with_the_file(run, tmp_path):
    config = json.loads((run[0] / "config.json").read_text())
    config.update(crop_pct=0.8, interpolation="bicubic", mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2])
    source = tmp_path / "with_preset.keras"
    atomic.save_model(run[1], source, entries=preset_entries(config))
    with zipfile.ZipFile(source) as archive:
        assert archive.namelist().count(PRESET_ENTRY) == 1
    copy = _alone(source, tmp_path)
    assert read_preset(copy) == {
        "model": "custom",
        "image_size": SIZE,
        "crop_pct": 0.8,
        "interpolation": "bicubic",
        "class_names": ["a", "b", "c", "d", "e", "f"],
        "num_classes": 6,
        "mean": [0.5, 0.4, 0.3],
        "std": [0.2, 0.2, 0.2],
    }
    # A config.json beside the copy describes some other run: the file's own preset wins.
    (copy.parent / "config.json").write_text(json.dumps(dict(config, class_names=list("uvwxyz"), crop_pct=1.0)))
    bundle = open_model(copy)
    assert bundle.class_names == ["a", "b", "c", "d", "e", "f"]
    assert (bundle.image_size, bundle.crop_pct, bundle.interpolation) == (SIZE, 0.8, "bicubic")
    x = _images()
    np.testing.assert_allclose(bundle.logits(x), run[1].predict(x, verbose=0), atol=1e-4)  # Keras still loads it


def test_a_damaged_preset_is_named(run, tmp_path):
    source = tmp_path / "m.keras"
    shutil.copy(run[0] / "best.keras", source)
    with zipfile.ZipFile(source, "a") as archive:
        archive.writestr(PRESET_ENTRY, "{not json")
    with pytest.raises(KerasFileError, match=f"its {PRESET_ENTRY} cannot be read"):
        open_model(source)
