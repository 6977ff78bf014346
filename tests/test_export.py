"""SavedModel / ONNX / .keras export: load and call every export, compare with Keras."""

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_convmixer import export
from keras_convmixer.prediction import predict
from tests.helpers import ROOT
from tests.shipping import keras_outputs, make_run_dir, one_error_line, run_cli

BACKEND = keras.backend.backend()
SAVEDMODEL_BACKENDS = ("tensorflow", "jax")
needs_savedmodel_backend = pytest.mark.skipif(
    BACKEND not in SAVEDMODEL_BACKENDS, reason=f"SavedModel export runs from TF/JAX, not {BACKEND}"
)
SIZE, CROP = 16, 0.875


def _uint8_images(n, h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _preprocessed(images):
    """The tf.data eval transform, which the SavedModel's ``serve`` runs in its graph."""
    from keras_convmixer.data.tf_pipeline import eval_transform

    return np.stack([np.asarray(eval_transform(im, SIZE, CROP, "bilinear")) for im in images])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    keras.utils.set_random_seed(0)
    path, model = make_run_dir(tmp_path_factory.mktemp("export") / "run", image_size=SIZE, crop_pct=CROP)
    return path, model


@pytest.fixture(scope="module")
def saved_model(run):
    if BACKEND not in SAVEDMODEL_BACKENDS:
        pytest.skip(f"SavedModel export runs from TF/JAX, not {BACKEND}")
    import tensorflow as tf

    path = export.export_model(run[0], "savedmodel")
    assert path == str(run[0] / "export" / "savedmodel")  # by default, inside the run dir
    return path, tf.saved_model.load(path)


@needs_savedmodel_backend
@pytest.mark.parametrize("n, h, w", [(2, 20, 30), (3, 37, 16)])
def test_serve_matches_keras_on_preprocessed_images(saved_model, run, n, h, w):
    import tensorflow as tf

    images = _uint8_images(n, h, w, seed=h)
    out = {k: v.numpy() for k, v in saved_model[1].signatures["serve"](images=tf.constant(images)).items()}
    probabilities, _ = keras_outputs(run[1], _preprocessed(images))
    np.testing.assert_allclose(out["probabilities"], probabilities, atol=1e-4)
    order = np.argsort(-probabilities, axis=-1)[:, :5]
    np.testing.assert_array_equal(out["top5_classes"], order)
    np.testing.assert_allclose(out["top5_scores"], np.take_along_axis(probabilities, order, -1), atol=1e-4)
    assert out["top5_classes"].dtype == np.int32


@needs_savedmodel_backend
def test_serve_features_and_any_batch_size(saved_model, run):
    import tensorflow as tf

    images = _uint8_images(11, 24, 24, seed=5)  # not a multiple of the JAX export's fixed chunk
    features = saved_model[1].signatures["serve_features"](images=tf.constant(images))["features"].numpy()
    probabilities, expected = keras_outputs(run[1], _preprocessed(images))
    assert features.shape == (11, 8)
    np.testing.assert_allclose(features, expected, atol=1e-4)
    pre = saved_model[1].signatures["serve_preprocessed"](images=tf.constant(_preprocessed(images)))
    np.testing.assert_allclose(tf.nn.softmax(pre["logits"]).numpy(), probabilities, atol=1e-4)


@needs_savedmodel_backend
def test_every_signature_takes_an_empty_batch(saved_model):
    import tensorflow as tf

    signatures = saved_model[1].signatures
    for images in (np.zeros((0, 20, 30, 3), "uint8"), np.zeros((0, SIZE, SIZE, 3), "uint8")):
        out = signatures["serve"](images=tf.constant(images))
        assert out["probabilities"].shape == (0, 6) and out["probabilities"].dtype == tf.float32
        assert out["top5_classes"].shape == (0, 5) and out["top5_classes"].dtype == tf.int32
        assert out["top5_scores"].shape == (0, 5) and out["top5_scores"].dtype == tf.float32
        features = signatures["serve_features"](images=tf.constant(images))["features"]
        assert features.shape == (0, 8) and features.dtype == tf.float32
    pre = signatures["serve_preprocessed"](images=tf.constant(np.zeros((0, SIZE, SIZE, 3), "float32")))
    assert pre["logits"].shape == (0, 6) and pre["features"].shape == (0, 8)


@needs_savedmodel_backend
@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((1, 16, 16, 3), "float32"), "uint8"),
        (np.zeros((16, 16, 3), "uint8"), "rank 4|not compatible with expected shape"),
        (np.zeros((1, 16, 16, 1), "uint8"), "3 \\(RGB\\) channels"),
    ],
)
def test_serve_refuses_bad_input(saved_model, bad, message):
    import tensorflow as tf

    with pytest.raises((tf.errors.InvalidArgumentError, TypeError, ValueError), match=message):
        saved_model[1].signatures["serve"](images=tf.constant(bad))


@needs_savedmodel_backend
def test_signatures_visible_to_saved_model_cli_and_provenance(saved_model, run):
    assert {"serve", "serve_features", "serve_preprocessed", "serving_default"} <= set(saved_model[1].signatures)
    if BACKEND == "tensorflow":  # one subprocess (~10 s) is enough: signature_defs are the same on both backends
        cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
        shown = subprocess.run([cli, "show", "--dir", saved_model[0], "--all"], capture_output=True, text=True)
        assert shown.returncode == 0, shown.stderr[-2000:]
        for name in ("signature_def['serve']", "signature_def['serve_features']", "top5_classes", "DT_UINT8"):
            assert name in shown.stdout
    meta = json.loads(open(os.path.join(saved_model[0], "export.json")).read())
    assert meta["class_names"] == ["a", "b", "c", "d", "e", "f"]
    assert meta["input"] == {
        "image_size": SIZE,
        "crop_pct": CROP,
        "interpolation": "bilinear",
        "pixels": meta["input"]["pixels"],
    }
    assert meta["source"] == str(run[0])
    assert meta["exported_with"]["keras"] == keras.__version__
    assert meta["exported_with"]["backend"] == BACKEND
    assert meta["exported_with"]["tensorflow"]


@pytest.mark.skipif(BACKEND != "torch", reason="only the torch backend refuses SavedModel export")
def test_torch_backend_names_the_backend_to_use(run, tmp_path):
    with pytest.raises(export.ExportBackendError, match="KERAS_BACKEND=jax"):
        export.export_model(run[0], "savedmodel", output=tmp_path / "sm")


@pytest.fixture(scope="module")
def onnx_export(run, tmp_path_factory):
    onnxruntime = pytest.importorskip("onnxruntime")
    out = export.export_model(run[0], "onnx", output=tmp_path_factory.mktemp("onnx"))
    meta = json.loads(open(os.path.join(out, "export.json")).read())
    return onnxruntime.InferenceSession(os.path.join(out, "model.onnx")), meta


def test_onnx_matches_keras(onnx_export, run):
    session, meta = onnx_export
    for n in (1, 4):  # the batch dimension is dynamic
        x = _preprocessed(_uint8_images(n, 19, 23, seed=n))
        got = session.run(None, {"images": x})[0]
        np.testing.assert_allclose(got, keras_outputs(run[1], x)[0], atol=1e-4)
    assert meta["format"] == "onnx"


def test_onnx_names_are_the_documented_ones(onnx_export):
    session, meta = onnx_export
    documented = meta["outputs"]["model.onnx"]
    assert [i.name for i in session.get_inputs()] == [k for k in documented if k != "returns"] == ["images"]
    assert [o.name for o in session.get_outputs()] == documented["returns"] == ["probabilities"]


def test_onnx_takes_an_empty_batch(onnx_export):
    session, _ = onnx_export
    (probabilities,) = session.run(None, {"images": np.zeros((0, SIZE, SIZE, 3), "float32")})
    assert probabilities.shape == (0, 6) and probabilities.dtype == np.float32


def test_keras_format_round_trip(run, tmp_path):
    out = export.export_model(run[0], "keras", output=tmp_path / "k")
    reloaded = keras.saving.load_model(os.path.join(out, "model.keras"))
    x = _preprocessed(_uint8_images(2, 16, 16, seed=9))
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), run[1].predict(x, verbose=0), atol=1e-5)


def test_bad_format_and_paths(run, tmp_path):
    with pytest.raises(ValueError, match="Unknown format"):
        export.export_model(run[0], "tflite")
    with pytest.raises(FileNotFoundError):
        export.export_model(tmp_path / "missing", "keras")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a run dir"):
        export.export_model(tmp_path / "empty", "keras")


def test_a_savedmodel_is_refused_before_anything_loads_it(tmp_path):
    # Not a real graph: if anything tried to load it, the error would be a parse error, not this one.
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"not a graph")
    with pytest.raises(ValueError, match="already an exported SavedModel"):
        export.export_model(tmp_path / "sm", "keras")


# --------------------------------------------------------------------------- the output folder


def _snapshot(folder):
    """Every file under ``folder`` with its bytes, and the folder's names (hidden ones included)."""
    return {
        os.path.relpath(os.path.join(top, name), folder): open(os.path.join(top, name), "rb").read()
        for top, _, names in os.walk(folder)
        for name in names
    }


def _siblings(folder):
    return sorted(os.listdir(os.path.dirname(folder)))


@pytest.mark.parametrize("held", ["an earlier export", "files of its own"])
def test_a_non_empty_target_is_refused_and_left_untouched(run, tmp_path, capsys, held):
    target = tmp_path / "target"
    if held == "an earlier export":
        assert export.export_model(run[0], "keras", output=target) == str(target)
    else:
        target.mkdir()
        for name in ("a.png", "b.png"):
            (target / name).write_bytes(b"\x89PNG\r\n\x1a\n" + name.encode())
    before, siblings = _snapshot(target), _siblings(target)
    for fmt in ("onnx", "savedmodel", "keras"):
        code, out, err = run_cli("export", [run[0], "--format", fmt, "--output", target], capsys)
        assert code == 2 and out == ""
        assert f"is not empty (it holds {held}): pass --overwrite" in one_error_line(err)
    assert _snapshot(target) == before and _siblings(target) == siblings


def test_the_default_target_is_refused_the_second_time(run, tmp_path, capsys):
    path = tmp_path / "run"
    shutil.copytree(run[0], path)
    assert run_cli("export", [path, "--format", "keras"], capsys)[0] == 0
    code, _, err = run_cli("export", [path, "--format", "keras"], capsys)
    assert code == 2 and "pass --overwrite" in one_error_line(err)


def test_overwrite_replaces_the_export_whole(run, tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    (target / "stray.png").write_bytes(b"user file")
    (target / "sub").mkdir()
    (target / "sub" / "deep.txt").write_text("more")
    code, out, err = run_cli("export", [run[0], "--format", "keras", "--output", target, "--overwrite"], capsys)
    assert code == 0, err
    assert sorted(_snapshot(target)) == ["export.json", "model.keras"]
    assert json.loads((target / "export.json").read_text())["format"] == "keras"
    assert _siblings(target) == ["target"]  # no temporary folder left beside it


def test_a_failed_export_leaves_the_old_one_intact(run, tmp_path, monkeypatch):
    target = tmp_path / "target"
    export.export_model(run[0], "keras", output=target)
    before = _snapshot(target)

    def fails_halfway(bundle, output, verbose=False):  # a writer that dies after writing part of its files
        open(os.path.join(output, "model.keras"), "wb").write(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(export, "export_keras", fails_halfway)
    with pytest.raises(OSError, match="No space left"):
        export.export_model(run[0], "keras", output=target, overwrite=True)
    assert _snapshot(target) == before and _siblings(target) == ["target"]


def test_overwrite_never_deletes_the_model_being_exported(run, tmp_path, capsys):
    path = tmp_path / "run"
    shutil.copytree(run[0], path)
    before = _snapshot(path)
    for target in (path, tmp_path):
        code, _, err = run_cli("export", [path, "--format", "keras", "--output", target, "--overwrite"], capsys)
        assert code == 2 and "holds the model being exported" in one_error_line(err)
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli("export", [path, "--format", "keras", "--output", tmp_path / "file"], capsys)
    assert code == 2 and "is a file, not a folder" in one_error_line(err)
    for under in (tmp_path / "file" / "export", tmp_path / "file" / "a" / "b"):  # a folder cannot be made there
        code, _, err = run_cli("export", [path, "--format", "keras", "--output", under], capsys)
        assert code == 2 and f"is under '{tmp_path / 'file'}', a file, not a folder" in one_error_line(err)
    assert (tmp_path / "file").read_text() == "x"
    assert _snapshot(path) == before


# --------------------------------------------------------------------------- a .keras export alone


def test_a_keras_export_alone_predicts_as_its_run(run, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i, (h, w) in enumerate([(20, 30), (37, 16), (16, 16)]):
        Image.fromarray(_uint8_images(1, h, w, seed=i)[0]).save(folder / f"{i}.png")
    exported = export.export_model(run[0], "keras", output=tmp_path / "k")
    alone = tmp_path / "elsewhere" / "copied.keras"
    alone.parent.mkdir()
    shutil.copy(os.path.join(exported, "model.keras"), alone)  # the file only: no config.json, no export.json
    from_file, from_run = predict(alone, [folder], top_k=6), predict(run[0], [folder], top_k=6)
    assert from_file == from_run
    assert {t["class"] for t in from_file[0]["top_k"]} == set("abcdef")  # the run's names, not class_0..


# --------------------------------------------------------------------------- warnings


@pytest.mark.skipif(
    BACKEND != "tensorflow", reason="only tf2onnx (the TensorFlow backend's converter) probes np.object"
)
def test_onnx_export_says_nothing_of_np_object(run, tmp_path):
    pytest.importorskip("onnxruntime")
    # In a fresh process: Keras patches tf2onnx (where the warning comes from) once per process.
    code = f"from keras_convmixer import export; export.export_model({str(run[0])!r}, 'onnx', {str(tmp_path / 'o')!r})"
    env = {**os.environ, "KERAS_BACKEND": BACKEND}
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "o" / "model.onnx").is_file()
    assert "np.object" not in done.stderr, done.stderr[-3000:]
