"""The ``convmixer-train`` command line: flags and their defaults, the YAML config file, --print-config,
one-line errors before any framework loads. The runs themselves (banner, log format, no TensorFlow noise)
are checked end to end in test_train_script.py."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_convmixer import recipes
from keras_convmixer.cli.train import build_parser, main, settings_from
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
    assert "other settings (epochs: 4 there, 2 now)" in err[-1]
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
    assert "diverged at epoch" in err[-1] and "Traceback" not in "\n".join(err)
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
    # The same settings are the same run: it is accepted as its resumption (here with nothing left to train),
    # not refused as a run with other settings.
    assert main(["--config", str(run / "config.json")]) == 0
    assert len((run / "history.csv").read_text().splitlines()) == 1 + 2
