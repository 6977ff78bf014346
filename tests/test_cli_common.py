"""keras_convmixer.cli.common: one-line errors, strict JSON reports, logging to stderr."""

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from keras_convmixer import errors
from keras_convmixer.cli.common import (
    emit_json,
    fail,
    first_line,
    json_text,
    load_main,
    one_line_errors,
    positive_int,
    setup_logging,
)


def test_reports_are_strict_json_even_for_non_finite_scores():
    text = json_text(
        [
            {"file": "a.png", "top_k": [{"class": "cat", "score": float("nan")}]},
            {"loss": float("inf"), "top1": 0.5, "per_class": (1.0, float("-inf"))},
        ]
    )
    assert json.loads(text) == [
        {"file": "a.png", "top_k": [{"class": "cat", "score": None}]},
        {"loss": None, "top1": 0.5, "per_class": [1.0, None]},
    ]
    assert "NaN" not in text and "Infinity" not in text


def test_reports_are_json_for_numpy_values_and_paths():
    report = {
        "top1": np.float32(0.25),
        "loss": np.float32("nan"),
        "num_images": np.int64(8),
        "file": Path("a.png"),
        "scores": np.array([0.5, np.inf], "float32"),
        np.int64(3): (True, None),
    }
    assert json.loads(json_text(report)) == {
        "top1": 0.25,
        "loss": None,
        "num_images": 8,
        "file": "a.png",
        "scores": [0.5, None],
        "3": [True, None],
    }


def test_a_confusion_matrix_takes_one_line_per_row():
    counts = np.arange(12).reshape(3, 4)
    text = json_text({"confusion_matrix": {"counts": counts}, "class_names": ["a", "b", "c"], "empty": {}})
    assert json.loads(text) == {
        "confusion_matrix": {"counts": counts.tolist()},
        "class_names": ["a", "b", "c"],
        "empty": {},
    }
    lines = text.splitlines()
    for row in counts.tolist():
        assert sum(line.strip().rstrip(",") == json.dumps(row) for line in lines) == 1
    assert '  "class_names": ["a", "b", "c"],' in lines


@pytest.mark.parametrize(
    "err, expected",
    [
        (ValueError("\n\n  first line  \nsecond line"), "first line"),
        (OSError("only line"), "only line"),
        (ValueError(""), "ValueError"),
        (KeyError("key"), "'key'"),
    ],
)
def test_first_line(err, expected):
    assert first_line(err) == expected


def test_fail_exits_2_with_one_line(capsys):
    parser = argparse.ArgumentParser(prog="convmixer-x")
    with pytest.raises(SystemExit) as exit_info:
        fail(parser, ValueError("bad --thing value\ndetails nobody asked for"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "convmixer-x: error: bad --thing value\n"


def test_first_line_has_one_home():
    # The library words its errors with it too, and must not need the CLI package for that.
    assert first_line is errors.first_line


def test_one_line_errors_turns_user_errors_into_exit_2(capsys):
    parser = argparse.ArgumentParser(prog="convmixer-x")
    for err in (OSError("no such file: a.png\nmore"), KeyError("missing")):
        with pytest.raises(SystemExit) as exit_info, one_line_errors(parser, KeyError):
            raise err
        assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "convmixer-x: error: no such file: a.png",
        "convmixer-x: error: 'missing'",
    ]
    # Anything else is a bug: it keeps its traceback.
    with pytest.raises(RuntimeError, match="a bug"), one_line_errors(parser):
        raise RuntimeError("a bug")


def test_emit_json_writes_the_file_then_stdout(tmp_path, capsys):
    emit_json({"top1": float("nan")}, tmp_path / "report.json")
    out = capsys.readouterr().out
    assert json.loads(out) == {"top1": None}
    assert (tmp_path / "report.json").read_text() == out
    # A path that cannot be written fails before anything reaches stdout.
    with pytest.raises(OSError):
        emit_json({"top1": 0.5}, tmp_path / "missing" / "report.json")
    assert capsys.readouterr().out == ""


def test_load_main_refuses_an_unknown_backend_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("KERAS_BACKEND", "nope")
    with pytest.raises(SystemExit) as exit_info:
        load_main("keras_convmixer.cli.train", "/somewhere/scripts/train.py")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "train.py: error: KERAS_BACKEND='nope' is not a Keras backend: use tensorflow, jax or torch\n"
    )


def test_load_main_names_a_missing_module_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_main("keras_convmixer.no_such_module", "x.py")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "x.py: error: No module named 'keras_convmixer.no_such_module'\n"


@pytest.mark.parametrize("text, value", [("1", 1), ("64", 64)])
def test_positive_int_accepts(text, value):
    assert positive_int(text) == value


@pytest.mark.parametrize("text", ["0", "-3", "2.5", "x"])
def test_positive_int_names_the_value(text):
    with pytest.raises(argparse.ArgumentTypeError, match=f"positive integer, got '{text}'"):
        positive_int(text)


@pytest.fixture
def package_logger():
    logger = logging.getLogger("keras_convmixer")
    saved = (list(logger.handlers), logger.level)
    yield logger
    logger.handlers[:], logger.level = saved


def test_setup_logging_sends_package_info_to_the_current_stderr_once(package_logger, capsys, monkeypatch):
    setup_logging()
    setup_logging()  # a second call must not print each line twice
    logging.getLogger("keras_convmixer.evaluation").info("Evaluated %d/%d batches.", 3, 10)
    logging.getLogger("some_other_library").info("not ours")
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "INFO Evaluated 3/10 batches.\n"

    # The handler writes to whatever sys.stderr is now, not the stream it was created with.
    class Sink:
        text = ""

        def write(self, s):
            Sink.text += s

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Sink())
    logging.getLogger("keras_convmixer.data").warning("skipped %d files", 2)
    assert Sink.text == "WARNING skipped 2 files\n"


def test_setup_logging_keeps_records_reaching_a_root_handler(package_logger, caplog):
    setup_logging()
    with caplog.at_level(logging.INFO):
        logging.getLogger("keras_convmixer.prediction").info("hello")
    assert [r.getMessage() for r in caplog.records] == ["hello"]


def test_tensorflow_loads_without_its_native_noise_once_quieted(tmp_path):
    pytest.importorskip("tensorflow")
    # Imported after quiet_frameworks(), as a command's tf.data or SavedModel import would: nothing reaches stderr
    # (a bare import prints oneDNN, CUDA-probe and absl lines there, and a cuInit error on a machine with no GPU).
    code = (
        "from keras_convmixer.cli.common import quiet_frameworks; quiet_frameworks(); "
        "import tensorflow as tf; tf.constant(1.0) + 1; print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    assert proc.stderr == ""
