"""keras_convmixer/ops/depthwise_pallas.py: the Pallas forward/dx and dkernel+dbias kernels.

Exactness runs the kernels in Pallas's interpreter (this CI has no GPU) against ``jax.vjp`` of
``lax.conv_general_dilated(feature_group_count=C)`` with a random cotangent. The interpreter
starts every output as NaN, so an element a kernel forgets to write fails these tests. The
interpreter is slow (each case is a compile of k*k unrolled taps per kernel), so the shapes are
tiny and the block sizes smaller than the real ones, which makes every tile and edge case
appear anyway: several position blocks with a partial last one, several channel blocks with a
partial last one, image groups with a partial last one, windows wider than the image, batch 1.

The lowering tests lower the same kernels for CUDA with ``interpret=False`` on this CPU machine,
which runs Pallas's Triton lowering: a kernel that uses something Triton cannot lower (checked
by hand once with a non-power-of-two ``arange`` in the tile: ``NotImplementedError:
Unimplemented primitive in Pallas Triton lowering: slice``) fails here, before any GPU time.
"""

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(keras.backend.backend() != "jax", reason="the Pallas kernels are JAX-only")

FAST_COMPILE = {"xla_backend_optimization_level": 0}

# Smaller than DEFAULT_PALLAS_BLOCKS so that tiny shapes span several blocks in every axis.
TINY_BLOCKS = dict(block_p=16, block_c=4, num_warps=4, num_stages=2, images_per_group=2)

# (k, (N, H, W, C)): k 3 to 9, odd and even; H, W not powers of two (H*W = 35, 30, 36: 3 position
# blocks of 16, the last partial); C not a multiple of 4; N = 3 makes a partial image group.
CASES_F32 = [
    (3, (3, 5, 7, 6)),
    (4, (1, 6, 5, 5)),
    (9, (1, 4, 9, 3)),
]
CASES_BF16 = [(5, (2, 5, 6, 7))]


def _lax_reference(x, kernel, bias):
    from jax import lax

    from keras_convmixer.ops.depthwise_pallas import same_padding

    pad = same_padding(kernel.shape[0])
    y = lax.conv_general_dilated(
        x,
        kernel[:, :, None, :],
        window_strides=(1, 1),
        padding=(pad, pad),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
        precision=lax.Precision.HIGHEST,
    )
    return y + bias


def _random(shape, k, seed):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    return (
        rng.standard_normal(shape),
        rng.standard_normal((k, k, c)) / k,
        rng.standard_normal((c,)),
        rng.standard_normal(shape),
    )


def _vjp(fn, x, kernel, bias, cotangent):
    """(y, dx, dkernel, dbias) of ``fn`` through jax.vjp, jitted, as float32 NumPy arrays."""
    import jax

    def run(x, kernel, bias, cotangent):
        y, pullback = jax.vjp(fn, x, kernel, bias)
        return (y, *pullback(cotangent))

    # XLA's CPU compile of the interpreted kernels is most of a case's time; without LLVM's
    # optimisations it takes about half as long, and these programs run for milliseconds.
    compiled = jax.jit(run).trace(x, kernel, bias, cotangent).lower().compile(FAST_COMPILE)
    return [np.asarray(a, np.float32) for a in compiled(x, kernel, bias, cotangent)]


def _check(k, shape, dtype, blocks, seed):
    import jax.numpy as jnp

    from keras_convmixer.ops.depthwise_pallas import depthwise_conv2d_pallas

    arrays = [jnp.asarray(a, dtype) for a in _random(shape, k, seed)]
    got = _vjp(lambda x, w, b: depthwise_conv2d_pallas(x, w, b, blocks=blocks, interpret=True), *arrays)
    # The reference sees the same (bf16-rounded) values, in float32 arithmetic.
    want = _vjp(_lax_reference, *[a.astype(jnp.float32) for a in arrays])
    # bf16: one rounding of the result to 8 mantissa bits (relative step 2^-8), twice that as margin.
    rtol = 1e-5 if dtype == "float32" else 2**-7
    for name, g, w in zip(("y", "dx", "dkernel", "dbias"), got, want, strict=True):
        assert np.isfinite(g).all(), f"{name} has unwritten (NaN) elements"
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.abs(w).max(), err_msg=name)
        assert np.linalg.norm(g - w) <= rtol * np.linalg.norm(w), name


@pytest.mark.parametrize("k,shape", CASES_F32, ids=[f"k{k}" for k, _ in CASES_F32])
def test_forward_dx_dkernel_dbias_match_lax_float32(k, shape):
    _check(k, shape, "float32", TINY_BLOCKS, seed=k)


@pytest.mark.parametrize("k,shape", CASES_BF16, ids=[f"k{k}" for k, _ in CASES_BF16])
def test_forward_dx_dkernel_dbias_match_lax_bfloat16(k, shape):
    _check(k, shape, "bfloat16", TINY_BLOCKS, seed=k)


def test_default_blocks_and_the_op_entry_point():
    """The default block configuration (one block of 128 positions, channel blocks of 32 with a
    partial second one) through ``depthwise_conv2d(impl="fast")`` with Keras's kernel layout."""
    import jax.numpy as jnp

    from keras_convmixer.ops import depthwise_conv2d
    from keras_convmixer.ops.tuning import DEFAULT_PALLAS_BLOCKS, pallas_blocks

    assert pallas_blocks("no such device") == DEFAULT_PALLAS_BLOCKS
    x, kernel, bias, cotangent = (jnp.asarray(a, jnp.float32) for a in _random((1, 3, 5, 40), 5, seed=0))
    got = _vjp(lambda x, w, b: depthwise_conv2d(x, w[..., None], b, impl="fast"), x, kernel, bias, cotangent)
    want = _vjp(_lax_reference, x, kernel, bias, cotangent)
    for name, g, w in zip(("y", "dx", "dkernel", "dbias"), got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max(), err_msg=name)


def test_blocks_are_checked():
    import jax.numpy as jnp

    from keras_convmixer.ops.depthwise_pallas import depthwise_conv2d_pallas

    x = jnp.ones((1, 3, 3, 2))
    with pytest.raises(ValueError, match="blocks is missing"):
        depthwise_conv2d_pallas(x, jnp.ones((3, 3, 2)), jnp.ones((2,)), blocks=dict(block_p=16))


@pytest.mark.parametrize(
    "k,dtype,blocks",
    [
        (9, "bfloat16", None),  # the default configuration, ConvMixer-1536/20's kernel size
        (4, "float32", dict(block_p=256, block_c=64, num_warps=8, num_stages=3, images_per_group=4)),
    ],
    ids=["k9-bf16-default", "k4-f32-large-blocks"],
)
def test_kernels_lower_for_cuda_through_triton(k, dtype, blocks):
    import jax
    import jax.numpy as jnp

    from keras_convmixer.ops.depthwise_pallas import depthwise_conv2d_pallas
    from keras_convmixer.ops.tuning import DEFAULT_PALLAS_BLOCKS

    blocks = blocks or DEFAULT_PALLAS_BLOCKS

    def step(x, kernel, bias, cotangent):
        op = lambda x, w, b: depthwise_conv2d_pallas(x, w, b, blocks=blocks, interpret=False)  # noqa: E731
        y, pullback = jax.vjp(op, x, kernel, bias)
        return y, pullback(cotangent)

    shape = (3, 10, 13, 96)  # H*W = 130: a partial position block; 96 channels: a partial block of 64
    args = [jax.ShapeDtypeStruct(s, jnp.dtype(dtype)) for s in (shape, (k, k, 96), (96,), shape)]
    text = jax.jit(step).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    # Forward, dx (the forward kernel again) and dkernel+dbias: three Triton calls.
    assert text.count("__gpu$xla.gpu.triton") == 3
    assert "depthwise_conv2d_fwd" in text and "depthwise_conv2d_dkernel" in text
