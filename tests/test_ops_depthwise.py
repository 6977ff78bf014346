"""The depthwise op: the XLA shift-and-add path against keras.ops.depthwise_conv and a NumPy
reference (the Pallas kernels: tests/test_ops_depthwise_pallas.py), ``depthwise_impl`` on ConvMixerBlock/ConvMixer,
what "auto" picks, and the non-JAX behaviour."""

import keras
import numpy as np
import pytest

from keras_convmixer.layers import ConvMixerBlock
from keras_convmixer.models import ConvMixer
from keras_convmixer.ops import IMPLS, depthwise_conv2d, resolve_impl
from keras_convmixer.ops.tuning import AUTO_IMPL

BACKEND = keras.backend.backend()
jax_only = pytest.mark.skipif(BACKEND != "jax", reason="the fast and xla paths exist on the JAX backend only")
not_jax = pytest.mark.skipif(BACKEND == "jax", reason="checks the non-JAX behaviour of the JAX-only impls")


def numpy_depthwise_same(x, kernel, bias):
    """Depthwise correlation, "same" padding with the extra row/column at the end (TF/PyTorch), float64."""
    k = kernel.shape[0]
    before, after = (k - 1) // 2, k // 2
    xp = np.pad(x.astype(np.float64), ((0, 0), (before, after), (before, after), (0, 0)))
    n, h, w, c = x.shape
    out = np.zeros((n, h, w, c)) + bias
    for i in range(k):
        for j in range(k):
            out += xp[:, i : i + h, j : j + w, :] * kernel[i, j, :].astype(np.float64)
    return out


def _inputs(shape, k, dtype, seed):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = rng.uniform(-1, 1, shape).astype(np.float32)
    kernel = rng.uniform(-1, 1, (k, k, c)).astype(np.float32)
    bias = rng.uniform(-1, 1, (c,)).astype(np.float32)
    cotangent = rng.uniform(-1, 1, shape).astype(np.float32)
    if dtype == "bfloat16":
        # Round once to bf16 so that every path sees the same inputs.
        to_bf16 = lambda a: np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(a, "bfloat16")), np.float32)  # noqa: E731
        x, kernel, bias, cotangent = map(to_bf16, (x, kernel, bias, cotangent))
    return x, kernel, bias, cotangent


def _value_and_grads(impl, x, kernel, bias, cotangent, dtype):
    """Output and d(sum(out * cotangent))/d(x, kernel, bias) through JAX autodiff, jitted."""
    import jax
    import jax.numpy as jnp

    def loss(x, kernel, bias):
        out = depthwise_conv2d(x, kernel, bias, impl=impl)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, out), grads = fn(*(jnp.asarray(a, dtype) for a in (x, kernel, bias)))
    return [np.asarray(a, np.float32) for a in (out, *grads)]


# Odd, even, non-square spatial sizes, odd channel counts, a batch of 5 (the row loop of
# dkernel runs over every image).
SHAPES = {
    3: (1, 7, 5, 37),
    5: (5, 6, 9, 20),
    7: (1, 11, 6, 33),
    8: (1, 9, 7, 35),
    9: (1, 10, 9, 40),
}


CASES = [(k, dtype) for k in sorted(SHAPES) for dtype in ("float32", "bfloat16")]


# "fast" (Pallas) has its own exactness grid in tests/test_ops_depthwise_pallas.py.
@jax_only
@pytest.mark.parametrize("k,dtype", CASES)
def test_xla_forward_and_grads_match_keras(k, dtype):
    impl = "xla"
    shape = SHAPES[k]
    x, kernel, bias, cotangent = _inputs(shape, k, dtype, seed=k)
    fast = _value_and_grads(impl, x, kernel, bias, cotangent, dtype)
    names = ("output", "dx", "dkernel", "dbias")
    if dtype == "float32":
        ref = _value_and_grads("keras", x, kernel, bias, cotangent, dtype)
        for name, got, want in zip(names, fast, ref, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
    else:
        # bf16 tolerance: the reference is float32 arithmetic on the same bf16-rounded inputs;
        # the result is rounded to bf16 once (8 bits of mantissa: relative step 2^-8).
        ref = _value_and_grads("keras", x, kernel, bias, cotangent, "float32")
        for name, got, want in zip(names, fast, ref, strict=True):
            np.testing.assert_allclose(got, want, rtol=2**-7, atol=2**-7 * np.abs(want).max(), err_msg=name)
    # The spec itself, independent of Keras: "same" padding with the extra one at the end for even k.
    tol = dict(rtol=2**-7, atol=2**-7 * np.abs(fast[0]).max()) if dtype == "bfloat16" else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fast[0], numpy_depthwise_same(x, kernel, bias), **tol)


@pytest.mark.parametrize("k", [3, 8])
def test_keras_impl_matches_numpy_reference(k):
    x, kernel, bias, _ = _inputs((2, 7, 6, 5), k, "float32", seed=1)
    got = keras.ops.convert_to_numpy(depthwise_conv2d(x, kernel[..., None], bias, impl="keras"))
    np.testing.assert_allclose(got, numpy_depthwise_same(x, kernel, bias), rtol=1e-5, atol=1e-5)


def _tiny_convmixer(impl):
    return ConvMixer(
        12,
        1,
        3,
        2,
        input_shape=(10, 14, 3),
        classes=3,
        classifier_activation=None,
        depthwise_impl=impl,
        name=f"convmixer_{impl}",
    )


@jax_only
@pytest.mark.parametrize("impl", ["fast", "xla"])
def test_whole_model_same_outputs_and_same_update(impl):
    from tests.helpers import randomize_batchnorm

    models = {name: _tiny_convmixer(name) for name in ("keras", impl)}
    randomize_batchnorm(models["keras"], seed=3)
    weights = models["keras"].get_weights()
    models[impl].set_weights(weights)
    # Same variable paths: a checkpoint of one loads into the other by name.
    assert [v.path.split("/", 1)[1] for v in models[impl].weights] == [
        v.path.split("/", 1)[1] for v in models["keras"].weights
    ]

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2, 10, 14, 3)).astype(np.float32)
    labels = np.array([0, 2])
    outputs, updated = {}, {}
    for name, model in models.items():
        outputs[name] = keras.ops.convert_to_numpy(model(images, training=False))
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=keras.losses.SparseCategoricalCrossentropy(True))
        model.train_on_batch(images, labels)
        updated[name] = model.get_weights()
    np.testing.assert_allclose(outputs[impl], outputs["keras"], rtol=1e-5, atol=1e-5)
    moved = 0
    for before, fast, ref in zip(weights, updated[impl], updated["keras"], strict=True):
        np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-5)
        moved += not np.allclose(ref, before)
    assert moved >= len(weights) // 2  # the step did change the weights it compares


def test_depthwise_impl_is_serialized_and_validated():
    block = ConvMixerBlock(8, 3, depthwise_impl="keras", name="b")
    assert block.get_config()["depthwise_impl"] == "keras"
    assert ConvMixerBlock.from_config(block.get_config()).depthwise_impl == "keras"
    model = _tiny_convmixer("auto")
    assert all(model.get_layer(f"block_{i}").depthwise_impl == "auto" for i in range(1))
    with pytest.raises(ValueError, match="depthwise_impl must be one of"):
        ConvMixerBlock(8, 3, depthwise_impl="triton")
    with pytest.raises(ValueError, match=r"kernel must be \[k, k, C\]"):
        depthwise_conv2d(np.zeros((1, 4, 4, 3), "float32"), np.zeros((3, 2, 3), "float32"), impl="keras")


def test_auto_follows_the_measured_table():
    assert IMPLS == ("auto", "fast", "keras", "xla")
    assert resolve_impl("keras") == "keras"
    # Only measured pairs are listed, and no GPU has been measured.
    assert set(AUTO_IMPL.values()) <= {"fast", "keras", "xla"}
    assert not [pair for pair in AUTO_IMPL if pair[1] == "gpu"]
    if BACKEND == "jax":
        import jax

        platform = jax.default_backend()
        assert resolve_impl("auto") == AUTO_IMPL.get(("jax", platform), "keras")
        if platform == "cpu":
            assert resolve_impl("auto") == "xla"  # measured faster than XLA's grouped conv on CPU
    else:
        # torch and TensorFlow keep their native depthwise convolution.
        assert resolve_impl("auto") == "keras"


@not_jax
def test_fast_outside_jax_is_a_clear_error():
    with pytest.raises(ValueError, match="needs the JAX backend"):
        ConvMixerBlock(8, 3, depthwise_impl="fast")
    with pytest.raises(ValueError, match="needs the JAX backend"):
        _tiny_convmixer("fast")
    x = np.zeros((1, 4, 4, 3), "float32")
    with pytest.raises(ValueError, match="needs the JAX backend"):
        depthwise_conv2d(x, np.ones((3, 3, 3), "float32"), impl="fast")
    with pytest.raises(ValueError, match="depthwise_impl='xla' needs the JAX backend"):
        depthwise_conv2d(x, np.ones((3, 3, 3), "float32"), impl="xla")
    with pytest.raises(ValueError, match="depthwise_impl='xla' needs the JAX backend"):
        ConvMixerBlock(8, 3, depthwise_impl="xla")


@jax_only
def test_fast_resolves_on_jax():
    assert resolve_impl("fast") == "fast"
    assert ConvMixerBlock(8, 3, depthwise_impl="fast").depthwise_impl == "fast"


@jax_only
def test_xla_accepts_keras_kernel_layout_and_no_bias():
    x, kernel, _, _ = _inputs((2, 6, 5, 4), 4, "float32", seed=2)
    got = keras.ops.convert_to_numpy(depthwise_conv2d(x, kernel[..., None], None, impl="xla"))
    np.testing.assert_allclose(got, numpy_depthwise_same(x, kernel, np.zeros(4)), rtol=1e-5, atol=1e-5)


@jax_only
def test_xla_gradients_are_hand_written_without_a_convolution():
    """The point of "xla" on CPU is to avoid XLA's grouped convolution in the forward and both
    gradients; autodiff of the shifted slices would also avoid it but pads k*k cotangents."""
    import jax
    import jax.numpy as jnp

    def loss(x, kernel, bias):
        return jnp.sum(depthwise_conv2d(x, kernel, bias, impl="xla") ** 2)

    args = [jnp.zeros(s, jnp.float32) for s in ((2, 9, 9, 8), (5, 5, 8), (8,))]
    text = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(*args))
    assert "conv_general_dilated" not in text
    assert "custom_vjp_call" in text and ("while" in text or "scan" in text)  # the VJP, dkernel's row loop


@jax_only
def test_block_runs_the_resolved_impl():
    """ConvMixerBlock routes depthwise_impl="xla" to the op (no grouped convolution is traced)."""
    import jax
    import jax.numpy as jnp

    block = ConvMixerBlock(8, 5, depthwise_impl="xla")
    block.build((None, 9, 9, 8))
    text = str(jax.make_jaxpr(lambda x: block(x, training=False))(jnp.zeros((1, 9, 9, 8), jnp.float32)))
    assert "feature_group_count=8" not in text and "custom_vjp_call" in text
