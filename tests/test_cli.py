"""The evaluate / predict / export / convert commands and the scripts/ front ends, on a tiny model trained on
generated colour images."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from tests.helpers import run_script
from tests.shipping import (
    CLASSES,
    MISLABELLED,
    PER_CLASS,
    SIZE,
    TOTAL,
    error_lines,
    make_trained,
    one_error_line,
    run_cli,
    softmax,
    torchvision_eval_images,
    write_colour_folder,
)

ROOT = Path(__file__).resolve().parents[1]
BACKEND = keras.backend.backend()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return make_trained(tmp_path_factory.mktemp("cli"))


def _tf_eval_images(files):
    """The tf.data eval transform evaluate runs (the SavedModel's graph runs the same one)."""
    from keras_convmixer.data.tf_pipeline import eval_transform

    images = []
    for path in files:
        with Image.open(path) as image:
            images.append(np.asarray(eval_transform(np.asarray(image.convert("RGB")), SIZE, 1.0, "bilinear")))
    return np.stack(images)


def _independent_metrics(model, data_root):
    """Top-1/top-5/loss counted here from model.predict, file by file."""
    files, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((data_root / name).iterdir()):
            files.append(path)
            labels.append(label)
    logits = model.predict(_tf_eval_images(files), verbose=0).astype("float64")
    labels = np.array(labels)
    probs = softmax(logits)
    top5 = np.argsort(-logits, -1)[:, :5]
    return dict(
        top1=float((logits.argmax(-1) == labels).mean()),
        top5=float((top5 == labels[:, None]).any(-1).mean()),
        loss=float(-np.log(probs[np.arange(len(labels)), labels]).mean()),
    )


def test_evaluate_counts_accuracy_on_known_answer(trained, capsys, tmp_path):
    report_file = tmp_path / "report.json"
    code, out, err = run_cli(
        "evaluate",
        [
            trained["run"],
            "--data",
            f"folder:{trained['data']}",
            "--split",
            "train",
            "--val-split",
            "0",
            "--report",
            report_file,
            "--batch-size",
            "8",
        ],
        capsys,
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["num_images"] == TOTAL
    # Every image is classified by its colour, so exactly the mislabelled ones are wrong.
    assert report["top1"] == pytest.approx((TOTAL - MISLABELLED) / TOTAL, abs=1e-12)
    expected = _independent_metrics(trained["model"], trained["data"])
    assert expected["top1"] == pytest.approx(report["top1"], abs=1e-12)
    assert report["top5"] == pytest.approx(expected["top5"], abs=1e-12)
    assert report["loss"] == pytest.approx(expected["loss"], rel=1e-4)
    # The mislabelled red images are the confusion matrix's only off-diagonal entry.
    counts = np.array(report["confusion_matrix"]["counts"])
    green, red = CLASSES.index("green"), CLASSES.index("red")
    assert counts[green, red] == MISLABELLED and counts.trace() == TOTAL - MISLABELLED
    per_class = {row["class"]: row["top1"] for row in report["per_class"]}
    assert per_class["green"] == pytest.approx(PER_CLASS / (PER_CLASS + MISLABELLED))
    assert all(value == 1.0 for name, value in per_class.items() if name != "green")
    # The PNG goes beside the report by default, and the report says where.
    png = tmp_path / "report_confusion.png"
    assert report["confusion_png"] == str(png)
    with Image.open(png) as image:
        assert image.format == "PNG"
    assert json.loads(report_file.read_text()) == report
    # Progress went to stderr: 5 batches of up to 8 images, each one a tenth of the pass and more.
    progress = [line for line in err.splitlines() if line.startswith("INFO Evaluated")]
    assert [line.split(" (")[0] for line in progress] == [f"INFO Evaluated batches: {i} of 5" for i in range(1, 6)]


def test_evaluate_defaults_to_the_runs_validation_split(trained, capsys):
    code, out, err = run_cli("evaluate", [trained["run"]], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["split"] == "val" and report["data"] == f"folder:{trained['data']}"
    assert 0 < report["num_images"] < TOTAL
    assert 0.0 <= report["top1"] <= report["top5"] <= 1.0
    assert "confusion_png" not in report  # no --output, no --confusion-png: no picture


# What the frameworks print to stderr as they load and probe for CUDA (TensorFlow's native INFO/WARNING lines,
# the no-GPU cuInit error), none of it about the command.
_FRAMEWORK_NOISE = (
    r"^[IWE]\d{4} \d\d:\d\d:\d\d",
    r"absl::InitializeLog",
    r"To enable the following instructions",
    r"failed call to cuInit",
    r"oneDNN custom operations",
)


def test_a_held_out_folder_given_alone_is_scored_whole_and_quietly(trained, tmp_path):
    held_out = tmp_path / "test"
    write_colour_folder(held_out, np.random.default_rng(1))  # new images, not the run's folder
    # No TF_CPP_MIN_LOG_LEVEL: the command quiets TensorFlow itself (evaluate's tf.data loads it on every backend).
    proc = run_script(
        ["-m", "keras_convmixer.cli.evaluate", str(trained["run"]), "--data", f"folder:{held_out}"],
        env_extra={"TF_CPP_MIN_LOG_LEVEL": None},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    noise = [line for line in proc.stderr.splitlines() if any(re.search(p, line) for p in _FRAMEWORK_NOISE)]
    assert noise == [], proc.stderr
    assert [line for line in proc.stderr.splitlines() if not line.startswith("INFO ")] == [], proc.stderr
    report = json.loads(proc.stdout)
    assert report["split"] == "all" and report["num_images"] == TOTAL
    # The colour classifier gets exactly the mislabelled images wrong, and agrees with a count made file by file.
    assert report["top1"] == pytest.approx((TOTAL - MISLABELLED) / TOTAL, abs=1e-12)
    assert report["top1"] == pytest.approx(_independent_metrics(trained["model"], held_out)["top1"], abs=1e-12)


def test_split_all_scores_every_image_of_the_runs_data(trained, capsys):
    code, out, err = run_cli("evaluate", [trained["run"], "--split", "all"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["split"] == "all" and report["num_images"] == TOTAL and report["val_split"] == 0
    code, out, err = run_cli("evaluate", [trained["run"], "--split", "all", "--val-split", "0.5"], capsys)
    assert code == 2 and "takes no val_split" in one_error_line(err)


def _predict_reference(model, paths, tf_transform=False):
    images = _tf_eval_images(paths) if tf_transform else torchvision_eval_images(paths, SIZE, 1.0)
    return softmax(model.predict(images, verbose=0))


def test_predict_folder_and_file_with_class_names(trained, capsys):
    single = trained["data"] / "cyan" / "0.png"
    code, out, err = run_cli("predict", [trained["run"] / "best.keras", trained["data"] / "red", single], capsys)
    assert code == 0, err
    results = json.loads(out)
    assert [Path(r["file"]).name for r in results] == ["0.png", "1.png", "2.png", "3.png", "0.png"]
    assert [r["top_k"][0]["class"] for r in results] == ["red"] * 4 + ["cyan"]
    expected = _predict_reference(trained["model"], [r["file"] for r in results])
    for r, probs in zip(results, expected, strict=True):
        assert len(r["top_k"]) == 5
        order = np.argsort(-probs)[:5]
        assert [t["class"] for t in r["top_k"]] == [CLASSES[i] for i in order]
        np.testing.assert_allclose([t["score"] for t in r["top_k"]], probs[order], atol=1e-5)


@pytest.fixture(scope="module")
def exported(trained):
    if BACKEND not in ("tensorflow", "jax"):
        pytest.skip(f"SavedModel export runs from TF/JAX, not {BACKEND}")
    from keras_convmixer.cli import export

    out = trained["tmp"] / "exported"
    assert export.main([str(trained["run"]), "--format", "savedmodel", "--output", str(out)]) == 0
    return out


def test_evaluate_and_predict_accept_a_savedmodel(trained, exported, capsys):
    args = ["--data", f"folder:{trained['data']}", "--split", "train", "--val-split", "0", "--trust-savedmodel"]
    code, out, err = run_cli("evaluate", [exported, *args], capsys)
    assert code == 0, err
    from_saved = json.loads(out)
    code, out, err = run_cli("evaluate", [trained["run"], *args], capsys)
    from_run = json.loads(out)
    for key in ("num_images", "top1", "top5", "confusion_matrix"):
        assert from_saved[key] == from_run[key]
    assert from_saved["loss"] == pytest.approx(from_run["loss"], rel=1e-4)
    assert from_saved["model_kind"] == "savedmodel"

    image = trained["data"] / "yellow" / "1.png"
    code, out, err = run_cli("predict", [exported, image, "--trust-savedmodel"], capsys)
    assert code == 0, err
    top5 = json.loads(out)[0]["top_k"]
    probs = _predict_reference(trained["model"], [image], tf_transform=True)[0]
    assert top5[0]["class"] == "yellow"
    np.testing.assert_allclose([t["score"] for t in top5], np.sort(probs)[::-1][:5], atol=1e-4)


def _corrupt_image(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 5)
    return path


@pytest.mark.parametrize(
    "command, argv, message",
    [
        ("predict", ["{tmp}/nope", "{data}/red/0.png"], "does not exist"),
        ("predict", ["{run}", "{tmp}/missing.png"], "does not exist"),
        ("predict", ["{run}", "{broken}"], "cannot decode image"),
        ("predict", ["{run}", "{data}/red/0.png", "--top-k", "0"], "top-k"),
        ("evaluate", ["{run}", "--data", "folder:{tmp}/no_such_folder"], "no_such_folder"),
        ("evaluate", ["{run}", "--data", "digits"], "10 classes but the model has 8"),
        ("evaluate", ["{run}", "--data", "bogus:thing"], "bogus"),
        ("evaluate", ["{run}", "--batch-size", "0"], "--batch-size: expected a positive integer"),
        ("export", ["{run}", "--format", "tflite"], "invalid choice"),
        ("export", ["{tmp}", "--format", "keras"], "neither a run dir"),
        ("convert", ["{broken}", "--output", "{tmp}/out"], "Unknown checkpoint type"),
        ("convert", ["{broken}", "--output", "{tmp}/out", "--image-size", "-4"], "--image-size"),
    ],
)
def test_bad_input_exits_2_with_one_line(trained, capsys, tmp_path, command, argv, message):
    broken = _corrupt_image(tmp_path)
    fill = dict(tmp=tmp_path, data=trained["data"], run=trained["run"], broken=broken)
    code, out, err = run_cli(command, [a.format(**fill) for a in argv], capsys)
    assert code == 2
    lines = [line for line in error_lines(err) if not line.startswith("usage:")]
    lines = [line for line in lines if "error:" in line or not line.startswith(" ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert message in lines[0]


def test_convert_then_export_keras(capsys, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from tests.torch_reference import timm_convmixer, torch_logits

    reference = timm_convmixer(8, 1, 3, 4, 4, "relu")
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "model.safetensors"))
    names = tmp_path / "names.txt"
    names.write_text("w\nx\ny\nz\n")
    code, out, err = run_cli(
        "convert",
        [
            tmp_path / "model.safetensors",
            "--output",
            tmp_path / "conv",
            "--activation",
            "relu",
            "--image-size",
            16,
            "--class-names",
            names,
        ],
        capsys,
    )
    assert code == 0, err
    assert "dim 8, depth 1, kernel 3, patch 4, relu, 4 classes" in out
    code, out, err = run_cli("export", [tmp_path / "conv", "--format", "keras", "--output", tmp_path / "k"], capsys)
    assert code == 0, err
    assert out == f"Wrote the keras export to {tmp_path / 'k'}\n"
    model = keras.saving.load_model(tmp_path / "k" / "model.keras")
    x = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(model.predict(x, verbose=0), torch_logits(reference, x), atol=1e-4)
    meta = json.loads((tmp_path / "k" / "export.json").read_text())
    assert meta["class_names"] == ["w", "x", "y", "z"]
    assert meta["input"]["crop_pct"] == 0.96 and meta["input"]["interpolation"] == "bicubic"
    assert os.path.isfile(tmp_path / "conv" / "model.weights.h5")
    del torch


def test_export_says_it_writes_inside_the_run_dir(trained, capsys, tmp_path):
    code, out, err = run_cli("export", ["--help"], capsys)
    assert code == 0 and "INSIDE the run dir" in out
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "best.keras"):
        (run / name).write_bytes((trained["run"] / name).read_bytes())
    code, out, err = run_cli("export", [run, "--format", "keras"], capsys)
    assert code == 0, err
    assert (
        out == f"Wrote the keras export to {run / 'export' / 'keras'} (inside the run dir: pass --output to "
        "write elsewhere)\n"
    )
    assert (run / "export" / "keras" / "model.keras").is_file()


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
    tf.saved_model.save(
        module, str(path), signatures={"serve": module.serve, "serve_preprocessed": module.serve_preprocessed}
    )
    (path / "export.json").write_text(
        json.dumps(
            {
                "run_config": {"data": "digits"},
                "class_names": ["x", "y"],
                "input": {"image_size": SIZE, "crop_pct": 1.0, "interpolation": "bilinear"},
            }
        )
    )
    return path, marker


def test_a_savedmodel_only_runs_with_trust_savedmodel(trained, crafted_savedmodel, capsys):
    path, marker = crafted_savedmodel
    image = trained["data"] / "red" / "0.png"
    for command, argv in (("predict", [path, image]), ("evaluate", [path])):
        code, out, err = run_cli(command, argv, capsys)
        assert code == 2 and out == ""
        line = one_error_line(err)
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


def test_predict_on_a_run_dir_killed_while_writing_best_keras(trained, tmp_path, capsys):
    run = _run_dir_with(trained, tmp_path, {"best.keras": "truncated", "model.keras": "good"})
    image = trained["data"] / "magenta" / "2.png"
    code, out, err = run_cli("predict", [run, image], capsys)
    assert code == 0, err
    assert json.loads(out)[0]["top_k"][0]["class"] == "magenta"
    # The warning reaches the terminal as one line.
    warnings = [line for line in err.splitlines() if line.startswith("WARNING ")]
    assert len(warnings) == 1 and "using model.keras instead" in warnings[0]


def test_a_run_dir_with_no_loadable_model_names_every_file(trained, tmp_path, capsys):
    run = _run_dir_with(trained, tmp_path, {"best.keras": "empty", "model.keras": "garbage", "last.keras": "truncated"})
    code, out, err = run_cli("predict", [run, trained["data"] / "red" / "0.png"], capsys)
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert "no loadable model file" in line
    assert "best.keras (the file is empty)" in line
    assert "model.keras (not a complete .keras zip archive" in line and "last.keras (not a complete" in line


@pytest.mark.parametrize(
    "text, message", [("", "is empty"), ('{"model": "custom", ', "is not valid JSON (line 1"), ("[1, 2]", "JSON list")]
)
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_a_broken_config_json_is_named_in_one_line(trained, tmp_path, capsys, command, text, message):
    run = _run_dir_with(trained, tmp_path, {"best.keras": "good"})
    (run / "config.json").write_text(text)
    argv = [run, trained["data"] / "red" / "0.png"] if command == "predict" else [run]
    code, out, err = run_cli(command, argv, capsys)
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert str(run / "config.json") in line and message in line
    assert "Expecting" not in line


# ----------------------------------------------------------------------------- the scripts/ front ends

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
    done = subprocess.run(
        [sys.executable, ROOT / "scripts" / f"{script}.py", *SCRIPT_ARGS[script]],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"{script}.py: error: KERAS_BACKEND='nope' is not a Keras backend: use tensorflow, jax or torch"
    ]


# The installed console scripts import the package before main() runs: an unknown backend must not fail there.
CONSOLE_SCRIPTS = (
    "convmixer-train",
    "convmixer-evaluate",
    "convmixer-predict",
    "convmixer-export",
    "convmixer-convert",
)


def _console_script(name):
    path = Path(sys.executable).parent / name
    if not path.is_file():
        pytest.skip(f"{name} is not installed beside {sys.executable}")
    return path


@pytest.mark.parametrize("name", CONSOLE_SCRIPTS)
@pytest.mark.parametrize("argv", [["--help"], ["model", "x.png"]])
def test_an_unknown_keras_backend_is_one_line_and_exit_2_from_console_scripts(name, argv, tmp_path):
    done = subprocess.run(
        [_console_script(name), *argv],
        capture_output=True,
        text=True,
        env=dict(os.environ, KERAS_BACKEND="nope"),
        cwd=tmp_path,
        timeout=120,
    )
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"{name}: error: KERAS_BACKEND='nope' is not a Keras backend: use tensorflow, jax or torch"
    ]
