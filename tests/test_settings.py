"""The settings table: every setting declared once, and what is derived from it."""

import argparse
import math

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
