"""The settings table: every setting declared once, and what is derived from it."""

import argparse
import json
import math
import os
import subprocess
import sys

import pytest

from keras_convmixer import settings


def test_every_setting_is_declared_once_with_help_and_a_known_type():
    names = [s.name for s in settings.SETTINGS]
    assert len(names) == len(set(names))
    spellings = [flag for s in settings.SETTINGS for flag in s.spellings]
    assert len(spellings) == len(set(spellings))
    for s in settings.SETTINGS:
        assert s.help and s.group in settings.GROUPS, s.name
        assert s.type == "bool" or s.type in settings.PARSERS, s.name
        assert not (s.range and s.choices), s.name


def test_base_holds_every_setting_but_the_ones_a_recipe_must_give():
    assert set(settings.BASE) | set(settings.REQUIRED_SETTINGS) == set(settings.BY_NAME)
    assert settings.REQUIRED_SETTINGS == ("model", "image_size", "epochs", "batch_size", "lr", "weight_decay")
    assert settings.BASE["hflip"] == 0.5 and settings.BASE["mean"] is None and settings.BASE["verbose"] == "auto"


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("lr", 0, "--lr 0 is out of range: it must be in (0, inf)."),
        ("hflip", 1.01, "--hflip 1.01 is out of range: it must be in [0, 1]."),
        ("dropout", 1, "--dropout 1 is out of range: it must be in [0, 1)."),
        ("epochs", 2.5, "--epochs must be a whole number, got 2.5."),
        ("epochs", "3", "--epochs must be a number, got '3'."),
        ("lr", math.nan, "--lr nan is out of range"),
        ("label_smoothing", 1, "--label-smoothing 1 is out of range"),  # the first spelling names it
        ("cutmix_alpha", -0.5, "--cutmix -0.5 is out of range"),
        ("download", 1, "--download must be true or false, got 1."),
        ("schedule", "step", "--schedule must be one of onecycle, cosine, got 'step'."),
    ],
)
def test_a_value_out_of_its_range_or_choices_is_one_line_naming_the_flag(name, value, message):
    with pytest.raises(ValueError) as err:
        settings.check_value(settings.BY_NAME[name], value)
    assert str(err.value).startswith(message)


def test_values_inside_pass_and_none_means_unset():
    for name, value in [("lr", 1e-9), ("hflip", 1), ("dropout", 0), ("clip_norm", None), ("verbose", 2)]:
        settings.check_value(settings.BY_NAME[name], value)


def test_the_command_line_types():
    assert settings.pair("0.08,1") == [0.08, 1.0]
    assert settings.triple("0.5, 0.25,1") == [0.5, 0.25, 1.0]
    assert settings.split("5000") == 5000 and settings.split("0.1") == 0.1
    for parse, text in [
        (settings.pair, "1"),
        (settings.triple, "1,2"),
        (settings.triple, "a,b,c"),
        (settings.split, "inf"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


# Runs the command line's main on argv, then reports its exit code and which frameworks it imported.
_PROBE = """
import json, sys
from keras_convmixer.cli.train import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"keras", "tensorflow", "jax", "torch"})
print(json.dumps({"code": code, "heavy": heavy}))
"""


def _probe(tmp_path, *argv):
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=_ENV
    )
    return json.loads(proc.stdout.splitlines()[-1]), proc.stderr.strip().splitlines()


_ENV = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}


def test_multiworker_is_refused_with_its_reason_before_any_framework_loads(tmp_path):
    assert "multiworker" not in settings.STRATEGIES and "multiworker" not in settings.STRATEGY_BACKEND
    with pytest.raises(ValueError, match=r"^--strategy multiworker is not available: Keras 3 fit is broken"):
        settings.check_value(settings.BY_NAME["strategy"], "multiworker")
    (tmp_path / "c.yaml").write_text("strategy: multiworker\n")
    for argv in (["--strategy", "multiworker"], ["--config", "c.yaml"]):
        result, err = _probe(tmp_path, *argv, "--output-dir", "run")
        assert result == {"code": 2, "heavy": []}
        assert len(err) == 1 and "multiworker is not available: Keras 3 fit is broken" in err[0], err
        assert "data-parallel" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "run").exists()
    for name in ("auto", "none", "mirrored", "tpu", "data-parallel"):
        assert settings.strategy(name) == name
