"""Benchmark the depthwise op and ConvMixer training/inference for every depthwise_impl, next to PyTorch.

Prints one JSON line per measurement, then a Markdown table of them all. In one run:

* the depthwise op alone (``--op-shape``, default k9 (8, 32, 32, 256)): the forward, dx and dkernel
  (+dbias) each alone, their sum, and the forward + backward in one step (y returned with every
  gradient), every backward from a random cotangent (``jax.vjp``; ``torch.autograd.backward`` with a
  random gradient), for every implementation and, when torch is installed, PyTorch's
  ``F.conv2d(groups=C)`` in NCHW and channels_last (dx and dkernel there: ``aten.convolution_backward``);
* training images/s of ``--train-model`` (default ConvMixer-256/8 at 32x32, batch 64);
* inference images/s of ``--infer-model`` (default ConvMixer-1024/20 at 224x224, batch 16);

each for every implementation and for a PyTorch ConvMixer of the same shapes. Timings are medians over
repeated steps after warm-up steps, synchronised by reading results back to the host (model) or by each
backend's own wait (op). The CPU figures of docs/benchmarks.md come from runs such as:

    KERAS_BACKEND=jax python scripts/benchmark.py --what op,train --steps 7 --warmup 2

(benchmarks/gpu_check.py is the prepared GPU run.)

GPU target shapes (bfloat16):

    KERAS_BACKEND=jax python scripts/benchmark.py --precision bfloat16 --op-shape 64,32,1536,9 \\
        --train-model convmixer_1536_20 --infer-model convmixer_1536_20 --infer-batch-size 64 --no-torch

Tiny smoke run:

    KERAS_BACKEND=jax python scripts/benchmark.py --op-shape 2,8,16,9 --dim 16 --depth 1 \\
        --train-image-size 32 --infer-image-size 56 --steps 2 --warmup 1
"""

import argparse
import json
import platform
import statistics
import time

import numpy as np

from keras_convmixer.cli.common import positive_int
from keras_convmixer.presets import ARCHITECTURE_KEYS, MODEL_CONFIGS, canonical_name, list_models

PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
BENCH_IMPLS = ("keras", "xla", "fast")
MEASUREMENTS = ("op", "train", "inference")


# ----------------------------------------------------------------------------- measuring (Keras imported here)


def default_impls():
    """Every implementation worth timing here: Pallas's CPU interpreter is a test path, not a contender."""
    import keras

    from keras_convmixer.ops.depthwise import _platform

    impls = ["keras", "xla"]
    if keras.backend.backend() == "jax" and _platform() == "gpu":
        impls.append("fast")
    return impls


def device_description():
    """The device the backend computes on, in words (the JSON lines carry it)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return f"jax:{device.platform}:{getattr(device, 'device_kind', '')}"
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return f"torch:cuda:{torch.cuda.get_device_name(0)}"
        return f"torch:cpu:{platform.processor() or platform.machine()}"
    return f"{backend}:{platform.processor() or platform.machine()}"


def median_seconds(run, steps, warmup):
    """Median wall time of ``run()`` over ``steps`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def model_config(variant, **overrides):
    """The registry row of ``variant`` with non-None ``overrides`` (dim, depth, kernel_size, ...)."""
    config = dict(MODEL_CONFIGS[canonical_name(variant)])
    config.update({key: value for key, value in overrides.items() if value is not None})
    return config


def bench_model(
    config, impl, *, batch_size, image_size, precision, steps, warmup, measurements=("train", "inference"), seed=0
):
    """Training and/or inference images/s of one model built with ``depthwise_impl=impl``: one dict each."""
    import keras

    from keras_convmixer.models import ConvMixer

    keras.mixed_precision.set_dtype_policy(PRECISIONS[precision])
    try:
        keras.utils.set_random_seed(seed)
        model = ConvMixer(
            **{key: config[key] for key in (*ARCHITECTURE_KEYS, "classes", "mean", "std")},
            input_shape=(image_size, image_size, 3),
            classifier_activation=None,
            depthwise_impl=impl,
        )
        model.compile(
            optimizer=keras.optimizers.AdamW(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        rng = np.random.default_rng(seed)
        images = rng.uniform(0, 255, (batch_size, image_size, image_size, 3)).astype("float32")
        labels = rng.integers(0, config["classes"], batch_size)
        # Both return host values, which waits for the device.
        steps_by_name = {
            "train": lambda: model.train_on_batch(images, labels),
            "inference": lambda: model.predict_on_batch(images),
        }
        seconds = {name: median_seconds(steps_by_name[name], steps, warmup) for name in measurements}
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    return [
        dict(measurement=name, images_per_s=batch_size / seconds[name], step_ms=1e3 * seconds[name])
        for name in measurements
    ]


# The op's passes, each timed on its own: the forward; dx and dkernel (+dbias), each a backward pass
# alone from a random cotangent (neither needs y, so XLA may drop the forward from them); and the
# forward and backward together, y returned with all three gradients: what a training step pays.
OP_PASSES = ("op_forward", "op_dx", "op_dkernel", "op_forward_backward")


def _jax_op_runners(impl, x, kernel, bias, cotangent):
    import jax

    from keras_convmixer.ops.depthwise import depthwise_conv2d

    def op(x, kernel, bias):
        return depthwise_conv2d(x, kernel, bias, impl=impl)

    def forward_backward(x, kernel, bias, cotangent):
        y, pullback = jax.vjp(op, x, kernel, bias)
        return y, pullback(cotangent)

    fns = {
        "op_forward": lambda x, kernel, bias, cotangent: op(x, kernel, bias),
        "op_dx": lambda x, kernel, bias, cotangent: jax.vjp(lambda x: op(x, kernel, bias), x)[1](cotangent),
        "op_dkernel": lambda x, kernel, bias, cotangent: jax.vjp(lambda k, b: op(x, k, b), kernel, bias)[1](cotangent),
        "op_forward_backward": forward_backward,
    }
    args = (x, kernel, bias, cotangent)

    def runner(fn):
        jitted = jax.jit(fn)
        return lambda: jax.block_until_ready(jitted(*args))

    return {name: runner(fn) for name, fn in fns.items()}


def _torch_op_runners(impl, x, kernel, bias, cotangent):
    import torch

    from keras_convmixer.ops.depthwise import depthwise_conv2d

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def forward():
        with torch.no_grad():
            depthwise_conv2d(x, kernel, bias, impl=impl)
        sync()

    def forward_backward():
        tensors = [t.detach().requires_grad_(True) for t in (x, kernel, bias)]
        y = depthwise_conv2d(*tensors, impl=impl)
        torch.autograd.backward(y, cotangent)
        sync()

    return {"op_forward": forward, "op_forward_backward": forward_backward}


def _tf_op_runners(impl, x, kernel, bias, cotangent):
    import tensorflow as tf

    from keras_convmixer.ops.depthwise import depthwise_conv2d

    # As Keras's trainer with jit_compile="auto": XLA only where there is a non-CPU device (on CPU,
    # TensorFlow's own depthwise kernel is what training runs).
    accelerated = any(device.device_type != "CPU" for device in tf.config.list_physical_devices())

    @tf.function(jit_compile=accelerated)
    def forward(x, kernel, bias):
        return depthwise_conv2d(x, kernel, bias, impl=impl)

    @tf.function(jit_compile=accelerated)
    def forward_backward(x, kernel, bias, cotangent):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel, bias])
            y = depthwise_conv2d(x, kernel, bias, impl=impl)
        return y, tape.gradient(y, [x, kernel, bias], output_gradients=cotangent)

    def host(values):
        return [t.numpy() for t in tf.nest.flatten(values)]

    return {
        "op_forward": lambda: host(forward(x, kernel, bias)),
        "op_forward_backward": lambda: host(forward_backward(x, kernel, bias, cotangent)),
    }


def op_runners(impl, x, kernel, bias, cotangent):
    """{measurement: a no-argument callable that runs that pass once and waits for it}. JAX times every
    pass of ``OP_PASSES``; torch and TensorFlow the forward and the forward + backward."""
    import keras

    backend = keras.backend.backend()
    runners = {"jax": _jax_op_runners, "torch": _torch_op_runners}.get(backend, _tf_op_runners)
    return runners(impl, x, kernel, bias, cotangent)


def op_arrays(*, batch_size, tokens, dim, kernel_size, seed=0):
    """Random float64 NumPy ``x [N, T, T, C]``, ``kernel [k, k, C]``, ``bias [C]`` and a cotangent like x."""
    rng = np.random.default_rng(seed)
    # Random data, never zeros: zeros can hide unwritten outputs and time differently, and a constant
    # cotangent (the gradient of a sum) lets XLA fold part of the backward away.
    return (
        rng.standard_normal((batch_size, tokens, tokens, dim)),
        rng.standard_normal((kernel_size, kernel_size, dim)) / kernel_size,
        rng.standard_normal((dim,)),
        rng.standard_normal((batch_size, tokens, tokens, dim)),
    )


def with_pass_sum(results):
    """Append ``op_sum`` (forward + dx + dkernel) when all three were timed."""
    ms = {r["measurement"]: r["ms"] for r in results}
    if all(name in ms for name in ("op_forward", "op_dx", "op_dkernel")):
        results.append(dict(results[0], measurement="op_sum", ms=ms["op_forward"] + ms["op_dx"] + ms["op_dkernel"]))
    return results


def bench_op(impl, *, batch_size, tokens, dim, kernel_size, precision, steps, warmup, seed=0):
    """Time of each pass of the depthwise op alone (``OP_PASSES`` where the backend has them): dicts."""
    import keras

    dtype = "bfloat16" if precision == "bfloat16" else "float32"
    arrays = op_arrays(batch_size=batch_size, tokens=tokens, dim=dim, kernel_size=kernel_size, seed=seed)
    x, kernel, bias, cotangent = (keras.ops.convert_to_tensor(a, dtype=dtype) for a in arrays)
    # The op reads x and writes y once: the least memory traffic of the forward pass.
    x_bytes = int(np.prod(x.shape)) * (2 if dtype == "bfloat16" else 4)
    results = []
    for name, run in op_runners(impl, x, kernel, bias, cotangent).items():
        seconds = median_seconds(run, steps, warmup)
        results.append(dict(measurement=name, ms=1e3 * seconds, min_bytes_forward=2 * x_bytes))
    return with_pass_sum(results)


def _model_fields(config, batch_size, image_size):
    return dict(
        model=f"convmixer_{config['dim']}_{config['depth']}",
        batch_size=batch_size,
        dim=config["dim"],
        depth=config["depth"],
        kernel_size=config["kernel_size"],
        patch_size=config["patch_size"],
        image_size=image_size,
        tokens=image_size // config["patch_size"],
    )


def common_fields(*, precision, steps, warmup, backend=None, device=None):
    """The fields every record carries (the torch reference passes its own backend and device)."""
    if backend is None:
        import keras

        backend = keras.backend.backend()
    return dict(
        backend=backend,
        device=device or device_description(),
        precision=precision,
        steps=steps,
        warmup=warmup,
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def run_benchmarks(*, impls, precision, steps, warmup, op=None, train=None, inference=None):
    """Yield one dict per measurement, for every impl in ``impls``, side by side.

    ``op`` is ``dict(batch_size, tokens, dim, kernel_size)``; ``train`` and ``inference`` are
    ``dict(config, batch_size, image_size)``. A None section is not measured.
    """
    from keras_convmixer.ops.depthwise import fast_path_unavailable_reason

    common = common_fields(precision=precision, steps=steps, warmup=warmup)
    if ":cpu" in common["device"] and "fast" in impls:
        common["note"] = "'fast' runs in Pallas's interpreter on CPU: a test path, not a speed figure"
    for impl in impls:
        base = dict(common, depthwise_impl=impl)
        reason = fast_path_unavailable_reason(impl) if impl in ("fast", "xla") else None
        if reason:
            yield dict(base, measurement="skipped", reason=reason)
            continue
        if op is not None:
            for result in bench_op(impl, precision=precision, steps=steps, warmup=warmup, **op):
                yield dict(base, **op, **result)
        for name, section in (("train", train), ("inference", inference)):
            if section is None:
                continue
            fields = _model_fields(section["config"], section["batch_size"], section["image_size"])
            for result in bench_model(
                section["config"],
                impl,
                batch_size=section["batch_size"],
                image_size=section["image_size"],
                precision=precision,
                steps=steps,
                warmup=warmup,
                measurements=(name,),
            ):
                yield dict(base, **fields, **result)


def summary_table(records):
    """A Markdown table of ``records``: one row per measurement, one column per implementation."""
    columns, rows = [], {}
    for record in records:
        if record["measurement"] == "skipped":
            continue
        column = f"{record['backend']}:{record['depthwise_impl']}"
        if column not in columns:
            columns.append(column)
        if record["measurement"].startswith("op_"):
            label = (
                f"{record['measurement']} ms (N={record['batch_size']}, {record['tokens']}x{record['tokens']}, "
                f"C={record['dim']}, k={record['kernel_size']})"
            )
            value = f"{record['ms']:.1f}"
        else:
            label = (
                f"{record['measurement']} img/s ({record['model']}, {record['image_size']}px, "
                f"batch {record['batch_size']})"
            )
            value = f"{record['images_per_s']:.2f}"
        rows.setdefault(label, {})[column] = value
    lines = ["| measurement | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, values in rows.items():
        lines.append(f"| {label} | " + " | ".join(values.get(column, "") for column in columns) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the PyTorch reference


def torch_op_runners(arrays, *, layout, dtype, device):
    """PyTorch's ``F.conv2d(groups=C)`` on NumPy ``arrays`` (x NHWC, kernel, bias, cotangent) in memory
    format ``layout``: {measurement: callable}, as ``op_runners``. dx and dkernel are
    ``aten.convolution_backward`` alone (odd kernels only: its padding is symmetric)."""
    import torch
    import torch.nn.functional as F

    x, kernel, bias, cotangent = arrays
    k, channels = kernel.shape[0], kernel.shape[-1]

    def nchw(a):
        return torch.tensor(a, dtype=dtype, device=device).permute(0, 3, 1, 2).contiguous(memory_format=layout)

    xt, ct = nchw(x), nchw(cotangent)
    kt = torch.tensor(kernel, dtype=dtype, device=device).permute(2, 0, 1)[:, None].contiguous()
    bt = torch.tensor(bias, dtype=dtype, device=device)

    def sync():
        if xt.is_cuda:
            torch.cuda.synchronize()

    def forward():
        with torch.no_grad():
            F.conv2d(xt, kt, bt, padding="same", groups=channels)
        sync()

    def backward_alone(mask):
        def run():
            torch.ops.aten.convolution_backward(
                ct, xt, kt, [channels], [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], channels, mask
            )
            sync()

        return run

    def forward_backward():
        tensors = [t.detach().requires_grad_(True) for t in (xt, kt, bt)]
        y = F.conv2d(*tensors, padding="same", groups=channels)
        torch.autograd.backward(y, ct)
        sync()

    runners = {"op_forward": forward}
    if k % 2:
        runners.update(op_dx=backward_alone([True, False, False]), op_dkernel=backward_alone([False, True, True]))
    runners["op_forward_backward"] = forward_backward
    return runners


def torch_reference(args):
    """PyTorch records for the same shapes: op in NCHW and channels_last, then the models. On a GPU in
    ``--precision`` (bfloat16: the op in bf16 tensors, the models under autocast, as timm trains them);
    on a CPU in float32."""
    import contextlib

    import torch
    import torch.nn.functional as F

    from benchmarks.torch_convmixer import torch_convmixer

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    bf16 = cuda and args.precision == "bfloat16"
    op_dtype = torch.bfloat16 if bf16 else torch.float32
    device = (
        f"torch:cuda:{torch.cuda.get_device_name(0)}"
        if cuda
        else f"torch:cpu:{platform.processor() or platform.machine()}"
    )
    common = common_fields(
        precision="bfloat16" if bf16 else "float32",
        steps=args.steps,
        warmup=args.warmup,
        backend="pytorch",
        device=device,
    )
    common["torch_threads"] = torch.get_num_threads()

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    layouts = {"pytorch_nchw": torch.contiguous_format, "pytorch_channels_last": torch.channels_last}
    if "op" in args.what:
        shape = args.op_shape
        for name, layout in layouts.items():
            runners = torch_op_runners(op_arrays(**shape), layout=layout, dtype=op_dtype, device=dev)
            results = [
                dict(measurement=measurement, ms=1e3 * median_seconds(run, args.steps, args.warmup))
                for measurement, run in runners.items()
            ]
            for result in with_pass_sum(results):
                yield dict(common, depthwise_impl=name, **result, **shape)
    for section, measurement in (("train", "train"), ("infer", "inference")):
        if measurement not in args.what:
            continue
        spec = getattr(args, section)
        config, batch, size = spec["config"], spec["batch_size"], spec["image_size"]
        rng = np.random.default_rng(0)
        images = torch.tensor(rng.uniform(0, 1, (batch, 3, size, size)), dtype=torch.float32, device=dev)
        labels = torch.tensor(rng.integers(0, config["classes"], batch), device=dev)
        for name, layout in layouts.items():
            torch.manual_seed(0)
            model = torch_convmixer(
                config["dim"],
                config["depth"],
                config["kernel_size"],
                config["patch_size"],
                config["classes"],
                config["activation"],
            ).to(device=dev, memory_format=layout)
            inputs = images.contiguous(memory_format=layout)
            if measurement == "train":
                optimizer = torch.optim.AdamW(model.parameters(), 1e-3)

                def step(model=model, inputs=inputs, optimizer=optimizer, labels=labels):
                    model.train()
                    optimizer.zero_grad()
                    with autocast():
                        loss = F.cross_entropy(model(inputs).float(), labels)
                    loss.backward()
                    optimizer.step()
                    loss.item()
            else:

                def step(model=model, inputs=inputs):
                    model.eval()
                    with torch.inference_mode(), autocast():
                        model(inputs).float().sum().item()

            seconds = median_seconds(step, args.steps, args.warmup)
            yield dict(
                common,
                depthwise_impl=name,
                measurement=measurement,
                **_model_fields(config, batch, size),
                images_per_s=batch / seconds,
                step_ms=1e3 * seconds,
            )


# ----------------------------------------------------------------------------- command line


def op_shape(text):
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected batch,tokens,channels,kernel (4 positive integers), got {text!r}")
    return dict(zip(("batch_size", "tokens", "dim", "kernel_size"), values, strict=True))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--what", default=",".join(MEASUREMENTS), help=f"comma-separated, from: {','.join(MEASUREMENTS)}"
    )
    parser.add_argument(
        "--impls",
        help=f"comma-separated, from: {','.join(BENCH_IMPLS)} (default: all but "
        "'fast' on CPU, where it runs in Pallas's interpreter)",
    )
    parser.add_argument(
        "--op-shape", type=op_shape, default=op_shape("8,32,256,9"), help="batch,tokens,channels,kernel"
    )
    parser.add_argument("--train-model", default="convmixer_256_8", help=f"one of: {', '.join(list_models())}")
    parser.add_argument("--train-batch-size", type=positive_int, default=64)
    parser.add_argument("--train-image-size", type=positive_int, help="default: the model's")
    parser.add_argument("--infer-model", default="convmixer_1024_20", help="as --train-model")
    parser.add_argument("--infer-batch-size", type=positive_int, default=16)
    parser.add_argument("--infer-image-size", type=positive_int, help="default: the model's")
    parser.add_argument("--dim", type=positive_int, help="override both models' width (smoke runs)")
    parser.add_argument("--depth", type=positive_int, help="override both models' depth (smoke runs)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="float32")
    parser.add_argument("--steps", type=positive_int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    return parser


def parse_args(argv=None):
    """Parse and check every flag before Keras is imported; only the default ``--impls`` needs Keras."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.what = [part.strip() for part in args.what.split(",") if part.strip()]
    bad = [part for part in args.what if part not in MEASUREMENTS]
    if bad or not args.what:
        parser.error(f"--what takes a comma-separated list of {', '.join(MEASUREMENTS)}, got {bad or 'nothing'}")
    if args.impls is not None:
        args.impls = [impl.strip() for impl in args.impls.split(",") if impl.strip()]
        bad = [impl for impl in args.impls if impl not in BENCH_IMPLS]
        if bad or not args.impls:
            parser.error(f"--impls takes a comma-separated list of {', '.join(BENCH_IMPLS)}, got {bad or 'nothing'}")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    for section in ("train", "infer"):
        try:
            config = model_config(getattr(args, f"{section}_model"), dim=args.dim, depth=args.depth)
        except ValueError as error:
            parser.error(str(error))
        image_size = getattr(args, f"{section}_image_size") or config["default_size"]
        if image_size % config["patch_size"]:
            parser.error(
                f"--{section}-image-size {image_size} is not a multiple of the patch size {config['patch_size']}"
            )
        setattr(
            args, section, dict(config=config, batch_size=getattr(args, f"{section}_batch_size"), image_size=image_size)
        )
    if args.impls is None:
        args.impls = default_impls()
    return args


def main(argv=None):
    args = parse_args(argv)
    records = []

    def emit(record):
        records.append(record)
        print(json.dumps(record), flush=True)

    start = time.perf_counter()
    for record in run_benchmarks(
        impls=args.impls,
        precision=args.precision,
        steps=args.steps,
        warmup=args.warmup,
        op=args.op_shape if "op" in args.what else None,
        train=args.train if "train" in args.what else None,
        inference=args.infer if "inference" in args.what else None,
    ):
        emit(record)
    if not args.no_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            emit(dict(backend="pytorch", measurement="skipped", reason="torch is not installed"))
        else:
            for record in torch_reference(args):
                emit(record)
    print(f"\n{summary_table(records)}\n\n(total {time.perf_counter() - start:.0f} s)", flush=True)
    return records


if __name__ == "__main__":
    main()
