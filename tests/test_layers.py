import keras
import numpy as np
import pytest

from keras_convmixer import ConvMixerBlock, PatchEmbed
from tests.helpers import randomize_batchnorm
from tests.numpy_reference import depthwise_same, gelu, patch_conv, relu


def _bn(layer):
    return [np.asarray(w, np.float64) for w in layer.get_weights()]


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_patch_embed_matches_numpy(activation):
    layer = PatchEmbed(8, 3, activation=activation)
    x = np.random.default_rng(1).normal(size=(2, 9, 12, 3)).astype("float32")
    layer.build(x.shape)
    randomize_batchnorm(layer)
    got = keras.ops.convert_to_numpy(layer(x, training=False))

    act = {"gelu": gelu, "relu": relu}[activation]
    kernel, bias = (np.asarray(w, np.float64) for w in layer.conv.get_weights())
    gamma, beta, mean, var = _bn(layer.bn)
    want = act(patch_conv(x.astype(np.float64), kernel, bias))
    want = (want - mean) / np.sqrt(var + 1e-5) * gamma + beta
    assert got.shape == (2, 3, 4, 8)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("kernel_size", [3, 4])
def test_block_matches_numpy_and_keeps_residual_on_depthwise_only(kernel_size):
    block = ConvMixerBlock(6, kernel_size)
    x = np.random.default_rng(2).normal(size=(2, 7, 5, 6)).astype("float32")
    block.build(x.shape)
    randomize_batchnorm(block)
    got = keras.ops.convert_to_numpy(block(x, training=False))

    x64 = x.astype(np.float64)
    dw_k, dw_b = (np.asarray(w, np.float64) for w in block.depthwise.get_weights())
    pw_k, pw_b = (np.asarray(w, np.float64) for w in block.pointwise.get_weights())
    g, b, m, v = _bn(block.dw_bn)
    y = x64 + (gelu(depthwise_same(x64, dw_k, dw_b)) - m) / np.sqrt(v + 1e-5) * g + b
    g, b, m, v = _bn(block.pw_bn)
    want = (gelu(y @ pw_k[0, 0] + pw_b) - m) / np.sqrt(v + 1e-5) * g + b
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_batchnorm_defaults_match_pytorch():
    block = ConvMixerBlock(4, 3)
    for bn in (block.dw_bn, block.pw_bn, PatchEmbed(4, 2).bn):
        assert bn.momentum == pytest.approx(0.9)
        assert bn.epsilon == pytest.approx(1e-5)
    custom = ConvMixerBlock(4, 3, bn_momentum=0.99, bn_epsilon=1e-3)
    assert custom.dw_bn.momentum == pytest.approx(0.99)
    assert custom.pw_bn.epsilon == pytest.approx(1e-3)


def test_gelu_is_exact_erf_form():
    layer = PatchEmbed(1, 1)
    x = np.linspace(-4, 4, 81)
    got = keras.ops.convert_to_numpy(layer._act(keras.ops.convert_to_tensor(x, "float32")))
    np.testing.assert_allclose(got, gelu(x), atol=1e-6)
    # The tanh approximation differs by ~1e-3 around |x| = 2: make sure we are not it.
    tanh_form = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    assert np.max(np.abs(got - tanh_form)) > 1e-4


@pytest.mark.parametrize(
    "layer",
    [
        PatchEmbed(16, 4, activation="relu", bn_momentum=0.8, bn_epsilon=1e-4, name="stem"),
        ConvMixerBlock(16, 7, activation="gelu", bn_momentum=0.95, name="block_3"),
    ],
    ids=["PatchEmbed", "ConvMixerBlock"],
)
def test_config_round_trip(layer):
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    x = np.random.default_rng(3).uniform(size=(1, 8, 8, 16 if isinstance(layer, ConvMixerBlock) else 3))
    layer.build(x.shape)
    clone.build(x.shape)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(clone(x, training=False)),
        keras.ops.convert_to_numpy(layer(x, training=False)),
        atol=1e-6,
    )
    # Registered under our package, so .keras files find the classes.
    assert keras.saving.get_registered_name(type(layer)) == f"keras_convmixer>{type(layer).__name__}"


def test_sublayer_names_are_stable():
    block = ConvMixerBlock(4, 3, name="block_0")
    block.build((None, 8, 8, 4))
    names = sorted({v.path.split("/")[-2] for v in block.weights})
    assert names == ["depthwise", "dw_bn", "pointwise", "pw_bn"]
    stem = PatchEmbed(4, 2, name="stem")
    stem.build((None, 8, 8, 3))
    assert sorted({v.path.split("/")[-2] for v in stem.weights}) == ["bn", "conv"]


def test_patch_size_must_divide_input():
    with pytest.raises(ValueError, match=r"height 30 is not divisible by the patch size 7"):
        PatchEmbed(8, 7).build((None, 30, 28, 3))
    with pytest.raises(ValueError, match=r"width 10 is not divisible by the patch size 4"):
        PatchEmbed(8, 4).build((None, 8, 10, 3))


def test_block_rejects_channel_mismatch():
    with pytest.raises(ValueError, match="8 channels"):
        ConvMixerBlock(4, 3).build((None, 8, 8, 8))


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown activation 'swishy'"):
        ConvMixerBlock(4, 3, activation="swishy")
