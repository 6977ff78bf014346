"""One prepared GPU run (issue 20): correctness, a block-size sweep, the depthwise op and ConvMixer-1536/20,
beside PyTorch on the same card, in one call of at most 8 minutes.

Writes one JSON line per result as it goes (to ``$OUT/gpu_check.jsonl`` when ``OUT`` is set, else
``--out``), so a run cut off by its deadline still reports what it measured. Sections, in order of
priority, each skipped once ``--deadline-s`` has passed and each recording its own error without
stopping the others:

1. ``env``: device kind, versions.
2. ``check``: forward, dx, dkernel, dbias of every implementation at the target shape on fresh random
   inputs against a float64 NumPy reference on a random subset of channels (||got - ref|| / ||ref||).
3. ``sweep``: the new kernel's forward + backward for at most 12 block configurations.
4. ``op``: forward, dx, dkernel (each alone, from a random cotangent) and forward + backward (y returned)
   for ``keras``, ``xla``, the first Pallas kernel (``depthwise_pallas_v1``) and the new one (default and
   best swept blocks), then PyTorch ``F.conv2d(groups=C)`` NCHW and channels_last.
5. ``torch``: the timm-style ConvMixer of ``benchmarks/torch_convmixer.py``, eager NCHW under bf16
   autocast: train step and inference.
6. ``model``: ConvMixer-1536/20 in Keras (``mixed_bfloat16``) for ``fast`` and ``keras``: a jitted
   train step on device-resident data, ``fit``, and jitted inference.
7. ``torch_compile``: the same PyTorch model under ``torch.compile`` (last: it compiles for minutes).

Timing: a synchronise (``block_until_ready``; ``torch.cuda.synchronize``) around each call, after
warm-up calls, median of the timed calls. Never on zeros.

The GPU machine has JAX, PyTorch, Triton and timm but no TensorFlow and no Keras; carry Keras's wheels
(Python 3.12 there), from the repository root here::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl keras==3.15.1 namex optree

and run (carry ``.whl``)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD \\
        && KERAS_BACKEND=jax PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --deadline-s 450

Dry run on a CPU (tiny shapes, Pallas's interpreter, TensorFlow blocked as on the GPU machine)::

    KERAS_BACKEND=jax python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check.jsonl
"""

import argparse
import importlib.abc
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SECTIONS = ("env", "check", "sweep", "op", "torch", "model", "torch_compile")
# At most 12 configurations; the first is DEFAULT_PALLAS_BLOCKS (keras_convmixer/ops/tuning.py).
SWEEP = [
    dict(block_p=bp, block_c=bc, num_warps=nw, num_stages=2, images_per_group=ig)
    for bp, bc, nw, ig in (
        (128, 32, 4, 8),
        (64, 32, 4, 8),
        (256, 32, 8, 8),
        (128, 64, 4, 8),
        (128, 64, 8, 8),
        (64, 64, 4, 8),
        (256, 64, 8, 8),
        (32, 128, 4, 8),
        (64, 128, 8, 8),
        (128, 32, 4, 4),
        (128, 32, 4, 16),
        (128, 32, 8, 8),
    )
]
FULL = dict(op=(64, 32, 32, 1536, 9), model=dict(dim=1536, depth=20, kernel_size=9, patch_size=7, size=224, batch=64))
TINY = dict(op=(2, 5, 6, 12, 3), model=dict(dim=8, depth=1, kernel_size=3, patch_size=4, size=16, batch=2))
TINY_SWEEP = [dict(block_p=16, block_c=4, num_warps=4, num_stages=2, images_per_group=2)]


class Report:
    """JSON lines, flushed and synced after each, with the time since the start."""

    def __init__(self, path, deadline_s):
        self.path, self.start, self.deadline_s = path, time.perf_counter(), deadline_s
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115  (kept open for the run)

    def elapsed(self):
        return time.perf_counter() - self.start

    def left(self):
        return self.deadline_s - self.elapsed()

    def emit(self, section, **fields):
        line = json.dumps(dict(section=section, t_s=round(self.elapsed(), 1), **fields), default=str)
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())


def median_ms(run, steps, warmup):
    for _ in range(warmup):
        run()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


# ----------------------------------------------------------------------------- the op


def op_impls(blocks):
    """{name: fn(x, kernel, bias)}: every implementation of the op, the Pallas ones with fixed blocks."""
    from benchmarks.depthwise_pallas_v1 import depthwise_conv2d_pallas as v1
    from keras_convmixer.ops.depthwise_pallas import depthwise_conv2d_pallas
    from keras_convmixer.ops.depthwise_xla import depthwise_conv2d_xla

    impls = {"keras": lambda x, w, b: _keras_op(x, w, b), "xla": depthwise_conv2d_xla, "pallas_v1": v1}
    for name, config in blocks.items():
        impls[name] = lambda x, w, b, config=config: depthwise_conv2d_pallas(x, w, b, blocks=config)
    return impls


def _keras_op(x, kernel, bias):
    import keras

    y = keras.ops.depthwise_conv(x, kernel[..., None], strides=1, padding="same", data_format="channels_last")
    return y + bias


def op_passes(fn, arrays):
    """{pass: no-argument callable}, as benchmarks/benchmark.py times them: each backward from the random
    cotangent, forward + backward returning y."""
    import jax

    x, kernel, bias, cotangent = arrays

    def both(x, kernel, bias, cotangent):
        y, pullback = jax.vjp(fn, x, kernel, bias)
        return y, pullback(cotangent)

    fns = {
        "forward": lambda x, kernel, bias, cotangent: fn(x, kernel, bias),
        "dx": lambda x, kernel, bias, cotangent: jax.vjp(lambda x: fn(x, kernel, bias), x)[1](cotangent),
        "dkernel": lambda x, kernel, bias, cotangent: jax.vjp(lambda k, b: fn(x, k, b), kernel, bias)[1](cotangent),
        "forward_backward": both,
    }

    def runner(f):
        jitted = jax.jit(f)
        return lambda: jax.block_until_ready(jitted(*arrays))

    return {name: runner(f) for name, f in fns.items()}


def random_op_arrays(shape, dtype, seed):
    """Fresh random NumPy float64 x, kernel, bias, cotangent, rounded to ``dtype`` once."""
    import ml_dtypes

    n, h, w, c, k = shape
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s) for s in ((n, h, w, c), (k, k, c), (c,), (n, h, w, c))]
    arrays[1] /= k
    cast = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    return [a.astype(cast).astype(np.float64) for a in arrays]


def float64_reference(arrays, channels):
    """y, dx, dkernel, dbias of the depthwise "same" convolution on ``channels`` only, in float64 NumPy."""
    x, kernel, bias, cotangent = (a[..., channels] for a in arrays)
    k = kernel.shape[0]
    before, after = (k - 1) // 2, k // 2
    _, h, w, _ = x.shape
    pad = ((0, 0), (before, after), (before, after), (0, 0))
    xp, ctp = np.pad(x, pad), np.pad(cotangent, ((0, 0), (after, before), (after, before), (0, 0)))
    y = np.broadcast_to(bias, x.shape).copy()
    dx = np.zeros_like(x)
    dkernel = np.zeros_like(kernel)
    for i in range(k):
        for j in range(k):
            y += xp[:, i : i + h, j : j + w] * kernel[i, j]
            dx += ctp[:, i : i + h, j : j + w] * kernel[k - 1 - i, k - 1 - j]
            dkernel[i, j] = np.einsum("nhwc,nhwc->c", xp[:, i : i + h, j : j + w], cotangent)
    return y, dx, dkernel, cotangent.sum(axis=(0, 1, 2))


def check_section(report, shape, impls, seed=1):
    import jax.numpy as jnp

    for dtype in ("bfloat16", "float32"):
        arrays = random_op_arrays(shape, dtype, seed)
        seed += 1
        channels = np.sort(np.random.default_rng(seed).choice(shape[3], min(16, shape[3]), replace=False))
        want = float64_reference(arrays, channels)
        device_arrays = [jnp.asarray(a, dtype) for a in arrays]
        for name, fn in impls.items():
            if report.left() <= 0:
                return
            try:
                y, (dx, dk, db) = op_passes(fn, device_arrays)["forward_backward"]()
                got = [np.asarray(a, np.float64)[..., channels] for a in (y, dx, dk, db)]
                errors = {
                    part: float(np.linalg.norm(g - w) / np.linalg.norm(w))
                    for part, g, w in zip(("y", "dx", "dkernel", "dbias"), got, want, strict=True)
                }
                bound = 1e-5 if dtype == "float32" else 1e-2
                ok = all(np.isfinite(e) and e <= bound for e in errors.values())
                report.emit("check", impl=name, dtype=dtype, shape=shape, rel_error=errors, bound=bound, ok=ok)
            except Exception as error:  # noqa: BLE001  (one implementation's failure must not end the run)
                report.emit("check", impl=name, dtype=dtype, error=f"{type(error).__name__}: {error}"[:2000])


def time_op(report, section, name, fn, arrays, steps, warmup, passes=None, **fields):
    try:
        runners = op_passes(fn, arrays)
        ms = {p: median_ms(run, steps, warmup) for p, run in runners.items() if passes is None or p in passes}
        if {"forward", "dx", "dkernel"} <= set(ms):
            ms["sum"] = ms["forward"] + ms["dx"] + ms["dkernel"]
        report.emit(section, impl=name, ms=ms, **fields)
        return ms
    except Exception as error:  # noqa: BLE001
        report.emit(section, impl=name, error=f"{type(error).__name__}: {error}"[:2000], **fields)
        return None


def sweep_section(report, shape, configs, steps, warmup):
    """Forward + backward of the new kernel per block configuration; returns the fastest one."""
    from keras_convmixer.ops.depthwise_pallas import depthwise_conv2d_pallas

    arrays = [a for a in _device_arrays(shape, "bfloat16", seed=10)]
    best, best_ms = configs[0], float("inf")
    for config in configs:
        if report.left() <= 0:
            break
        ms = time_op(
            report,
            "sweep",
            "fast",
            lambda x, w, b, config=config: depthwise_conv2d_pallas(x, w, b, blocks=config),
            arrays,
            steps,
            warmup,
            passes=("forward", "forward_backward"),
            blocks=config,
            shape=shape,
        )
        if ms and ms["forward_backward"] < best_ms:
            best, best_ms = config, ms["forward_backward"]
    report.emit("sweep", best=best, forward_backward_ms=best_ms)
    return best


def _device_arrays(shape, dtype, seed):
    import jax.numpy as jnp

    return [jnp.asarray(a, dtype) for a in random_op_arrays(shape, dtype, seed)]


def op_section(report, shape, impls, steps, warmup, torch_device):
    arrays = _device_arrays(shape, "bfloat16", seed=20)
    for name, fn in impls.items():
        if report.left() <= 0:
            return
        time_op(report, "op", name, fn, arrays, steps, warmup, dtype="bfloat16", shape=shape)
    import torch

    from benchmarks.benchmark import torch_op_runners

    numpy_arrays = random_op_arrays(shape, "bfloat16", seed=20)
    for name, layout in (("pytorch_nchw", torch.contiguous_format), ("pytorch_channels_last", torch.channels_last)):
        runners = torch_op_runners(numpy_arrays, layout=layout, dtype=torch.bfloat16, device=torch_device)
        ms = {p.removeprefix("op_"): median_ms(run, steps, warmup) for p, run in runners.items()}
        if {"forward", "dx", "dkernel"} <= set(ms):
            ms["sum"] = ms["forward"] + ms["dx"] + ms["dkernel"]
        report.emit("op", impl=name, ms=ms, dtype="bfloat16", shape=shape)


# ----------------------------------------------------------------------------- whole models


def torch_model_section(report, section, cfg, device, steps, warmup, compiled):
    import torch
    import torch.nn.functional as F

    from benchmarks.torch_convmixer import torch_convmixer

    torch.manual_seed(0)
    model = torch_convmixer(cfg["dim"], cfg["depth"], cfg["kernel_size"], cfg["patch_size"], 1000).to(device)
    if compiled:
        # On the CPU dry run, the eager backend checks the code path without minutes of Inductor.
        model = torch.compile(model, backend="inductor" if device.type == "cuda" else "eager")
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], device=device)
    labels = torch.randint(0, 1000, (cfg["batch"],), device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), labels)
        loss.backward()
        optimizer.step()
        sync()

    def infer():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            model(x)
        sync()

    for name, run in (("train", train), ("inference", infer)):
        model.train(name == "train")
        ms = median_ms(run, steps, warmup)
        report.emit(
            section,
            impl="torch_compile" if compiled else "torch_eager",
            measurement=name,
            step_ms=ms,
            images_per_s=1e3 * cfg["batch"] / ms,
            **cfg,
        )


def keras_model_section(report, cfg, impl, steps, warmup, fit_batches):
    """ConvMixer in Keras under mixed_bfloat16: jitted train step on device-resident data, fit, inference."""
    import functools

    import jax
    import keras

    from keras_convmixer.models import ConvMixer

    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    keras.utils.set_random_seed(0)
    shape = dict(classes=1000, input_shape=(cfg["size"], cfg["size"], 3), classifier_activation=None)
    model = ConvMixer(cfg["dim"], cfg["depth"], cfg["kernel_size"], cfg["patch_size"], depthwise_impl=impl, **shape)
    loss_object = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.AdamW(1e-3)
    optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (cfg["batch"] * fit_batches, cfg["size"], cfg["size"], 3)).astype("float32")
    labels = rng.integers(0, 1000, len(images))
    x, y = jax.device_put(images[: cfg["batch"]]), jax.device_put(labels[: cfg["batch"]])

    def loss_fn(trainable, non_trainable, x, y):
        logits, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
        return loss_object(y, logits), non_trainable

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, x, y):
        trainable, non_trainable, opt = state
        (loss, non_trainable), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, non_trainable, x, y)
        trainable, opt = optimizer.stateless_apply(opt, grads, trainable)
        return (trainable, non_trainable, opt), loss

    # Copies: the step donates its state, and fit() below still needs the model's own variables.
    values = lambda variables: [jax.numpy.copy(v.value) for v in variables]  # noqa: E731
    state = [(values(model.trainable_variables), values(model.non_trainable_variables), values(optimizer.variables))]

    def train():
        state[0], loss = step(state[0], x, y)
        jax.block_until_ready(loss)

    infer_fn = jax.jit(lambda t, n, x: model.stateless_call(t, n, x, training=False)[0])
    infer = lambda: jax.block_until_ready(infer_fn(state[0][0], state[0][1], x))  # noqa: E731
    for name, run in (("train_step", train), ("inference", infer)):
        ms = median_ms(run, steps, warmup)
        report.emit("model", impl=impl, measurement=name, step_ms=ms, images_per_s=1e3 * cfg["batch"] / ms, **cfg)
    if report.left() > 0:
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=loss_object, jit_compile=True)
        model.fit(images, labels, batch_size=cfg["batch"], epochs=1, verbose=0)  # compiles
        start = time.perf_counter()
        model.fit(images, labels, batch_size=cfg["batch"], epochs=1, verbose=0)
        seconds = time.perf_counter() - start
        report.emit(
            "model",
            impl=impl,
            measurement="fit",
            images=len(images),
            seconds=seconds,
            images_per_s=len(images) / seconds,
            **cfg,
        )
    keras.mixed_precision.set_dtype_policy("float32")


# ----------------------------------------------------------------------------- the run


def env_section(report):
    import importlib.metadata
    import subprocess

    import jax

    versions = {}
    for name in ("jax", "jaxlib", "keras", "torch", "triton", "numpy", "timm"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem", "--format=csv"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        smi = None
    device = jax.devices()[0]
    report.emit(
        "env",
        platform=device.platform,
        device_kind=device.device_kind,
        versions=versions,
        python=platform.python_version(),
        nvidia_smi=smi,
        tensorflow_imported=sys.modules.get("tensorflow") is not None,
    )
    return device.device_kind


class _NoTensorFlow(importlib.abc.MetaPathFinder):
    """An import hook that makes ``import tensorflow`` fail as where it is not installed (Keras checks
    ``"tensorflow" in sys.modules``, so putting None there would not be the same)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ModuleNotFoundError(f"No module named {name!r} (gpu_check --dry-run blocks it)")
        return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_check.jsonl", help="JSON-lines file when $OUT is not set")
    parser.add_argument("--deadline-s", type=float, default=450.0, help="no new measurement starts after this")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {','.join(SECTIONS)}")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true", help="CPU: tiny shapes, Pallas's interpreter, no TF")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        parser.error(f"--sections: unknown {bad}; choose from {SECTIONS}")
    return args


def run(args):
    """Every section of ``args.sections`` in order; returns the path of the JSON lines."""
    if args.dry_run:
        # As on the GPU machine, where TensorFlow is not installed: prove nothing here needs it.
        sys.meta_path.insert(0, _NoTensorFlow())
    os.environ.setdefault("KERAS_BACKEND", "jax")
    shapes = TINY if args.dry_run else FULL
    steps, warmup = (1, 0) if args.dry_run else (args.steps, args.warmup)
    path = os.path.join(os.environ["OUT"], "gpu_check.jsonl") if os.environ.get("OUT") else args.out
    report = Report(path, args.deadline_s)
    import torch

    torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from keras_convmixer.ops import tuning

    blocks = {"fast": tuning.pallas_blocks()}
    op_shape, model_cfg = shapes["op"], shapes["model"]
    fit_batches = 2 if args.dry_run else 8
    for section in args.sections:
        if report.left() <= 0:
            report.emit(section, skipped="deadline")
            continue
        try:
            if section == "env":
                env_section(report)
            elif section == "check":
                check_section(report, op_shape, op_impls(blocks))
            elif section == "sweep":
                best = sweep_section(report, op_shape, TINY_SWEEP if args.dry_run else SWEEP, steps, warmup)
                blocks["fast_best"] = best
                # For this run only: the model section then runs the swept blocks.
                import jax

                tuning.PALLAS_BLOCKS[jax.devices()[0].device_kind] = best
            elif section == "op":
                op_section(report, op_shape, op_impls(blocks), steps, warmup, torch_device)
            elif section in ("torch", "torch_compile"):
                compiled = section == "torch_compile"
                torch_model_section(report, section, model_cfg, torch_device, steps, warmup, compiled=compiled)
            elif section == "model":
                for impl in ("fast", "keras"):
                    if report.left() > 0:
                        keras_model_section(report, model_cfg, impl, steps, warmup, fit_batches)
        except Exception as error:  # noqa: BLE001  (a broken section must not lose the others)
            report.emit(section, error=f"{type(error).__name__}: {error}"[:2000])
    report.emit("done", elapsed_s=round(report.elapsed(), 1))
    return path


if __name__ == "__main__":
    run(parse_args())
