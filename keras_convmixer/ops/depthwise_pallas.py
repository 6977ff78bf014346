"""Depthwise "same" convolution as JAX Pallas kernels (Triton lowering), with a custom VJP.

Imported only under the JAX backend (it imports ``jax`` at the top).

Why these kernels: the op is memory-bound (k*k multiply-adds per element read), so a
kernel should read x about once from device memory, keep the taps in float32 registers
and write y once. The first version (``depthwise_pallas_v1``, kept for comparison)
padded x with ``jnp.pad`` first, streamed ``block_h + k - 1`` rows per block and threw
away the halo rows' partial sums (twice the arithmetic at k9, block_h 8), and reduced
dkernel with 81 cross-lane sums per row over few programs.

Layout: x is viewed as ``[N, H*W, C]`` (a free reshape). A program owns a tile of
``block_p`` consecutive flattened positions (any H and W: no power-of-two padding of the
width, and only the last tile of an image is partly masked) times ``block_c``
contiguous channels, so every load is coalesced along channels.

* forward (``_conv_kernel``): the float32 accumulator starts as the bias; each of the
  k*k taps is one masked load of the tile shifted by ``(i - before) * W + (j - before)``
  positions (a neighbour that falls outside the image is masked to zero: the "same"
  padding, without a pad pass) times one weight vector. Nothing outside the tile is
  computed. The k*k shifted loads of one tile overlap, so they are served by cache.
* dx is the same kernel on dy with the spatially flipped filter and the padding swapped
  (no bias).
* dkernel + dbias (``_grad_kernel``): one program per (channel block, position block,
  image group) loads dy's tile once per image and, for every tap, adds
  ``sum_p(x_shifted * dy)`` into a ``[block_c]`` float32 accumulator. Each program writes
  its own partial sums; XLA adds them afterwards in a fixed order. There are no atomics,
  so the result is deterministic.

Masked loads use spatial indices clamped into the image (out-of-image lanes read a
valid address and are then masked), because Pallas's interpreter returns NaN for some
out-of-range starts and the GPU never needs to touch those addresses. Channel indices
are masked, not clamped, so that Triton can still see their contiguity. Stores are never
clamped (a clamped store would write one element twice). Every element of every output
is written, since Pallas outputs start as garbage.

Block sizes come from ``keras_convmixer.ops.tuning.pallas_blocks`` (one table beside
``AUTO_IMPL``, keyed by device kind).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# The keys of a block configuration (see keras_convmixer.ops.tuning.DEFAULT_PALLAS_BLOCKS).
BLOCK_KEYS = ("block_p", "block_c", "num_warps", "num_stages", "images_per_group")


def same_padding(k):
    """(before, after) padding of a "same" convolution: TF/PyTorch put the extra one at the end."""
    return (k - 1) // 2, k // 2


def default_interpret():
    # The Triton lowering needs a GPU; on CPU the same kernels run in Pallas's
    # interpreter (correct but slow: it exists for tests).
    return jax.default_backend() == "cpu"


def _launch_options(name, blocks, interpret):
    if interpret:
        return dict(interpret=True, name=name)
    params = plgpu.CompilerParams(num_warps=blocks["num_warps"], num_stages=blocks["num_stages"])
    return dict(name=name, compiler_params=params)


def _fit_blocks(blocks, positions, channels):
    """Triton blocks must be powers of two; never larger than the problem needs."""
    fitted = dict(blocks)
    fitted["block_p"] = min(blocks["block_p"], pl.next_power_of_2(positions))
    fitted["block_c"] = min(blocks["block_c"], pl.next_power_of_2(channels))
    return fitted


class _Tile:
    """Indices of one program's [block_p, block_c] tile, and its shifted window loads."""

    def __init__(self, p_block, c_block, *, height, width, channels, block_p, block_c):
        self.height, self.width = height, width
        self.q = p_block * block_p + jnp.arange(block_p, dtype=jnp.int32)
        # lax.div/rem rather than // and %: q >= 0, and jnp's floor-division sign
        # fix-up does not lower to Triton.
        self.h = lax.div(self.q, jnp.int32(width))
        self.w = lax.rem(self.q, jnp.int32(width))
        self.c = c_block * block_c + jnp.arange(block_c, dtype=jnp.int32)
        self.c_ok = self.c < channels
        self.q_ok = self.q < height * width

    def mask(self, rows_ok):
        return rows_ok[:, None] & self.c_ok[None, :]

    def load(self, ref, n, rows, rows_ok):
        """ref[n, rows, c] as float32, zero where a row or channel is masked."""
        value = plgpu.load(ref.at[n, rows[:, None], self.c[None, :]], mask=self.mask(rows_ok), other=0)
        return value.astype(jnp.float32)

    def load_shifted(self, ref, n, di, dj):
        """The tile shifted by (di, dj) pixels, zero outside the image ("same" padding)."""
        hi, wj = self.h + di, self.w + dj
        ok = self.q_ok & (hi >= 0) & (hi < self.height) & (wj >= 0) & (wj < self.width)
        src = jnp.minimum(jnp.maximum(self.q + (di * self.width + dj), 0), self.height * self.width - 1)
        return self.load(ref, n, src, ok)

    def load_vector(self, ref, *lead):
        """ref[*lead, c] as float32 (a weight or bias vector)."""
        return plgpu.load(ref.at[(*lead, self.c)], mask=self.c_ok, other=0).astype(jnp.float32)


def _conv_kernel(*refs, k, before, height, width, channels, block_p, block_c, has_bias):
    """y[n, tile] = bias + sum_{i,j} x[n, tile shifted by (i - before, j - before)] * w[i, j]."""
    if has_bias:
        x_ref, w_ref, b_ref, o_ref = refs
    else:
        (x_ref, w_ref, o_ref), b_ref = refs, None
    n = pl.program_id(0)
    tile = _Tile(
        pl.program_id(1),
        pl.program_id(2),
        height=height,
        width=width,
        channels=channels,
        block_p=block_p,
        block_c=block_c,
    )
    acc = jnp.zeros((block_p, block_c), jnp.float32)
    if has_bias:
        acc = acc + tile.load_vector(b_ref)[None, :]
    for i in range(k):
        for j in range(k):
            acc = acc + tile.load_shifted(x_ref, n, i - before, j - before) * tile.load_vector(w_ref, i, j)[None, :]
    plgpu.store(o_ref.at[n, tile.q[:, None], tile.c[None, :]], acc.astype(o_ref.dtype), mask=tile.mask(tile.q_ok))


def _correlate(x, w, b, before, blocks, interpret):
    """Correlation of x [N, H, W, C] with w [k, k, C] (plus b [C] unless None), taps offset by -before."""
    n, height, width, channels = x.shape
    k = w.shape[0]
    blocks = _fit_blocks(blocks, height * width, channels)
    kernel = functools.partial(
        _conv_kernel,
        k=k,
        before=before,
        height=height,
        width=width,
        channels=channels,
        block_p=blocks["block_p"],
        block_c=blocks["block_c"],
        has_bias=b is not None,
    )
    grid = (n, pl.cdiv(height * width, blocks["block_p"]), pl.cdiv(channels, blocks["block_c"]))
    operands = (x.reshape(n, height * width, channels), w) + ((b,) if b is not None else ())
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n, height * width, channels), x.dtype),
        grid=grid,
        **_launch_options("depthwise_conv2d_fwd", blocks, interpret),
    )(*operands)
    return out.reshape(x.shape)


def _grad_kernel(x_ref, dy_ref, dw_ref, db_ref, *, k, before, height, width, channels, batch, images, **blocks):
    """Partial sums of one (channel block, position block, image group):
    dw[i, j] += sum_p x[n, p shifted by (i - before, j - before)] * dy[n, p]; db += sum_p dy[n, p]."""
    tile = _Tile(
        pl.program_id(1),
        pl.program_id(0),
        height=height,
        width=width,
        channels=channels,
        block_p=blocks["block_p"],
        block_c=blocks["block_c"],
    )
    group = pl.program_id(2)

    def add_image(t, carry):
        taps, bias_sum = carry
        n = group * images + t
        # An image past the batch (last group) is clamped to a real one and masked out.
        real = n < batch
        n = jnp.minimum(n, batch - 1)
        dy = tile.load(dy_ref, n, tile.q, tile.q_ok & real)
        new_taps = tuple(
            taps[i * k + j] + jnp.sum(tile.load_shifted(x_ref, n, i - before, j - before) * dy, axis=0)
            for i in range(k)
            for j in range(k)
        )
        return new_taps, bias_sum + jnp.sum(dy, axis=0)

    zero = jnp.zeros((blocks["block_c"],), jnp.float32)
    taps, bias_sum = lax.fori_loop(0, images, add_image, ((zero,) * (k * k), zero))
    # One row of partial sums per program: row = group * position_blocks + position block.
    row = group * pl.num_programs(1) + pl.program_id(1)
    for t in range(k * k):
        plgpu.store(dw_ref.at[row, t, tile.c], taps[t], mask=tile.c_ok)
    plgpu.store(db_ref.at[row, tile.c], bias_sum, mask=tile.c_ok)


def _kernel_grads(x, dy, k, before, blocks, interpret):
    """(dkernel [k, k, C], dbias [C]) in float32."""
    n, height, width, channels = x.shape
    blocks = _fit_blocks(blocks, height * width, channels)
    images = max(1, min(blocks["images_per_group"], n))
    groups = pl.cdiv(n, images)
    p_blocks = pl.cdiv(height * width, blocks["block_p"])
    kernel = functools.partial(
        _grad_kernel,
        k=k,
        before=before,
        height=height,
        width=width,
        channels=channels,
        batch=n,
        images=images,
        block_p=blocks["block_p"],
        block_c=blocks["block_c"],
    )
    flat = (n, height * width, channels)
    dw_parts, db_parts = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((groups * p_blocks, k * k, channels), jnp.float32),
            jax.ShapeDtypeStruct((groups * p_blocks, channels), jnp.float32),
        ),
        grid=(pl.cdiv(channels, blocks["block_c"]), p_blocks, groups),
        **_launch_options("depthwise_conv2d_dkernel", blocks, interpret),
    )(x.reshape(flat), dy.reshape(flat))
    return jnp.sum(dw_parts, axis=0).reshape(k, k, channels), jnp.sum(db_parts, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _depthwise(x, kernel, bias, blocks, interpret):
    return _correlate(x, kernel, bias, same_padding(kernel.shape[0])[0], dict(blocks), interpret)


def _depthwise_fwd(x, kernel, bias, blocks, interpret):
    return _depthwise(x, kernel, bias, blocks, interpret), (x, kernel, bias)


def _depthwise_bwd(blocks, interpret, residuals, dy):
    x, kernel, bias = residuals
    blocks = dict(blocks)
    before, after = same_padding(kernel.shape[0])
    # dx is the correlation of dy with the flipped filter, the padding swapped.
    dx = _correlate(dy.astype(x.dtype), kernel[::-1, ::-1, :], None, after, blocks, interpret)
    dkernel, dbias = _kernel_grads(x, dy, kernel.shape[0], before, blocks, interpret)
    return dx, dkernel.astype(kernel.dtype), dbias.astype(bias.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_conv2d_pallas(x, kernel, bias, *, blocks=None, interpret=None):
    """Depthwise "same" convolution of x [N, H, W, C] with kernel [k, k, C] and bias [C].

    Differentiable in x, kernel and bias; accumulates in float32 and returns x's dtype.
    ``blocks``: a dict with the keys of ``BLOCK_KEYS`` (default: this device's entry of
    ``keras_convmixer.ops.tuning.PALLAS_BLOCKS``). ``interpret=None`` uses Pallas's
    interpreter on CPU and the Triton lowering on GPU; ``False`` forces the Triton
    lowering (e.g. to lower for a GPU from a CPU machine).
    """
    if blocks is None:
        from keras_convmixer.ops.tuning import pallas_blocks

        blocks = pallas_blocks()
    missing = [key for key in BLOCK_KEYS if key not in blocks]
    if missing:
        raise ValueError(f"blocks is missing {missing}; it needs {BLOCK_KEYS}.")
    if interpret is None:
        interpret = default_interpret()
    # A hashable, ordered form: custom_vjp's non-differentiable arguments are static.
    frozen = tuple((key, int(blocks[key])) for key in BLOCK_KEYS)
    return _depthwise(x, kernel, bias, frozen, bool(interpret))
