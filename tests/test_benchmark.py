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
    every_pass = {"op_forward", "op_dx", "op_dkernel", "op_sum", "op_forward_backward", "train", "inference"}
    # JAX times each pass alone; torch and TensorFlow the forward and the forward + backward.
    expected = every_pass if BACKEND == "jax" else {"op_forward", "op_forward_backward", "train", "inference"}
    assert {m for impl, m in measured if impl == "keras"} == expected
    if BACKEND == "jax":
        assert {m for impl, m in measured if impl == "xla"} == expected
        parts = [measured["xla", name]["ms"] for name in ("op_forward", "op_dx", "op_dkernel")]
        assert measured["xla", "op_sum"]["ms"] == pytest.approx(sum(parts))
    else:
        skipped = measured["xla", "skipped"]
        assert "needs the JAX backend" in skipped["reason"]
    assert measured["keras", "train"]["images_per_s"] > 0 and measured["keras", "op_forward"]["ms"] > 0
    assert measured["keras", "train"]["tokens"] == 4 and measured["keras", "inference"]["tokens"] == 2
    assert measured["keras", "op_forward"]["tokens"] == 6

    reference = {(r["depthwise_impl"], r["measurement"]) for r in records if r["backend"] == "pytorch"}
    if torch_installed:
        layouts = ("pytorch_nchw", "pytorch_channels_last")
        assert reference == {(layout, m) for layout in layouts for m in every_pass}  # k5: odd, every pass
    # The closing table has a column per implementation and a row per measurement.
    table = [line for line in printed.splitlines() if line.startswith("|")]
    header = table[0]
    assert f"{BACKEND}:keras" in header and (not torch_installed or "pytorch:pytorch_channels_last" in header)
    assert len(table) == 2 + (len(every_pass) if BACKEND == "jax" or torch_installed else len(expected))


@pytest.mark.skipif(BACKEND != "jax", reason="the JAX op runners")
def test_jax_op_passes_use_the_random_cotangent_and_return_y():
    """The honest harness: every backward pass is a jax.vjp from the given random cotangent (never the
    gradient of a sum, whose constant cotangent lets XLA drop the forward and fold the backward), and
    the forward + backward step returns y. Checked by value against lax's grouped convolution."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    arrays = benchmark.op_arrays(batch_size=2, tokens=5, dim=3, kernel_size=3, seed=1)
    assert np.std(arrays[3]) > 0.5  # the cotangent is random, not a constant
    x, kernel, bias, cotangent = (jnp.asarray(a, jnp.float32) for a in arrays)

    def reference(x, kernel, bias):
        y = lax.conv_general_dilated(
            x,
            kernel[:, :, None, :],
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=3,
            precision=lax.Precision.HIGHEST,
        )
        return y + bias

    y, pullback = jax.vjp(reference, x, kernel, bias)
    dx, dkernel, dbias = pullback(cotangent)
    runners = benchmark.op_runners("xla", x, kernel, bias, cotangent)
    assert tuple(runners) == benchmark.OP_PASSES
    got_y, (got_dx, got_dk, got_db) = runners["op_forward_backward"]()
    for got, want in ((got_y, y), (got_dx, dx), (got_dk, dkernel), (got_db, dbias)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(runners["op_forward"](), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(runners["op_dx"]()[0], dx, rtol=1e-5, atol=1e-5)
    got_dk, got_db = runners["op_dkernel"]()
    np.testing.assert_allclose(got_dk, dkernel, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_db, dbias, rtol=1e-5, atol=1e-5)


def test_benchmark_dataset_counts_images_after_the_warmup_batches():
    seconds = iter(range(100))  # each read of the clock is one second later
    batches = [(np.zeros((n, 2)), None) for n in (4, 4, 4, 4, 2)]
    result = benchmark_dataset(batches, max_batches=4, warmup_batches=2, clock=lambda: float(next(seconds)))
    # Clock reads: start 0, after batch 2: 1, end: 2. Batches 3 and 4 (8 images) count for the steady rate.
    assert result == {"images": 16, "seconds": 2.0, "images_per_s": 8.0}
    seconds = iter(range(100))
    everything = benchmark_dataset(batches, warmup_batches=2, clock=lambda: float(next(seconds)))
    assert everything["images"] == 18 and everything["images_per_s"] == 10.0


@pytest.mark.skipif(BACKEND != "jax", reason="benchmarks/gpu_check.py measures the JAX paths")
def test_gpu_check_dry_run_writes_json_lines_without_tensorflow(tmp_path, monkeypatch):
    """The prepared GPU script's dry run (tiny shapes, Pallas's interpreter, TensorFlow's import
    blocked as on the GPU machine), on its cheap sections (the whole dry run takes minutes): every line
    is JSON, the sweep timed the new kernel, PyTorch's eager model ran, and a passed deadline skips
    the rest instead of running it."""
    from benchmarks import gpu_check

    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(gpu_check.sys, "meta_path", list(gpu_check.sys.meta_path))  # undo the import block
    out = tmp_path / "check.jsonl"
    gpu_check.run(gpu_check.parse_args(["--dry-run", "--sections", "env,sweep,torch", "--out", str(out)]))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    by_section = {}
    for line in lines:
        by_section.setdefault(line["section"], []).append(line)
    # (Whether TensorFlow was imported says nothing here: this test process may have imported it already.)
    assert by_section["env"][0]["device_kind"] == "cpu" and by_section["env"][0]["versions"]["jax"]
    timed = [line for line in by_section["sweep"] if "ms" in line]
    assert timed and all(line["ms"]["forward_backward"] > 0 for line in timed)
    assert by_section["sweep"][-1]["best"] == gpu_check.TINY_SWEEP[0]
    assert {line["measurement"] for line in by_section["torch"]} == {"train", "inference"}
    assert by_section["done"]

    late = tmp_path / "late.jsonl"
    gpu_check.run(gpu_check.parse_args(["--dry-run", "--sections", "env,op", "--deadline-s", "0", "--out", str(late)]))
    skipped = [json.loads(line) for line in late.read_text().splitlines()]
    assert [line.get("skipped") for line in skipped[:2]] == ["deadline", "deadline"]


def test_gpu_check_sweep_is_small_and_starts_at_the_default():
    from benchmarks import gpu_check
    from keras_convmixer.ops.depthwise_pallas import BLOCK_KEYS
    from keras_convmixer.ops.tuning import DEFAULT_PALLAS_BLOCKS

    assert len(gpu_check.SWEEP) <= 12 and gpu_check.SWEEP[0] == DEFAULT_PALLAS_BLOCKS
    for config in gpu_check.SWEEP:
        assert set(config) == set(BLOCK_KEYS)
        assert all(config[key] & (config[key] - 1) == 0 for key in ("block_p", "block_c", "num_warps"))
