"""Throughput of ConvMixer and of the depthwise op, for each ``depthwise_impl``.

Every measurement is a dict (``scripts/benchmark.py`` prints one JSON line each).
Timings are medians over repeated steps after warm-up steps, synchronised by
reading results back to the host (model) or by each backend's own wait (op).
"""

import platform
import statistics
import time

import keras
import numpy as np

from keras_convmixer.models import MODEL_CONFIGS, ConvMixer, canonical_name
from keras_convmixer.ops.depthwise import _platform, depthwise_conv2d, fast_path_unavailable_reason

PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
BENCH_IMPLS = ("keras", "xla", "fast")
MEASUREMENTS = ("op", "train", "inference")


def default_impls():
    """Every implementation worth timing here: Pallas's CPU interpreter is a test path, not a contender."""
    impls = ["keras", "xla"]
    if keras.backend.backend() == "jax" and _platform() == "gpu":
        impls.append("fast")
    return impls


def device_description():
    """The device the backend computes on, in words (the JSON lines carry it)."""
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


def bench_model(config, impl, *, batch_size, image_size, precision, steps, warmup, measurements=("train", "inference"),
                seed=0):
    """Training and/or inference images/s of one model built with ``depthwise_impl=impl``: one dict each."""
    keras.mixed_precision.set_dtype_policy(PRECISIONS[precision])
    try:
        keras.utils.set_random_seed(seed)
        model = ConvMixer(
            **config,
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


def _op_runner(impl, x, kernel, bias, backward):
    """A no-argument callable that runs the op (and its backward) once and waits for it."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        def loss(x, kernel, bias):
            return jnp.sum(depthwise_conv2d(x, kernel, bias, impl=impl).astype(jnp.float32))

        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)) if backward else
                     lambda x, k, b: depthwise_conv2d(x, k, b, impl=impl))
        return lambda: jax.block_until_ready(fn(x, kernel, bias))
    if backend == "torch":
        import torch

        def run():
            tensors = [t.detach().requires_grad_(backward) for t in (x, kernel, bias)]
            out = depthwise_conv2d(*tensors, impl=impl)
            if backward:
                out.float().sum().backward()
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        return run
    import tensorflow as tf

    # As Keras's trainer with jit_compile="auto": XLA only where there is a non-CPU device (on CPU,
    # TensorFlow's own depthwise kernel is what training runs).
    accelerated = any(device.device_type != "CPU" for device in tf.config.list_physical_devices())

    @tf.function(jit_compile=accelerated)
    def fn(x, kernel, bias):
        if not backward:
            return depthwise_conv2d(x, kernel, bias, impl=impl)
        with tf.GradientTape() as tape:
            tape.watch([x, kernel, bias])
            out = tf.reduce_sum(tf.cast(depthwise_conv2d(x, kernel, bias, impl=impl), tf.float32))
        return tape.gradient(out, [x, kernel, bias])

    return lambda: [t.numpy() for t in tf.nest.flatten(fn(x, kernel, bias))]


def op_arrays(*, batch_size, tokens, dim, kernel_size, seed=0):
    """Random float64 NumPy ``x [N, T, T, C]``, ``kernel [k, k, C]``, ``bias [C]`` for the op benchmark."""
    rng = np.random.default_rng(seed)
    # Random data, never zeros: zeros can hide unwritten outputs and time differently.
    return (
        rng.standard_normal((batch_size, tokens, tokens, dim)),
        rng.standard_normal((kernel_size, kernel_size, dim)) / kernel_size,
        rng.standard_normal((dim,)),
    )


def bench_op(impl, *, batch_size, tokens, dim, kernel_size, precision, steps, warmup, seed=0):
    """Forward and forward+backward time of the depthwise op alone: two dicts."""
    dtype = "bfloat16" if precision == "bfloat16" else "float32"
    arrays = op_arrays(batch_size=batch_size, tokens=tokens, dim=dim, kernel_size=kernel_size, seed=seed)
    x, kernel, bias = (keras.ops.convert_to_tensor(a, dtype=dtype) for a in arrays)
    # The op reads x and writes y once: the least memory traffic of the forward pass.
    x_bytes = int(np.prod(x.shape)) * (2 if dtype == "bfloat16" else 4)
    results = []
    for name, backward in (("op_forward", False), ("op_forward_backward", True)):
        seconds = median_seconds(_op_runner(impl, x, kernel, bias, backward), steps, warmup)
        results.append(dict(measurement=name, ms=1e3 * seconds, min_bytes_forward=2 * x_bytes))
    return results


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
    return dict(
        backend=backend or keras.backend.backend(),
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
                section["config"], impl, batch_size=section["batch_size"], image_size=section["image_size"],
                precision=precision, steps=steps, warmup=warmup, measurements=(name,),
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
            label = (f"{record['measurement']} ms (N={record['batch_size']}, {record['tokens']}x{record['tokens']}, "
                     f"C={record['dim']}, k={record['kernel_size']})")
            value = f"{record['ms']:.1f}"
        else:
            label = (f"{record['measurement']} img/s ({record['model']}, {record['image_size']}px, "
                     f"batch {record['batch_size']})")
            value = f"{record['images_per_s']:.2f}"
        rows.setdefault(label, {})[column] = value
    lines = ["| measurement | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, values in rows.items():
        lines.append(f"| {label} | " + " | ".join(values.get(column, "") for column in columns) + " |")
    return "\n".join(lines)
