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
from keras_convmixer.ops.depthwise import depthwise_conv2d, fast_path_unavailable_reason

PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
BENCH_IMPLS = ("keras", "fast")


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


def _median_seconds(run, steps, warmup):
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


def bench_model(config, impl, *, batch_size, image_size, precision, steps, warmup, seed=0):
    """Training and inference images/s of one model built with ``depthwise_impl=impl``: two dicts."""
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
        train = _median_seconds(lambda: model.train_on_batch(images, labels), steps, warmup)
        infer = _median_seconds(lambda: model.predict_on_batch(images), steps, warmup)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    return [
        dict(measurement=name, images_per_s=batch_size / seconds, step_ms=1e3 * seconds)
        for name, seconds in (("train", train), ("inference", infer))
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

    @tf.function(jit_compile=True)
    def fn(x, kernel, bias):
        if not backward:
            return depthwise_conv2d(x, kernel, bias, impl=impl)
        with tf.GradientTape() as tape:
            tape.watch([x, kernel, bias])
            out = tf.reduce_sum(tf.cast(depthwise_conv2d(x, kernel, bias, impl=impl), tf.float32))
        return tape.gradient(out, [x, kernel, bias])

    return lambda: [t.numpy() for t in tf.nest.flatten(fn(x, kernel, bias))]


def bench_op(impl, *, batch_size, tokens, dim, kernel_size, precision, steps, warmup, seed=0):
    """Forward and forward+backward time of the depthwise op alone: two dicts."""
    dtype = "bfloat16" if precision == "bfloat16" else "float32"
    rng = np.random.default_rng(seed)
    # Random data, never zeros: zeros can hide unwritten outputs and time differently.
    arrays = (
        rng.standard_normal((batch_size, tokens, tokens, dim)),
        rng.standard_normal((kernel_size, kernel_size, dim)) / kernel_size,
        rng.standard_normal((dim,)),
    )
    x, kernel, bias = (keras.ops.convert_to_tensor(a, dtype=dtype) for a in arrays)
    # The op reads x and writes y once: the least memory traffic of the forward pass.
    x_bytes = int(np.prod(x.shape)) * (2 if dtype == "bfloat16" else 4)
    results = []
    for name, backward in (("op_forward", False), ("op_forward_backward", True)):
        seconds = _median_seconds(_op_runner(impl, x, kernel, bias, backward), steps, warmup)
        results.append(dict(measurement=name, ms=1e3 * seconds, min_bytes_forward=2 * x_bytes))
    return results


def run_benchmarks(config, *, impls, what, batch_size, image_size, precision, steps, warmup):
    """Yield one dict per measurement, for every impl in ``impls``, side by side."""
    tokens = image_size // config["patch_size"]
    common = dict(
        backend=keras.backend.backend(),
        device=device_description(),
        precision=precision,
        batch_size=batch_size,
        dim=config["dim"],
        depth=config["depth"],
        kernel_size=config["kernel_size"],
        patch_size=config["patch_size"],
        image_size=image_size,
        tokens=tokens,
        steps=steps,
        warmup=warmup,
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    if ":cpu" in common["device"]:
        common["note"] = "CPU figures are not the speed target; 'fast' runs in Pallas's interpreter on CPU"
    for impl in impls:
        base = dict(common, depthwise_impl=impl)
        reason = fast_path_unavailable_reason() if impl == "fast" else None
        if reason:
            yield dict(base, measurement="skipped", reason=reason)
            continue
        if what in ("all", "op"):
            for result in bench_op(
                impl, batch_size=batch_size, tokens=tokens, dim=config["dim"],
                kernel_size=config["kernel_size"], precision=precision, steps=steps, warmup=warmup,
            ):
                yield dict(base, **result)
        if what in ("all", "model"):
            for result in bench_model(
                config, impl, batch_size=batch_size, image_size=image_size,
                precision=precision, steps=steps, warmup=warmup,
            ):
                yield dict(base, **result)
