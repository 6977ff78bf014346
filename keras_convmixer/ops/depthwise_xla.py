"""Depthwise "same" convolution written as shifted multiply-adds for XLA, with a custom VJP.

Imported only under the JAX backend (it imports ``jax`` at the top).

Why: on CPU, XLA runs ``keras.ops.depthwise_conv`` as a grouped convolution
(``feature_group_count=C``) through a generic path that is tens of times
slower than PyTorch's depthwise kernel, and its autodiff backward is slower
still. A depthwise convolution has no reduction over channels, so it needs
no convolution primitive at all: with the input padded once, the output is
the sum of ``k*k`` shifted slices times one kernel tap each. XLA fuses all of
them into a single elementwise loop, vectorised along the contiguous channel
axis and split across threads, reading each input row from cache.

The gradients are written by hand, because autodiff of the slices would
materialise ``k*k`` padded cotangents:

* ``dx`` is the same correlation of ``dy`` with the spatially flipped kernel
  and the padding swapped (before <-> after), so it is the same fused loop.
* ``dkernel[i, j, c] = sum_{n,h,w} xpad[n, h+i, w+j, c] * dy[n, h, w, c]``.
  As ``k*k`` separate reductions XLA's CPU emitter runs them as scalar,
  strided column reductions (measured >10x slower than the forward). Instead
  the roles swap: ``dy`` is the "kernel" and the ``k x k`` taps are the
  output, accumulated row by row of ``dy`` in a ``fori_loop``. Each loop step
  is one fused elementwise loop over ``[N, k, k, C]`` (channels contiguous,
  vectorised) adding ``W`` shifted windows, and a final sum over ``N``. (Fully
  unrolling the rows, or one fusion per kernel row, measured 5-20x slower.)
* ``dbias`` is a sum of ``dy`` over ``N, H, W``.

Arithmetic is float32 whatever the input dtype (bfloat16 inputs are widened
inside the fused loops); outputs and gradients are cast back to the dtypes of
their inputs.
"""

import jax
import jax.numpy as jnp
from jax import lax


def same_padding(k):
    """(before, after) padding of a "same" convolution: TF/PyTorch put the extra one at the end."""
    return (k - 1) // 2, k // 2


def _correlate(x, kernel, padding):
    """``sum_{i,j} pad(x)[:, h+i, w+j, :] * kernel[i, j]`` in float32: one fused loop under jit."""
    k = kernel.shape[0]
    _, height, width, _ = x.shape
    xp = jnp.pad(x, ((0, 0), padding, padding, (0, 0)))
    kernel = kernel.astype(jnp.float32)
    out = None
    for i in range(k):
        for j in range(k):
            term = xp[:, i : i + height, j : j + width, :].astype(jnp.float32) * kernel[i, j]
            out = term if out is None else out + term
    return out


def _kernel_grad(x, dy, k):
    """``dkernel[i, j, c] = sum_{n,h,w} xpad[n, h+i, w+j, c] * dy[n, h, w, c]`` in float32."""
    n, height, width, channels = x.shape
    xp = jnp.pad(x, ((0, 0), same_padding(k), same_padding(k), (0, 0)))

    def add_row(h, acc):
        # Row h of dy against the W k x k input windows it touches. Each window is its own
        # dynamic slice of xp, which XLA fuses into the loop; slicing k whole rows first and
        # then the windows materialised the rows every step and measured 2x slower.
        dy_row = lax.dynamic_slice_in_dim(dy, h, 1, axis=1).astype(jnp.float32)  # [N, 1, W, C]
        for w in range(width):
            window = lax.dynamic_slice(xp, (0, h, w, 0), (n, k, k, channels)).astype(jnp.float32)
            acc = acc + window * dy_row[:, :, w : w + 1, :]
        return acc

    acc = lax.fori_loop(0, height, add_row, jnp.zeros((n, k, k, channels), jnp.float32))
    return jnp.sum(acc, axis=0)


@jax.custom_vjp
def depthwise_conv2d_xla(x, kernel, bias):
    """``[N, H, W, C]`` * ``[k, k, C]`` + ``[C]`` -> ``[N, H, W, C]``, "same" padding, stride 1."""
    k = kernel.shape[0]
    return (_correlate(x, kernel, same_padding(k)) + bias.astype(jnp.float32)).astype(x.dtype)


def _forward(x, kernel, bias):
    return depthwise_conv2d_xla(x, kernel, bias), (x, kernel, bias)


def _backward(residuals, dy):
    x, kernel, bias = residuals
    k = kernel.shape[0]
    before, after = same_padding(k)
    dx = _correlate(dy, kernel[::-1, ::-1], (after, before)).astype(x.dtype)
    dkernel = _kernel_grad(x, dy, k).astype(kernel.dtype)
    dbias = jnp.sum(dy.astype(jnp.float32), axis=(0, 1, 2)).astype(bias.dtype)
    return dx, dkernel, dbias


depthwise_conv2d_xla.defvjp(_forward, _backward)
