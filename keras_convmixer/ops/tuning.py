"""The measured tables of the depthwise convolution, in one place: which implementation ``"auto"``
runs on each (backend, platform), and the Pallas kernels' block sizes per device.

Both ``depthwise`` (the dispatcher) and ``depthwise_pallas`` (the kernels) read them, so they sit
below both.
"""

# What "auto" runs on each (backend, platform): the implementation that was
# fastest in `scripts/benchmark.py` there (docs/benchmarks.md has the full
# runs, with the honest harness: every backward from a random cotangent, y
# returned). Unlisted pairs run "keras". No GPU has run the current kernels:
# add ("jax", "gpu") only after benchmarks/gpu_check.py has measured one.
#   ("jax", "cpu") -> "xla". 2026-12-07, the 2-core CPU dev box (shared, load
#     average about 10), float32, medians, one run each, depthwise k9
#     (8, 32, 32, 256), forward + backward in one step: "xla" 239.5 ms against
#     PyTorch channels_last 342.0 ms (run 1); "xla" 395.0 ms against "keras"
#     (XLA's grouped convolution) 24760.0 ms (run 2). ConvMixer-256/8 training
#     (32x32, batch 64, run 1): "xla" 6.53 img/s, PyTorch NCHW 5.35,
#     channels_last 5.30. (2026-11-25, same harness for models: "xla" 9.48
#     against "keras" 2.06 img/s.)
#   tensorflow and torch stay "keras": no other implementation runs there
#     (Keras-on-torch is PyTorch's own kernel).
AUTO_IMPL = {
    ("jax", "cpu"): "xla",
}

# Block sizes of the Pallas kernels ("fast"), keyed by jax.devices()[0].device_kind.
# Each entry must carry the date, the command and the figure it was chosen by
# (benchmarks/gpu_check.py runs the sweep). No GPU has run the current kernels yet,
# so there are no entries: every device uses DEFAULT_PALLAS_BLOCKS, which is a guess
# (4 rows of 32 positions x 32 channels = 16 KB of float32 accumulators per program,
# 4 warps), not a measurement.
PALLAS_BLOCKS = {}
DEFAULT_PALLAS_BLOCKS = dict(block_p=128, block_c=32, num_warps=4, num_stages=2, images_per_group=8)


def pallas_blocks(device_kind=None):
    """The Pallas block configuration for ``device_kind`` (default: the first JAX device's)."""
    if device_kind is None:
        import jax

        device_kind = jax.devices()[0].device_kind
    return dict(PALLAS_BLOCKS.get(device_kind, DEFAULT_PALLAS_BLOCKS))
