"""evaluate / predict / export / convert_timm CLIs on a tiny model trained on generated colour images."""

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

import keras_convmixer as kc
from keras_convmixer.data import eval_transform
from tests.shipping import softmax

ROOT = Path(__file__).resolve().parents[1]
BACKEND = keras.backend.backend()
# Sorted, as class folders are listed.
COLOURS = {
    "black": (0, 0, 0),
    "blue": (0, 0, 255),
    "cyan": (0, 255, 255),
    "green": (0, 255, 0),
    "magenta": (255, 0, 255),
    "red": (255, 0, 0),
    "white": (255, 255, 255),
    "yellow": (255, 255, 0),
}
CLASSES = list(COLOURS)
SIZE = 16
PER_CLASS = 4
MISLABELLED = 2  # red images filed under "green": a perfect colour classifier gets exactly these wrong


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"cli_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(name, argv, capsys):
    """Run a script's main() in-process; returns (exit code, stdout, stderr)."""
    try:
        code = load_script(name).main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _noisy(colour, rng, h, w):
    base = np.array(colour, "float32")[None, None, :]
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype("uint8")


def _write_folder(root, rng):
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            Image.fromarray(_noisy(colour, rng, 20, 26)).save(root / name / f"{i}.png")
    for i in range(MISLABELLED):
        Image.fromarray(_noisy(COLOURS["red"], rng, 22, 18)).save(root / "green" / f"red_{i}.png")


class _UnregisteredSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Stands in for a training run's custom schedule: its optimizer cannot be deserialized
    by a process that has not imported it, which must not stop evaluate/predict."""

    def __call__(self, step):
        return keras.ops.convert_to_tensor(0.02)

    def get_config(self):
        return {}


def _train(rng):
    x = np.concatenate([[_noisy(c, rng, SIZE, SIZE) for _ in range(16)] for c in COLOURS.values()]).astype("float32")
    y = np.repeat(np.arange(len(COLOURS)), 16)
    model = kc.ConvMixer(16, 1, 3, 4, classes=len(COLOURS), classifier_activation=None, input_shape=(SIZE, SIZE, 3))
    model.compile(
        keras.optimizers.Adam(_UnregisteredSchedule()),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    for _ in range(20):
        model.fit(x, y, batch_size=32, epochs=5, shuffle=True, verbose=0)
        if (model.predict(x, verbose=0).argmax(-1) == y).all():
            return model
    pytest.fail("the tiny colour classifier did not fit its (trivially separable) training set")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    tmp = tmp_path_factory.mktemp("cli")
    data = tmp / "colours"
    _write_folder(data, rng)
    model = _train(rng)
    run = tmp / "run"
    run.mkdir()
    model.save(run / "best.keras")
    config = {
        "model": "custom",
        "model_kwargs": dict(dim=16, depth=1, kernel_size=3, patch_size=4, classes=len(CLASSES)),
        "image_size": SIZE,
        "num_classes": len(CLASSES),
        "class_names": CLASSES,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "data": f"folder:{data}",
        "val_split": 0.25,
        "seed": 0,
    }
    (run / "config.json").write_text(json.dumps(config))
    return dict(model=model, run=run, data=data, tmp=tmp)


def _independent_metrics(model, data_root):
    """Top-1/top-5/loss counted here from model.predict, file by file."""
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((data_root / name).iterdir()):
            image = np.asarray(Image.open(path).convert("RGB"))
            images.append(np.asarray(eval_transform(image, SIZE, 1.0, "bilinear")))
            labels.append(label)
    logits = model.predict(np.stack(images), verbose=0).astype("float64")
    labels = np.array(labels)
    probs = softmax(logits)
    top5 = np.argsort(-logits, -1)[:, :5]
    return dict(
        n=len(labels),
        top1=float((logits.argmax(-1) == labels).mean()),
        top5=float((top5 == labels[:, None]).any(-1).mean()),
        loss=float(-np.log(probs[np.arange(len(labels)), labels]).mean()),
    )


def test_evaluate_counts_accuracy_on_known_answer(trained, capsys, tmp_path):
    report_file = tmp_path / "report.json"
    code, out, err = run_cli(
        "evaluate",
        [trained["run"], "--data", f"folder:{trained['data']}", "--split", "train", "--val-split", "0",
         "--report", report_file],
        capsys,
    )
    assert code == 0, err
    report = json.loads(out)
    total = len(CLASSES) * PER_CLASS + MISLABELLED
    assert report["num_images"] == total
    # Every image is classified by its colour, so exactly the mislabelled ones are wrong.
    assert report["top1"] == pytest.approx((total - MISLABELLED) / total, abs=1e-12)
    expected = _independent_metrics(trained["model"], trained["data"])
    assert expected["top1"] == pytest.approx(report["top1"], abs=1e-12)
    assert report["top5"] == pytest.approx(expected["top5"], abs=1e-12)
    assert report["loss"] == pytest.approx(expected["loss"], rel=1e-4)
    assert json.loads(report_file.read_text()) == report


def test_evaluate_defaults_to_the_runs_validation_split(trained, capsys):
    code, out, err = run_cli("evaluate", [trained["run"]], capsys)
    assert code == 0, err
    report = json.loads(out)
    total = len(CLASSES) * PER_CLASS + MISLABELLED
    assert report["split"] == "val" and report["data"] == f"folder:{trained['data']}"
    assert 0 < report["num_images"] < total
    assert 0.0 <= report["top1"] <= report["top5"] <= 1.0


def _predict_reference(model, path):
    image = np.asarray(Image.open(path).convert("RGB"))
    return softmax(model.predict(np.asarray(eval_transform(image, SIZE, 1.0, "bilinear"))[None], verbose=0))[0]


def test_predict_folder_and_file_with_class_names(trained, capsys):
    single = trained["data"] / "cyan" / "0.png"
    code, out, err = run_cli("predict", [trained["run"] / "best.keras", trained["data"] / "red", single], capsys)
    assert code == 0, err
    results = json.loads(out)
    assert [Path(r["file"]).name for r in results] == ["0.png", "1.png", "2.png", "3.png", "0.png"]
    assert [r["top_k"][0]["class"] for r in results] == ["red"] * 4 + ["cyan"]
    for r in results:
        assert len(r["top_k"]) == 5
        probs = _predict_reference(trained["model"], r["file"])
        order = np.argsort(-probs)[:5]
        assert [t["class"] for t in r["top_k"]] == [CLASSES[i] for i in order]
        np.testing.assert_allclose([t["score"] for t in r["top_k"]], probs[order], atol=1e-5)


@pytest.fixture(scope="module")
def exported(trained):
    if BACKEND not in ("tensorflow", "jax"):
        pytest.skip(f"SavedModel export runs from TF/JAX, not {BACKEND}")
    out = trained["tmp"] / "exported"
    code = load_script("export").main([str(trained["run"]), "--format", "savedmodel", "--output", str(out)])
    assert code == 0
    return out


def test_evaluate_and_predict_accept_a_savedmodel(trained, exported, capsys):
    args = ["--data", f"folder:{trained['data']}", "--split", "train", "--val-split", "0", "--trust-savedmodel"]
    code, out, err = run_cli("evaluate", [exported, *args], capsys)
    assert code == 0, err
    from_saved = json.loads(out)
    code, out, err = run_cli("evaluate", [trained["run"], *args], capsys)
    from_run = json.loads(out)
    for key in ("num_images", "top1", "top5"):
        assert from_saved[key] == from_run[key]
    assert from_saved["loss"] == pytest.approx(from_run["loss"], rel=1e-4)
    assert from_saved["model_kind"] == "savedmodel"

    image = trained["data"] / "yellow" / "1.png"
    code, out, err = run_cli("predict", [exported, image, "--trust-savedmodel"], capsys)
    assert code == 0, err
    top5 = json.loads(out)[0]["top_k"]
    probs = _predict_reference(trained["model"], image)
    assert top5[0]["class"] == "yellow"
    np.testing.assert_allclose([t["score"] for t in top5], np.sort(probs)[::-1][:5], atol=1e-4)


def _corrupt_image(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 5)
    return path


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("predict", ["{tmp}/nope", "{data}/red/0.png"], "does not exist"),
        ("predict", ["{run}", "{tmp}/missing.png"], "does not exist"),
        ("predict", ["{run}", "{broken}"], "cannot decode image"),
        ("predict", ["{run}", "{data}/red/0.png", "--top-k", "0"], "top-k"),
        ("evaluate", ["{run}", "--data", "folder:{tmp}/no_such_folder"], "no_such_folder"),
        ("evaluate", ["{run}", "--data", "digits"], "10 classes but the model has 8"),
        ("evaluate", ["{run}", "--data", "bogus:thing"], "bogus"),
        ("export", ["{run}", "--format", "tflite"], "invalid choice"),
        ("export", ["{tmp}", "--format", "keras"], "neither a run dir"),
        ("convert_timm", ["{broken}", "--output", "{tmp}/out"], "Unknown checkpoint type"),
    ],
)
def test_bad_input_exits_2_with_one_line(trained, capsys, tmp_path, script, argv, message):
    broken = _corrupt_image(tmp_path)
    fill = dict(tmp=tmp_path, data=trained["data"], run=trained["run"], broken=broken)
    code, out, err = run_cli(script, [a.format(**fill) for a in argv], capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if not line.startswith("usage:") and line.strip()]
    lines = [line for line in lines if "error:" in line or not line.startswith(" ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert message in lines[0]


def test_convert_timm_then_export_keras(capsys, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from tests.torch_reference import timm_convmixer, torch_logits

    reference = timm_convmixer(8, 1, 3, 4, 4, "relu")
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "model.safetensors"))
    names = tmp_path / "names.txt"
    names.write_text("w\nx\ny\nz\n")
    code, out, err = run_cli(
        "convert_timm",
        [tmp_path / "model.safetensors", "--output", tmp_path / "conv", "--activation", "relu",
         "--image-size", 16, "--class-names", names],
        capsys,
    )
    assert code == 0, err
    assert "dim 8, depth 1, kernel 3, patch 4, relu, 4 classes" in out
    code, out, err = run_cli("export", [tmp_path / "conv", "--format", "keras", "--output", tmp_path / "k"], capsys)
    assert code == 0, err
    model = keras.saving.load_model(tmp_path / "k" / "model.keras")
    x = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(model.predict(x, verbose=0), torch_logits(reference, x), atol=1e-4)
    meta = json.loads((tmp_path / "k" / "export.json").read_text())
    assert meta["class_names"] == ["w", "x", "y", "z"]
    assert meta["input"]["crop_pct"] == 0.96 and meta["input"]["interpolation"] == "bicubic"
    assert os.path.isfile(tmp_path / "conv" / "model.weights.h5")
    del torch


def test_reports_are_strict_json_even_for_non_finite_scores():
    from keras_convmixer.cli import json_text

    text = json_text([{"file": "a.png", "top_k": [{"class": "cat", "score": float("nan")}]},
                      {"loss": float("inf"), "top1": 0.5, "per_class": (1.0, float("-inf"))}])
    assert json.loads(text) == [{"file": "a.png", "top_k": [{"class": "cat", "score": None}]},
                                {"loss": None, "top1": 0.5, "per_class": [1.0, None]}]
    assert "NaN" not in text and "Infinity" not in text


def _one_error_line(err):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def crafted_savedmodel(tmp_path):
    """A SavedModel with export.json and the expected signatures whose graph also writes a file when called:
    what any SavedModel can do, since it runs its own TensorFlow ops."""
    tf = pytest.importorskip("tensorflow")
    marker = tmp_path / "written_by_the_graph.txt"

    class Crafted(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec(None, tf.uint8, name="images")])
        def serve(self, images):
            with tf.control_dependencies([tf.io.write_file(str(marker), "the graph ran")]):
                return {"probabilities": tf.fill([tf.shape(images)[0], 2], 0.5)}

        @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="images")])
        def serve_preprocessed(self, images):
            with tf.control_dependencies([tf.io.write_file(str(marker), "the graph ran")]):
                n = tf.shape(images)[0]
                return {"logits": tf.zeros([n, 2]), "features": tf.zeros([n, 4])}

    module = Crafted()
    path = tmp_path / "crafted"
    tf.saved_model.save(module, str(path), signatures={"serve": module.serve,
                                                       "serve_preprocessed": module.serve_preprocessed})
    (path / "export.json").write_text(json.dumps({
        "run_config": {"data": "digits"}, "class_names": ["x", "y"],
        "input": {"image_size": SIZE, "crop_pct": 1.0, "interpolation": "bilinear"},
    }))
    return path, marker


def test_a_savedmodel_only_runs_with_trust_savedmodel(trained, crafted_savedmodel, capsys):
    path, marker = crafted_savedmodel
    image = trained["data"] / "red" / "0.png"
    for script, argv in (("predict", [path, image]), ("evaluate", [path])):
        code, out, err = run_cli(script, argv, capsys)
        assert code == 2 and out == ""
        line = _one_error_line(err)
        assert ": error: Not opening the SavedModel" in line
        assert "--trust-savedmodel" in line and "can read and write files" in line
        assert not marker.exists()
    # With the flag the graph runs, side effect included: the flag is the only thing that stopped it above.
    code, out, err = run_cli("predict", [path, image, "--trust-savedmodel"], capsys)
    assert code == 0, err
    assert [t["class"] for t in json.loads(out)[0]["top_k"]] == ["x", "y"]
    assert marker.read_text() == "the graph ran"


BROKEN_KERAS_FILES = {
    "empty": lambda good: b"",
    "truncated": lambda good: good[: len(good) // 2],  # a kill halfway through the write
    "garbage": lambda good: b"definitely not a zip archive" * 4,
}


def _run_dir_with(trained, tmp_path, files):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_bytes((trained["run"] / "config.json").read_bytes())
    good = (trained["run"] / "best.keras").read_bytes()
    for name, kind in files.items():
        (run / name).write_bytes(good if kind == "good" else BROKEN_KERAS_FILES[kind](good))
    return run


@pytest.mark.parametrize("kind", list(BROKEN_KERAS_FILES))
def test_a_broken_best_keras_falls_back_with_one_warning(trained, tmp_path, caplog, kind):
    from keras_convmixer.inference import open_model

    run = _run_dir_with(trained, tmp_path, {"best.keras": kind, "last.keras": "good"})
    with caplog.at_level(logging.WARNING):
        bundle = open_model(run)
    assert bundle.model_file == str(run / "last.keras")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("keras_convmixer")]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "\n" not in message and "best.keras" in message and "using last.keras instead" in message
    assert "File not found" not in message
    x = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    np.testing.assert_allclose(bundle.model.predict(x, verbose=0), trained["model"].predict(x, verbose=0), atol=1e-6)


def test_predict_on_a_run_dir_killed_while_writing_best_keras(trained, tmp_path, capsys, caplog):
    run = _run_dir_with(trained, tmp_path, {"best.keras": "truncated", "model.keras": "good"})
    image = trained["data"] / "magenta" / "2.png"
    with caplog.at_level(logging.WARNING):
        code, out, err = run_cli("predict", [run, image], capsys)
    assert code == 0, err
    assert json.loads(out)[0]["top_k"][0]["class"] == "magenta"
    assert any("using model.keras instead" in r.getMessage() for r in caplog.records)


def test_a_run_dir_with_no_loadable_model_names_every_file(trained, tmp_path, capsys):
    run = _run_dir_with(trained, tmp_path, {"best.keras": "empty", "model.keras": "garbage", "last.keras": "truncated"})
    code, out, err = run_cli("predict", [run, trained["data"] / "red" / "0.png"], capsys)
    assert code == 2 and out == ""
    line = _one_error_line(err)
    assert "no loadable model file" in line
    assert "best.keras (the file is empty)" in line
    assert "model.keras (not a complete .keras zip archive" in line and "last.keras (not a complete" in line


@pytest.mark.parametrize(
    "text, message", [("", "is empty"), ('{"model": "custom", ', "is not valid JSON (line 1"), ("[1, 2]", "JSON list")]
)
@pytest.mark.parametrize("script", ["predict", "evaluate"])
def test_a_broken_config_json_is_named_in_one_line(trained, tmp_path, capsys, script, text, message):
    run = _run_dir_with(trained, tmp_path, {"best.keras": "good"})
    (run / "config.json").write_text(text)
    argv = [run, trained["data"] / "red" / "0.png"] if script == "predict" else [run]
    code, out, err = run_cli(script, argv, capsys)
    assert code == 2 and out == ""
    line = _one_error_line(err)
    assert str(run / "config.json") in line and message in line
    assert "Expecting" not in line


def test_reports_are_json_for_numpy_values_and_paths():
    from keras_convmixer.cli import json_text

    report = {"top1": np.float32(0.25), "loss": np.float32("nan"), "num_images": np.int64(8), "file": Path("a.png"),
              "scores": np.array([0.5, np.inf], "float32"), np.int64(3): (True, None)}
    assert json.loads(json_text(report)) == {"top1": 0.25, "loss": None, "num_images": 8, "file": "a.png",
                                             "scores": [0.5, None], "3": [True, None]}


SCRIPT_ARGS = {
    "train": [],
    "predict": ["model", "image.png"],
    "evaluate": ["model"],
    "export": ["model", "--format", "keras"],
    "convert_timm": ["model.safetensors", "--output", "out"],
    "compare_timm": [],
    "benchmark": [],
    "benchmark_input": [],
}


@pytest.mark.parametrize("script", list(SCRIPT_ARGS))
def test_an_unknown_keras_backend_is_one_line_and_exit_2(script, tmp_path):
    # A subprocess: Keras picks its backend once per process. It stops before importing keras, so it is quick.
    env = dict(os.environ, KERAS_BACKEND="nope")
    done = subprocess.run([sys.executable, ROOT / "scripts" / f"{script}.py", *SCRIPT_ARGS[script]],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"{script}.py: error: KERAS_BACKEND='nope' is not a Keras backend: use tensorflow, jax or torch"
    ]
