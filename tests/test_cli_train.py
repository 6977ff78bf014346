"""The ``convmixer-train`` command line: flags and their defaults, the YAML config file, --print-config,
one-line errors before any framework loads. The runs themselves (banner, log format, no TensorFlow noise)
are checked end to end in test_train_script.py."""

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_convmixer import recipes
from keras_convmixer.cli.train import build_parser, main, settings_from
from tests.data_images import make_folder
from tests.helpers import ROOT, TINY_FLAGS

BACKEND = keras.backend.backend()

# Runs scripts/train.py, then reports its exit code and which frameworks it imported.
_PROBE = """
import json, runpy, sys
sys.argv = ["train.py", *sys.argv[1:]]
code = 0
try:
    runpy.run_path("scripts/train.py", run_name="__main__")
except SystemExit as exit:
    code = exit.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"keras", "tensorflow", "jax", "torch"})
print("@@probe " + json.dumps({"code": code, "heavy": heavy}))
"""


def probe(*argv):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "KERAS_BACKEND": "tensorflow", "PYTHONPATH": ROOT},
    )
    lines = proc.stdout.splitlines()
    report = json.loads(lines[-1][len("@@probe ") :])
    return report["code"], report["heavy"], "\n".join(lines[:-1]), proc.stderr


def test_help_and_mistakes_answer_before_any_framework_loads(tmp_path):
    code, heavy, out, err = probe("--help")
    assert (code, heavy, err) == (0, [], "")
    assert "usage:" in out and "--print-config" in out
    code, heavy, out, err = probe("--data", f"folder:{tmp_path / 'missing'}")
    assert (code, heavy, out) == (2, [], "")
    assert err.splitlines() == [f"train.py: error: Data folder '{tmp_path / 'missing'}' does not exist."]
    code, heavy, out, err = probe("--lr", "fast")
    assert (code, heavy) == (2, []) and len(err.splitlines()) == 1 and "invalid float value: 'fast'" in err
    code, heavy, out, err = probe("--recipe", "cifar10", "--print-config")
    assert (code, heavy, err) == (0, [], "") and json.loads(out)["model"] == "convmixer_256_8"


def test_every_flag_has_help_with_its_default():
    actions = [a for a in build_parser()._actions if a.dest not in ("help", "config", "print_config")]
    assert len(actions) > 50
    for action in actions:
        assert action.help and "(default: " in action.help, action.option_strings
    # Where the recipes differ, the help names each recipe's value (the paper's and the CIFAR script's lr).
    lr = next(a for a in actions if a.dest == "lr").help
    assert lr.endswith("(default: recipe's: demo 0.01, cifar10 0.05, imagenet 0.01)")
    model = next(a for a in actions if a.dest == "model").help
    assert model.endswith("(default: recipe's: demo custom, cifar10 convmixer_256_8, imagenet convmixer_1536_20)")
    hflip = next(a for a in actions if a.dest == "hflip").help
    assert hflip.endswith("(default: recipe's: demo 0, cifar10 0.5, imagenet 0.5)")  # BASE's 0.5 shows too


def test_config_file_then_command_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        "recipe: cifar10\nlr: 1e-3\nbatch-size: 128\nin_memory: true\naugment-on: device\n"
        "crop_scale: [0.5, 1]\nmixup: 0.2\nhflip:\nwd-exclude-bias-bn: true\n"
    )
    assert main(["--config", str(config), "--batch-size", "64", "--output-dir", "out", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["recipe"] == "cifar10" and cfg["model"] == "convmixer_256_8"  # the recipe, from the file
    assert cfg["lr"] == 0.001 and cfg["in_memory"] is True and cfg["augment_on"] == "device"
    assert cfg["crop_scale"] == [0.5, 1.0] and cfg["mixup_alpha"] == 0.2 and cfg["wd_exclude_bias_bn"] is True
    assert cfg["batch_size"] == 64  # the command line wins
    assert cfg["hflip"] == 0.5  # an empty entry leaves the recipe's value
    assert cfg["epochs"] == 25
    assert cfg == recipes.resolve_config(
        "cifar10",
        dict(
            lr=1e-3,
            batch_size=64,
            in_memory=True,
            augment_on="device",
            crop_scale=[0.5, 1.0],
            mixup_alpha=0.2,
            wd_exclude_bias_bn=True,
            output_dir="out",
            verbose=2,
        ),
    )


@pytest.mark.parametrize(
    "content, message",
    [
        ("lrr: 1\n", "'lrr' is not a setting (--help lists the flags)"),
        ("lr: abc\n", "lr: invalid float value: 'abc'"),
        ("precision: fp8\n", "precision: invalid choice: 'fp8'"),
        ("in-memory: 3\n", "in-memory must be true or false, got 3"),
        ("lr: [1\n", "is not valid YAML (line 2, column 1)"),
        ("- 1\n", "must be a mapping of flag names to values, not a YAML list"),
        ("print-config: true\n", "'print-config' is not a setting"),
        ("lr: -1\n", "--lr -1.0 is out of range: it must be in (0, inf)"),
    ],
)
def test_config_file_mistakes_are_one_line(tmp_path, capsys, content, message):
    config = tmp_path / "run.yaml"
    config.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_verbose_is_one_line_per_epoch_when_stdout_is_not_a_terminal():
    # End to end (stdout a pipe, no --verbose): the runs of test_train_script.py.
    parser = build_parser()
    assert settings_from(parser, [], isatty=False)[1]["verbose"] == 2
    assert settings_from(parser, [], isatty=True)[1]["verbose"] == "auto"
    assert settings_from(parser, ["--verbose", "1"], isatty=False)[1]["verbose"] == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "convmixer_9_9"], "Unknown model"),
        (["--image-size", "30"], "not divisible by the patch size"),
        (["--data", "folder:/no/such/folder"], "does not exist"),
        (["--weights", "/no/such/model.safetensors"], "Weights '/no/such/model.safetensors' do not exist"),
        (["--backbone-lr-scale", "2"], "--backbone-lr-scale 2.0 is out of range: it must be in (0, 1]"),
        (["--data", f"folder:{os.path.abspath(__file__)}"], "is a file, not a directory of class folders"),
        (["--strategy", "mirrored" if BACKEND != "tensorflow" else "data-parallel"], "needs KERAS_BACKEND="),
        (["--in-memory", "--augment-on", "host"], "--augment-on device"),
        (["--lr", "-1"], "--lr -1.0 is out of range: it must be in (0, inf)"),
        (["--val-split", "1.5"], "--val-split 1.5 must be a fraction in [0, 1) or a whole number"),
        (["--val-split", "inf"], "expected a fraction in [0, 1) or a whole number of images"),
        (
            ["--patch-size", "0", "--model", "custom", "--dim", "8", "--depth", "1", "--kernel-size", "3"],
            "--patch-size 0 is out of range",
        ),
        (
            ["--depth", "0", "--model", "custom", "--dim", "8", "--patch-size", "2", "--kernel-size", "3"],
            "--depth 0 is out of range",
        ),
        (["--label-smoothing", "5"], "--label-smoothing 5.0 is out of range: it must be in [0, 1)"),
        (["--crop-scale", "1,0"], "--crop-scale 1.0,0.0 must be two numbers with 0 < low <= high <= 1"),
        (["--crop-scale", "1"], "expected two comma-separated numbers like 0.08,1.0, got '1'"),
        (["--num-processes", "0"], "--num-processes 0 is out of range"),
        (["--crop-pct", "0"], "--crop-pct 0.0 is out of range: it must be in (0, 1]"),
        (["--logical-cpus", "-1"], "--logical-cpus -1 is out of range"),
        (["--image-size", "0"], "--image-size 0 is out of range"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_run_dir_started_with_other_settings_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    config = recipes.resolve_config("demo", {"output_dir": str(run), "epochs": 4})
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["--output-dir", str(run), "--epochs", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "other settings (--epochs 4 there, 2 now)" in err[-1]  # named as the flag, as everywhere
    assert json.loads((run / "config.json").read_text())["epochs"] == 4  # nothing overwritten


def test_divergence_saves_nothing_non_finite_and_exits_1(tmp_path, capsys):
    """An lr that overflows float32 within a step (the reported repro, lr 1e3 with float16 compute, is
    absorbed by TF's loss scaling): the run must stop with one line and leave no non-finite weights in
    any checkpoint or backup."""
    run = tmp_path / "run"
    argv = [
        "--recipe",
        "demo",
        "--epochs",
        "3",
        "--steps-per-epoch",
        "6",
        "--precision",
        "float32",
        "--output-dir",
        str(run),
        *TINY_FLAGS,
        "--lr",
        "1e30",
        "--clip-norm",
        "0",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "diverged in epoch" in err[-1] and "Traceback" not in "\n".join(err)
    for name in ("last.keras", "best.keras"):
        if (run / name).exists():
            weights = keras.saving.load_model(run / name, compile=False).get_weights()
            assert all(np.isfinite(w).all() for w in weights), name
    import h5py

    arrays = []

    def collect(_, obj):
        if isinstance(obj, h5py.Dataset) and np.issubdtype(obj.dtype, np.floating):
            arrays.append(obj[()])

    for path in (run / "backup").rglob("*.h5"):
        with h5py.File(path) as f:
            f.visititems(collect)
    assert all(np.isfinite(a).all() for a in arrays)


# ----------------------------------------------------------------------------- the settings round trip


def _printed(capsys, argv):
    assert main([*argv, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("recipe", ["demo", "cifar10", "imagenet"])
def test_print_config_output_is_a_config_file_that_gives_the_same_settings(recipe, tmp_path, capsys):
    printed = _printed(capsys, ["--recipe", recipe, "--mean", "0.5,0.4,0.3", "--lr", "0.002"])
    assert printed["mean"] == [0.5, 0.4, 0.3] and printed["std"] != printed["mean"]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(printed))
    assert _printed(capsys, ["--config", str(path)]) == printed
    # The file's settings stand where the command line is silent, and the command line wins.
    again = _printed(capsys, ["--config", str(path), "--std", "0.25,0.25,0.25"])
    assert again == {**printed, "std": [0.25] * 3, "model_kwargs": {**printed["model_kwargs"], "std": [0.25] * 3}}


def test_a_run_dirs_config_json_is_a_config_file_that_resumes_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--epochs", "2", "--steps-per-epoch", "2", "--output-dir", str(run), *TINY_FLAGS]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert {"backend", "class_names", "num_classes", "precision_used", "strategy_used"} <= set(saved)
    capsys.readouterr()
    resolved = _printed(capsys, ["--config", str(run / "config.json")])
    assert resolved == {k: v for k, v in saved.items() if k in resolved}
    assert set(saved) - set(resolved) == {"backend", "class_names", "num_classes", "precision_used", "strategy_used"}
    # The same settings are the same run: it is accepted as its resumption (here with nothing left to train:
    # it says the run is complete), not refused as a run with other settings.
    assert main(["--config", str(run / "config.json")]) == 0
    assert capsys.readouterr().out.startswith(f"Run {run} is complete: 2 epochs trained")
    assert len((run / "history.csv").read_text().splitlines()) == 1 + 2


# ----------------------------------------------------------------------------- failed starts and finished runs


def _one_line_exit(argv, capsys, code=2):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    # One error line, last; a WARNING the data gave on the way may precede it.
    assert [line for line in err if not line.startswith("WARNING ")] == err[-1:] and "Traceback" not in err[-1], err
    return err[-1]


def test_the_readme_commands_that_fail_their_checks_leave_nothing_on_disk(tmp_path, monkeypatch, capsys):
    images, _ = make_folder(tmp_path)
    one_class = tmp_path / "one"
    shutil.copytree(images / "bee", one_class / "bee")
    work = tmp_path / "work"  # an empty folder, the default runs/<date-time> beneath it
    work.mkdir()
    monkeypatch.chdir(work)
    err = _one_line_exit(["--recipe", "cifar10", "--data", f"folder:{one_class}"], capsys)
    assert err.endswith(f"folder:{one_class}: fewer training images than one batch of 512.")
    err = _one_line_exit(["--recipe", "cifar10", "--data", f"folder:{images / 'cat'}"], capsys)  # flat: no classes
    assert "has no class sub-folders" in err
    # The README's mirrored ImageNet command on a machine without the data (or, off TensorFlow, the backend).
    _one_line_exit(
        ["--recipe", "imagenet", "--strategy", "mirrored", "--batch-size", "640", "--data-dir", str(tmp_path / "tfds")],
        capsys,
    )
    assert os.listdir(work) == []
    # --output-dir naming a folder of the user's: it keeps what it held, and nothing is added.
    mine = work / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    _one_line_exit(["--recipe", "cifar10", "--data", f"folder:{one_class}", "--output-dir", str(mine)], capsys)
    assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"


def test_a_run_that_fails_in_its_first_epoch_takes_away_only_what_it_made(tmp_path, capsys):
    diverging = [*TINY_FLAGS, "--epochs", "2", "--steps-per-epoch", "2", "--precision", "float32", "--lr", "1e30"]
    diverging += ["--clip-norm", "0"]
    err = _one_line_exit([*diverging, "--output-dir", str(tmp_path / "new" / "run")], capsys, code=1)
    assert "diverged in epoch 1 of" in err
    assert os.listdir(tmp_path) == []  # the run dir and the parent made for it
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert "diverged in epoch 1 of" in _one_line_exit([*diverging, "--output-dir", str(mine)], capsys, code=1)
    assert os.listdir(mine) == ["notes.txt"]


@pytest.mark.parametrize("entry", ["history.csv", ".lock"])
def test_a_folder_where_the_run_keeps_a_file_is_one_line_and_loses_nothing(tmp_path, capsys, entry):
    run = tmp_path / "run"
    (run / entry).mkdir(parents=True)
    (run / entry / "kept.txt").write_text("mine")
    err = _one_line_exit([*TINY_FLAGS, "--output-dir", str(run)], capsys)
    assert err.endswith(
        f"{run / entry} is a folder where a run keeps its {entry} file: move it away, or pass another --output-dir"
    )
    assert sorted(p.name for p in run.rglob("*")) == sorted([entry, "kept.txt"])


def test_a_finished_run_says_it_is_complete_and_more_epochs_say_how_to_fine_tune(tmp_path, capsys):
    run = tmp_path / "run"
    argv = [*TINY_FLAGS, "--epochs", "1", "--steps-per-epoch", "2", "--output-dir", str(run)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert " 10 classes, 1 epoch x 2 steps, batch 32," in out and "\nDone: 1 epoch, val top-1 " in out
    metrics = json.loads((run / "metrics.json").read_text())
    files = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    # Re-running it trains nothing and says so in one line, before any framework loads (on any backend).
    code, heavy, out, err = probe(*argv)
    assert (code, heavy, err) == (0, [], "")
    assert out == (
        f"Run {run} is complete: 1 epoch trained, val top-1 {metrics['val_top1']:.2%}; nothing left to train (its "
        "best.keras, metrics.json and curves.png are there; pass a new --output-dir to train another run)."
    )
    # More epochs cannot continue a schedule that has ended: one line with the command that fine-tunes from it.
    code, heavy, out, err = probe(*argv, "--epochs", "3")
    assert (code, heavy, out) == (2, [], "") and len(err.splitlines()) == 1
    assert f"{run} is complete after 1 epoch and its learning-rate schedule has ended, so it cannot go on to 3" in err
    hint = err.split("by adding ")[1].split(" to this command")[0].split()
    assert hint == ["--weights", str(run), "--output-dir", f"{run}-finetune"]
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == files  # the finished run is untouched
    assert main([*argv, "--epochs", "3", *hint]) == 0
    tuned = json.loads((tmp_path / "run-finetune" / "metrics.json").read_text())
    assert tuned["epochs"] == 3 and tuned["optimizer_steps"] == 6
    assert json.loads((tmp_path / "run-finetune" / "config.json").read_text())["weights"]["source"] == str(run)
