"""benchmarks/benchmark.py (``make bench``): argument errors, defaults, and what one tiny run prints.

In-process: a subprocess per case would re-import keras (~20 s each on the CI box)."""

import importlib.util
import json

import keras
import numpy as np
import pytest

from benchmarks import benchmark
from benchmarks.benchmark_input import benchmark_dataset

BACKEND = keras.backend.backend()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--train-model", "convmixer_9_9"], "Unknown model"),
        (["--impls", "keras,triton"], "--impls takes"),
        (["--what", "op,speed"], "--what takes"),
        (["--train-batch-size", "0"], "positive integer"),
        (["--op-shape", "8,32,256"], "batch,tokens,channels,kernel"),
        (["--infer-model", "convmixer_256_8", "--infer-image-size", "33"], "not a multiple of the patch size"),
    ],
)
def test_cli_errors_are_one_line_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(argv)
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(error_lines) == 1 and message in error_lines[0]


def test_cli_defaults_are_the_cpu_comparison():
    args = benchmark.parse_args([])
    assert args.op_shape == dict(batch_size=8, tokens=32, dim=256, kernel_size=9)
    train, infer = args.train, args.infer
    assert (train["config"]["dim"], train["config"]["depth"], train["batch_size"], train["image_size"]) == (
        256,
        8,
        64,
        32,
    )
    assert (infer["config"]["dim"], infer["config"]["depth"], infer["batch_size"], infer["image_size"]) == (
        1024,
        20,
        16,
        224,
    )
    assert args.precision == "float32" and args.what == ["op", "train", "inference"]
    # Pallas's CPU interpreter is not timed by default; "xla" is, wherever the backend is.
    assert args.impls[:2] == ["keras", "xla"]


def test_tiny_run_prints_every_measurement_and_a_table(capsys):
    torch_installed = importlib.util.find_spec("torch") is not None
    argv = [
        "--op-shape",
        "2,6,8,5",
        "--dim",
        "8",
        "--depth",
        "1",
        "--train-batch-size",
        "2",
        "--infer-batch-size",
        "2",
        "--train-image-size",
        "8",
        "--infer-image-size",
        "28",
        "--steps",
        "1",
        "--warmup",
        "0",
    ]
    records = benchmark.main(argv)
    printed = capsys.readouterr().out
    json_lines = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
    assert json_lines == records

    ours = [r for r in records if r["backend"] == BACKEND]
    measured = {(r["depthwise_impl"], r["measurement"]): r for r in ours}
    expected = {"op_forward", "op_forward_backward", "train", "inference"}
    assert {m for impl, m in measured if impl == "keras"} == expected
    if BACKEND == "jax":
        assert {m for impl, m in measured if impl == "xla"} == expected
    else:
        skipped = measured["xla", "skipped"]
        assert "needs the JAX backend" in skipped["reason"]
    assert measured["keras", "train"]["images_per_s"] > 0 and measured["keras", "op_forward"]["ms"] > 0
    assert measured["keras", "train"]["tokens"] == 4 and measured["keras", "inference"]["tokens"] == 2
    assert measured["keras", "op_forward"]["tokens"] == 6

    reference = {(r["depthwise_impl"], r["measurement"]) for r in records if r["backend"] == "pytorch"}
    if torch_installed:
        assert reference == {(layout, m) for layout in ("pytorch_nchw", "pytorch_channels_last") for m in expected}
    # The closing table has a column per implementation and a row per measurement.
    table = [line for line in printed.splitlines() if line.startswith("|")]
    header = table[0]
    assert f"{BACKEND}:keras" in header and (not torch_installed or "pytorch:pytorch_channels_last" in header)
    assert len(table) == 2 + 4


def test_benchmark_dataset_counts_images_after_the_warmup_batches():
    seconds = iter(range(100))  # each read of the clock is one second later
    batches = [(np.zeros((n, 2)), None) for n in (4, 4, 4, 4, 2)]
    result = benchmark_dataset(batches, max_batches=4, warmup_batches=2, clock=lambda: float(next(seconds)))
    # Clock reads: start 0, after batch 2: 1, end: 2. Batches 3 and 4 (8 images) count for the steady rate.
    assert result == {"images": 16, "seconds": 2.0, "images_per_s": 8.0}
    seconds = iter(range(100))
    everything = benchmark_dataset(batches, warmup_batches=2, clock=lambda: float(next(seconds)))
    assert everything["images"] == 18 and everything["images_per_s"] == 10.0
