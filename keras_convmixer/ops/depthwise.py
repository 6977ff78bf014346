"""``depthwise_conv2d``: a depthwise "same" convolution that picks its implementation.

Three implementations compute the same function:

* ``"keras"``: ``keras.ops.depthwise_conv`` + bias, on every backend (what
  ``keras.layers.DepthwiseConv2D`` runs).
* ``"xla"``: ``depthwise_xla``, shifted multiply-adds that XLA fuses into one
  vectorised loop, with hand-written gradients. JAX backend only; written for
  CPU, where XLA's grouped convolution is slow.
* ``"fast"``: the JAX Pallas kernels of ``depthwise_pallas`` (Triton lowering
  on a GPU, Pallas's interpreter on CPU, where it is slow and exists so that
  CI can check it). JAX backend only; there is no torch/TensorFlow kernel.

``"auto"`` looks up ``AUTO_IMPL``, one entry per (backend, platform) that
``scripts/benchmark.py`` measured, and falls back to ``"keras"`` elsewhere.
"""

import keras

from keras_convmixer.ops.tuning import AUTO_IMPL

IMPLS = ("auto", "fast", "keras", "xla")

# Implementations that exist on the JAX backend only.
_JAX_ONLY = ("fast", "xla")

# jax.default_backend() values the Pallas kernels run on (cpu: interpreter).
_PALLAS_PLATFORMS = ("cpu", "gpu")


def _platform():
    """The platform of the current backend's default device ("cpu", "gpu", ...)."""
    if keras.backend.backend() != "jax":
        return None
    import jax

    return jax.default_backend()


def validate_impl(impl):
    if impl not in IMPLS:
        raise ValueError(f"depthwise_impl must be one of {IMPLS}, got {impl!r}.")
    return impl


def fast_path_unavailable_reason(impl="fast"):
    """Why ``impl`` (``"fast"`` or ``"xla"``) cannot run here, or None when it can."""
    backend = keras.backend.backend()
    if impl == "xla":
        if backend != "jax":
            return (
                f"depthwise_impl='xla' needs the JAX backend (it is written in jax.numpy); the backend is "
                f"{backend!r}. Use depthwise_impl='auto' or 'keras', or set KERAS_BACKEND=jax."
            )
        return None
    if backend != "jax":
        return (
            f"depthwise_impl='fast' needs the JAX backend (it is a Pallas kernel); the backend is "
            f"{backend!r}. Use depthwise_impl='auto' or 'keras', or set KERAS_BACKEND=jax."
        )
    platform = _platform()
    if platform not in _PALLAS_PLATFORMS:
        return (
            f"depthwise_impl='fast' runs on GPU (Triton) or CPU (interpreter), not on JAX platform "
            f"{platform!r}. Use depthwise_impl='auto' or 'keras'."
        )
    return None


def resolve_impl(impl):
    """Map an entry of ``IMPLS`` to the implementation that runs: ``"fast"``, ``"keras"`` or ``"xla"``.

    ``"fast"``/``"xla"`` where they cannot run raise ``ValueError`` (never a silent fallback).
    """
    validate_impl(impl)
    if impl == "keras":
        return "keras"
    if impl in _JAX_ONLY:
        reason = fast_path_unavailable_reason(impl)
        if reason:
            raise ValueError(reason)
        return impl
    chosen = AUTO_IMPL.get((keras.backend.backend(), _platform()), "keras")
    return chosen if chosen == "keras" or fast_path_unavailable_reason(chosen) is None else "keras"


def depthwise_conv2d(x, kernel, bias=None, impl="auto"):
    """Depthwise 2-D convolution with "same" padding, channels-last, stride 1.

    Args:
        x: ``[N, H, W, C]``.
        kernel: ``[k, k, C]`` or Keras's depthwise layout ``[k, k, C, 1]``; any odd or
            even ``k`` (even ``k`` pads the extra row/column at the end, as TF and PyTorch).
        bias: ``[C]`` or None.
        impl: one of ``IMPLS`` (see the module docstring).
    """
    kernel_shape = tuple(kernel.shape)
    if len(kernel_shape) == 4:
        if kernel_shape[3] != 1:
            raise ValueError(f"depthwise_conv2d supports depth multiplier 1 only, got kernel {kernel_shape}.")
        kernel_shape = kernel_shape[:3]
    if len(kernel_shape) != 3 or kernel_shape[0] != kernel_shape[1]:
        raise ValueError(f"kernel must be [k, k, C] or [k, k, C, 1], got {tuple(kernel.shape)}.")
    if len(x.shape) != 4 or x.shape[-1] != kernel_shape[2]:
        raise ValueError(f"x must be [N, H, W, {kernel_shape[2]}] (channels-last), got {tuple(x.shape)}.")

    resolved = resolve_impl(impl)
    if resolved in ("xla", "fast"):
        if resolved == "xla":
            from keras_convmixer.ops.depthwise_xla import depthwise_conv2d_xla as run
        else:
            from keras_convmixer.ops.depthwise_pallas import depthwise_conv2d_pallas as run

        # Variables become arrays here (read inside the caller's autocast scope, so a
        # mixed-precision layer passes its compute dtype); the JAX kernels need jax arrays.
        x = keras.ops.convert_to_tensor(x)
        kernel = keras.ops.reshape(keras.ops.convert_to_tensor(kernel), kernel_shape)
        if bias is None:
            bias = keras.ops.zeros((kernel_shape[2],), dtype=kernel.dtype)
        return run(x, kernel, keras.ops.convert_to_tensor(bias))

    kernel = keras.ops.reshape(kernel, (*kernel_shape, 1))
    y = keras.ops.depthwise_conv(x, kernel, strides=1, padding="same", data_format="channels_last")
    return y if bias is None else y + bias
