"""The first Pallas depthwise kernels, kept only so that benchmarks/gpu_check.py can time them
beside their replacement (``depthwise_pallas``); no ``depthwise_impl`` runs them, and the tests
do not cover them any more.

Depthwise "same" convolution as JAX Pallas kernels, with a custom VJP.

Imported only under the JAX backend (it imports ``jax`` at the top).

Why a kernel: XLA runs a large-kernel depthwise convolution as a grouped
convolution far from the memory-bandwidth bound on GPUs (39 ms forward+backward
has been reported on an H100 at ConvMixer-1536/20's shapes, against a bound
under 1 ms; not measured by us). The op is memory-bound (k*k multiply-adds per
element), so the kernels read each input row from device memory about once,
accumulate the k*k taps in float32 registers and write each output once.

Tiling (one program per (image, block of ``block_h`` output rows, block of
``block_c`` channels)); channels-last makes a [width, block_c] row slice
contiguous in ``block_c``, so loads are coalesced along channels:

* forward / dx: the program streams the ``block_h + k - 1`` input rows its
  output rows need (the halo) through a line buffer of k float32 row
  accumulators. Each input row is loaded once per horizontal tap (k shifted
  loads of the same row, which hit cache) and added into all k output rows
  that use it; the row that is complete is written and a fresh one enters.
  Device-memory reads are (block_h + k - 1) / block_h times x, not k*k times.
* dx is the same correlation of dy with the spatially flipped kernel and the
  opposite padding, so it reuses the forward kernel.
* dkernel / dbias: one program per (channel block, group of images) walks its
  output rows, and for every tap adds ``sum_w(x_shifted * dy)`` into a
  [block_c] float32 accumulator (k*k of them, plus one for dbias). The small
  per-group partial sums are added by XLA afterwards; grouping images keeps
  enough programs in flight without an atomic add.

Inputs are zero-padded by the wrapper so that every load is in bounds; width
is padded to a power of two because Triton blocks must have power-of-two
shapes. That costs one extra pass over x (masked loads would remove it).
Block sizes are defaults that have not been tuned on a GPU.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

DEFAULT_BLOCK_H = 8
DEFAULT_BLOCK_C = 32
# Images per dkernel program; more groups = more parallel programs, more partial sums.
DEFAULT_IMAGES_PER_GROUP = 4
# Triton warps per program: the forward's k accumulators of [width, block_c]
# float32 need 4+ warps at width 32 to stay in registers.
DEFAULT_NUM_WARPS = 4


def same_padding(k):
    """(before, after) padding of a "same" convolution: TF/PyTorch put the extra one at the end."""
    return (k - 1) // 2, k // 2


def _round_up(n, m):
    return -(-n // m) * m


def default_interpret():
    # Pallas's Triton lowering needs a GPU; on CPU run the same kernels in the
    # interpreter (correct but slow: it exists for tests).
    return jax.default_backend() == "cpu"


def _launch_options(name, interpret):
    """pallas_call options: the interpreter, or explicit Triton settings for a GPU."""
    if interpret:
        return dict(interpret=True, name=name)
    from jax.experimental.pallas import triton as pl_triton

    return dict(name=name, compiler_params=pl_triton.CompilerParams(num_warps=DEFAULT_NUM_WARPS, num_stages=1))


def _conv_kernel(x_ref, w_ref, b_ref, o_ref, *, k, block_h, block_w, block_c):
    """out[n, h0:h0+bh, :bw, c0:c0+bc] = sum_taps xpad[...] * w[tap] + b, as a line buffer."""
    n = pl.program_id(0)
    h0 = pl.program_id(1) * block_h
    c0 = pl.program_id(2) * block_c
    cs = pl.ds(c0, block_c)
    weights = [[w_ref[i, j, cs].astype(jnp.float32)[None, :] for j in range(k)] for i in range(k)]
    fresh = jnp.zeros((block_w, block_c), jnp.float32) + b_ref[cs].astype(jnp.float32)[None, :]

    # acc[i] holds output row h0 + r - i, which still needs kernel rows > i.
    # Input row r is loaded once (k column shifts) and feeds all k of them;
    # acc[k-1] is then complete and leaves, and a fresh row enters.
    def body(r, acc):
        shifted = [x_ref[n, h0 + r, pl.ds(j, block_w), cs].astype(jnp.float32) for j in range(k)]
        acc = list(acc)
        for i in range(k):
            for j in range(k):
                acc[i] = acc[i] + shifted[j] * weights[i][j]
        done = r - (k - 1)

        @pl.when(done >= 0)
        def _():
            o_ref[n, h0 + done, :, cs] = acc[k - 1].astype(o_ref.dtype)

        return (fresh, *acc[:-1])

    jax.lax.fori_loop(0, block_h + k - 1, body, (fresh,) * k)


def _correlate(x, w, b, pad, block_h, block_c, interpret):
    """Correlation of x [N,H,W,C] with w [k,k,C] (plus b [C]) under spatial padding ``pad``."""
    n, h, w_in, c = x.shape
    k = w.shape[0]
    before, after = pad
    block_c = min(block_c, pl.next_power_of_2(c))
    block_w = pl.next_power_of_2(w_in)
    h_out = _round_up(h, block_h)
    c_pad = _round_up(c, block_c)
    xp = jnp.pad(
        x,
        (
            (0, 0),
            (before, h_out - h + after),
            (before, block_w - w_in + after),
            (0, c_pad - c),
        ),
    )
    wp = jnp.pad(w, ((0, 0), (0, 0), (0, c_pad - c)))
    bp = jnp.pad(b, (0, c_pad - c))
    kernel = functools.partial(_conv_kernel, k=k, block_h=block_h, block_w=block_w, block_c=block_c)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n, h_out, block_w, c_pad), x.dtype),
        grid=(n, h_out // block_h, c_pad // block_c),
        **_launch_options("depthwise_conv2d", interpret),
    )(xp, wp, bp)
    return out[:, :h, :w_in, :c]


def _grad_kernel(x_ref, dy_ref, dw_ref, db_ref, *, k, height, images, block_w, block_c):
    """Per-group partial sums: dw[g, i, j, c] = sum x_pad[n, h+i, w+j, c] * dy[n, h, w, c]."""
    c0 = pl.program_id(0) * block_c
    g = pl.program_id(1)
    cs = pl.ds(c0, block_c)

    def body(step, carry):
        taps, bias_acc = carry
        # lax.div/rem, not // and %: step >= 0, and jnp's floor-mod sign fix-up
        # does not lower to Triton.
        n = g * images + jax.lax.div(step, height)
        h = jax.lax.rem(step, height)
        dy = dy_ref[n, h, :, cs].astype(jnp.float32)
        new_taps = []
        for i in range(k):
            for j in range(k):
                row = x_ref[n, h + i, pl.ds(j, block_w), cs].astype(jnp.float32)
                new_taps.append(taps[i * k + j] + jnp.sum(row * dy, axis=0))
        return tuple(new_taps), bias_acc + jnp.sum(dy, axis=0)

    zero = jnp.zeros((block_c,), jnp.float32)
    taps, bias_acc = jax.lax.fori_loop(0, images * height, body, ((zero,) * (k * k), zero))
    for i in range(k):
        for j in range(k):
            dw_ref[g, i, j, cs] = taps[i * k + j]
    db_ref[g, cs] = bias_acc


def _kernel_grads(x, dy, k, pad, block_c, images_per_group, interpret):
    """(dkernel [k,k,C], dbias [C]) in float32."""
    n, h, w_in, c = x.shape
    before, after = pad
    block_c = min(block_c, pl.next_power_of_2(c))
    block_w = pl.next_power_of_2(w_in)
    c_pad = _round_up(c, block_c)
    images = min(images_per_group, n)
    n_pad = _round_up(n, images)
    groups = n_pad // images
    # Zero dy outside the real output, so padded positions add nothing.
    xp = jnp.pad(x, ((0, n_pad - n), (before, after), (before, block_w - w_in + after), (0, c_pad - c)))
    dyp = jnp.pad(dy, ((0, n_pad - n), (0, 0), (0, block_w - w_in), (0, c_pad - c)))
    kernel = functools.partial(_grad_kernel, k=k, height=h, images=images, block_w=block_w, block_c=block_c)
    dw_parts, db_parts = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((groups, k, k, c_pad), jnp.float32),
            jax.ShapeDtypeStruct((groups, c_pad), jnp.float32),
        ),
        grid=(c_pad // block_c, groups),
        **_launch_options("depthwise_conv2d_kernel_grad", interpret),
    )(xp, dyp)
    return jnp.sum(dw_parts, axis=0)[..., :c], jnp.sum(db_parts, axis=0)[:c]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _depthwise(x, kernel, bias, block_h, block_c, images_per_group, interpret):
    return _correlate(x, kernel, bias, same_padding(kernel.shape[0]), block_h, block_c, interpret)


def _depthwise_fwd(x, kernel, bias, block_h, block_c, images_per_group, interpret):
    out = _depthwise(x, kernel, bias, block_h, block_c, images_per_group, interpret)
    return out, (x, kernel, bias)


def _depthwise_bwd(block_h, block_c, images_per_group, interpret, residuals, dy):
    x, kernel, bias = residuals
    k = kernel.shape[0]
    before, after = same_padding(k)
    # dx is the correlation of dy with the flipped kernel and swapped padding.
    flipped = kernel[::-1, ::-1, :]
    no_bias = jnp.zeros_like(bias)
    dx = _correlate(dy.astype(x.dtype), flipped, no_bias, (after, before), block_h, block_c, interpret)
    dkernel, dbias = _kernel_grads(x, dy, k, (before, after), block_c, images_per_group, interpret)
    return dx, dkernel.astype(kernel.dtype), dbias.astype(bias.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_conv2d_pallas(
    x,
    kernel,
    bias,
    *,
    block_h=DEFAULT_BLOCK_H,
    block_c=DEFAULT_BLOCK_C,
    images_per_group=DEFAULT_IMAGES_PER_GROUP,
    interpret=None,
):
    """Depthwise "same" convolution of x [N,H,W,C] with kernel [k,k,C] and bias [C].

    Differentiable in x, kernel and bias; accumulates in float32 and returns x's dtype.
    ``interpret=None`` uses Pallas's interpreter on CPU and the Triton lowering on GPU;
    ``False`` forces the Triton lowering (e.g. to export for a GPU from a CPU machine).
    """
    if interpret is None:
        interpret = default_interpret()
    return _depthwise(x, kernel, bias, block_h, block_c, images_per_group, bool(interpret))
