"""scripts/benchmark.py: argument errors, and the measurements it yields on a tiny model."""

import importlib.util
import json
from pathlib import Path

import keras
import pytest

from keras_convmixer.benchmark import model_config, run_benchmarks

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py"


def _load_script():
    # In-process: a subprocess per case would re-import keras (~20 s each on the CI box).
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--variant", "convmixer_9_9"], "Unknown model"),
        (["--impls", "keras,triton"], "--impls takes"),
        (["--batch-size", "0"], "positive integer"),
        (["--variant", "convmixer_256_8", "--image-size", "33"], "not a multiple of the patch size"),
    ],
)
def test_cli_errors_are_one_line_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _load_script().parse_args(argv)
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(error_lines) == 1 and message in error_lines[0]


def test_cli_defaults_are_the_issue_target():
    args = _load_script().parse_args([])
    assert (args.config["dim"], args.config["kernel_size"], args.image_size // args.config["patch_size"]) == (
        1536, 9, 32
    )
    assert (args.batch_size, args.precision, args.impls) == (64, "bfloat16", ["keras", "fast"])


def test_tiny_run_yields_one_record_per_measurement():
    config = model_config("convmixer_256_8", dim=8, depth=1, kernel_size=3)
    records = list(
        run_benchmarks(
            config, impls=["keras", "fast"] if keras.backend.backend() != "jax" else ["keras"],
            what="all", batch_size=2, image_size=8, precision="float32", steps=1, warmup=0,
        )
    )
    json.dumps(records)  # every record is one JSON line
    measured = {r["measurement"]: r for r in records if r["depthwise_impl"] == "keras"}
    assert set(measured) == {"op_forward", "op_forward_backward", "train", "inference"}
    assert measured["train"]["images_per_s"] > 0 and measured["op_forward"]["ms"] > 0
    assert all(r["backend"] == keras.backend.backend() and r["tokens"] == 4 for r in records)
    if keras.backend.backend() != "jax":
        (skipped,) = [r for r in records if r["depthwise_impl"] == "fast"]
        assert skipped["measurement"] == "skipped" and "needs the JAX backend" in skipped["reason"]
