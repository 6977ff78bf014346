import io
import json
import zipfile

import keras
import numpy as np
import pytest

import keras_convmixer as kc
from keras_convmixer.initializers import TorchKernelUniform, TorchUniform
from tests.helpers import to_numpy

# Every tolerance below is a 1-in-a-million sampling event or rarer.
_MISS = 1e-6
_SIGMAS = 6.0
# Var(sample variance) / variance^2 of a uniform distribution is (kurtosis - 1) / n = 0.8 / n,
# so the sample std has a relative standard error of sqrt(0.2 / n).
_UNIFORM_STD_REL_VAR = 0.2
# Torch draws are pooled until the reference max |w| is within ~2e-4 of the true bound.
_TORCH_SAMPLES = 60_000

CASES = [  # (dim, kernel_size, patch_size): the depthwise sizes the CIFAR recipes use.
    (128, 5, 2),
    (256, 9, 1),
]
CLASSES = 10
TENSORS = [
    "stem.kernel",
    "stem.bias",
    "depthwise.kernel",
    "depthwise.bias",
    "pointwise.kernel",
    "pointwise.bias",
    "head.kernel",
    "head.bias",
]


def _model(dim, kernel_size, patch_size, **kwargs):
    return kc.ConvMixer(dim, 2, kernel_size, patch_size, input_shape=(32, 32, 3), classes=CLASSES, **kwargs)


def _our_tensors(model):
    stem, block, head = model.get_layer("stem"), model.get_layer("block_1"), model.get_layer("head")
    return {
        "stem.kernel": stem.conv.kernel,
        "stem.bias": stem.conv.bias,
        "depthwise.kernel": block.depthwise.kernel,
        "depthwise.bias": block.depthwise.bias,
        "pointwise.kernel": block.pointwise.kernel,
        "pointwise.bias": block.pointwise.bias,
        "head.kernel": head.kernel,
        "head.bias": head.bias,
    }


_torch_cache = {}


def _torch_tensors(dim, kernel_size, patch_size):
    """Pooled draws of PyTorch's own defaults for the paper's modules."""
    key = (dim, kernel_size, patch_size)
    if key in _torch_cache:
        return _torch_cache[key]
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    modules = {
        "stem": nn.Conv2d(3, dim, patch_size, stride=patch_size),
        "depthwise": nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),
        "pointwise": nn.Conv2d(dim, dim, 1),
        "head": nn.Linear(dim, CLASSES),
    }
    samples = {}
    for name, module in modules.items():
        for attr, param in (("kernel", "weight"), ("bias", "bias")):
            chunks, count = [], 0
            while count < _TORCH_SAMPLES:
                module.reset_parameters()
                chunk = getattr(module, param).detach().numpy().astype(np.float64).ravel()
                chunks.append(chunk)
                count += chunk.size
            samples[f"{name}.{attr}"] = np.concatenate(chunks)
    _torch_cache[key] = samples
    return samples


def assert_same_uniform(name, ours, reference):
    """ours ~ reference's distribution, judged by bound, mean and std with sampling tolerances."""
    ours = np.asarray(ours, np.float64).ravel()
    n, m = ours.size, reference.size
    bound, sigma = np.abs(reference).max(), reference.std()
    top = np.abs(ours).max()
    # P(max |w| of n uniform draws < bound * (1 - c)) = (1 - c)^n.
    low = bound * _MISS ** (1.0 / n)
    assert low <= top <= bound * 1.001, f"{name}: max |w| {top:.5f}, PyTorch's bound {bound:.5f}"
    mean_tol = _SIGMAS * sigma * np.sqrt(1.0 / n + 1.0 / m)
    assert abs(ours.mean() - reference.mean()) <= mean_tol, (
        f"{name}: mean {ours.mean():.5f} vs PyTorch's {reference.mean():.5f}"
    )
    std_tol = _SIGMAS * sigma * np.sqrt(_UNIFORM_STD_REL_VAR * (1.0 / n + 1.0 / m))
    assert abs(ours.std() - sigma) <= std_tol, f"{name}: std {ours.std():.5f} vs PyTorch's {sigma:.5f}"


@pytest.mark.parametrize("dim, kernel_size, patch_size", CASES, ids=["d128-k5-p2", "d256-k9-p1"])
def test_default_matches_pytorch_init(dim, kernel_size, patch_size):
    reference = _torch_tensors(dim, kernel_size, patch_size)
    ours = _our_tensors(_model(dim, kernel_size, patch_size))
    for name in TENSORS:
        assert_same_uniform(name, to_numpy(ours[name]), reference[name])


@pytest.mark.parametrize("dim, kernel_size, patch_size", CASES, ids=["d128-k5-p2", "d256-k9-p1"])
def test_keras_defaults_are_told_apart_from_pytorch(dim, kernel_size, patch_size):
    # The comparison above would catch a regression to Keras's defaults in every tensor.
    reference = _torch_tensors(dim, kernel_size, patch_size)
    ours = _our_tensors(_model(dim, kernel_size, patch_size, initializer="keras"))
    for name in TENSORS:
        with pytest.raises(AssertionError):
            assert_same_uniform(name, to_numpy(ours[name]), reference[name])


def test_patch_embed_bias_counts_input_channels():
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    reference = torch.nn.Conv2d(5, 64, 3, stride=3)
    biases = []
    while sum(b.size for b in biases) < _TORCH_SAMPLES:
        reference.reset_parameters()
        biases.append(reference.bias.detach().numpy().astype(np.float64))
    layer = kc.PatchEmbed(64, 3)
    layer.build((None, 9, 9, 5))
    assert_same_uniform("bias", to_numpy(layer.conv.bias), np.concatenate(biases))
    assert_same_uniform("kernel", to_numpy(layer.conv.kernel), reference.weight.detach().numpy().astype(np.float64))


def _glorot_limit(shape):
    # Keras counts a depthwise kernel (kh, kw, C, m) like a conv kernel: fan_in = kh*kw*C, fan_out = kh*kw*m.
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
    return np.sqrt(6.0 / (fan_in + fan_out))


def test_keras_option_gives_glorot_kernels_and_zero_biases():
    model = _model(128, 5, 2, initializer="keras")
    for name, tensor in _our_tensors(model).items():
        values = to_numpy(tensor).astype(np.float64)
        if name.endswith("bias"):
            assert not values.any(), name
            continue
        limit = _glorot_limit(values.shape)
        n = values.size
        top = np.abs(values).max()
        assert limit * _MISS ** (1.0 / n) <= top <= limit * (1 + 1e-6), (name, top, limit)
        sigma = limit / np.sqrt(3.0)
        assert abs(values.std() - sigma) <= _SIGMAS * sigma * np.sqrt(_UNIFORM_STD_REL_VAR / n), name
    # The (5, 5, 128, 1) depthwise kernel: Keras's +-0.043, against PyTorch's +-0.2.
    assert _glorot_limit((5, 5, 128, 1)) == pytest.approx(0.043, abs=5e-4)

    # Exactly what a plain Keras layer would do, not a look-alike.
    stem, block, head = model.get_layer("stem"), model.get_layer("block_0"), model.get_layer("head")
    for ours, plain, attrs in [
        (stem.conv, keras.layers.Conv2D(1, 1), ("kernel_initializer", "bias_initializer")),
        (block.pointwise, keras.layers.Conv2D(1, 1), ("kernel_initializer", "bias_initializer")),
        (block.depthwise, keras.layers.DepthwiseConv2D(3), ("depthwise_initializer", "bias_initializer")),
        (head, keras.layers.Dense(1), ("kernel_initializer", "bias_initializer")),
    ]:
        for attr in attrs:
            assert type(getattr(ours, attr)) is type(getattr(plain, attr)), (ours.name, attr)


def test_batchnorm_starts_at_identity():
    for scheme in ("torch", "keras"):
        model = _model(16, 3, 2, initializer=scheme)
        for layer in model._flatten_layers(include_self=False, recursive=True):
            if isinstance(layer, keras.layers.BatchNormalization):
                np.testing.assert_array_equal(to_numpy(layer.gamma), 1.0)
                np.testing.assert_array_equal(to_numpy(layer.beta), 0.0)


def test_every_layer_gets_its_own_draw_and_seeding_repeats_it():
    model = _model(32, 3, 2)
    first = to_numpy(model.get_layer("block_0").depthwise.kernel)
    second = to_numpy(model.get_layer("block_1").depthwise.kernel)
    assert not np.allclose(first, second)
    keras.utils.set_random_seed(0)
    again = _model(32, 3, 2)
    for a, b in zip(model.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_initializers_serialize_and_repeat_with_seed():
    for initializer, shape in [
        (TorchUniform(fan_in=81, seed=3), (256,)),
        (TorchKernelUniform("depthwise", seed=4), (9, 9, 256, 1)),
        (TorchKernelUniform("conv", seed=5), (2, 2, 3, 64)),
        (TorchKernelUniform("dense", seed=6), (64, 10)),
    ]:
        config = keras.initializers.serialize(initializer)
        assert config["registered_name"] == f"keras_convmixer>{type(initializer).__name__}"
        clone = keras.initializers.deserialize(json.loads(json.dumps(config)))
        assert clone.get_config() == initializer.get_config()
        np.testing.assert_array_equal(to_numpy(clone(shape)), to_numpy(initializer(shape)))
    bound = 1 / np.sqrt(81)
    assert np.abs(to_numpy(TorchUniform(81, seed=1)((10_000,)))).max() <= bound


@pytest.mark.parametrize(
    "layer",
    [kc.PatchEmbed(8, 2, initializer="keras"), kc.ConvMixerBlock(8, 3, initializer="keras")],
    ids=["PatchEmbed", "ConvMixerBlock"],
)
def test_layer_config_keeps_initializer_and_old_configs_load(layer):
    config = layer.get_config()
    assert config["initializer"] == "keras"
    clone = type(layer).from_config(config)
    assert clone.initializer == "keras"
    old = {k: v for k, v in config.items() if k != "initializer"}
    assert type(layer).from_config(old).initializer == "torch"


def _rewrite_keras_file(path, edit):
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    edit(config)
    members["config.json"] = json.dumps(config).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    path.write_bytes(buffer.getvalue())


def _drop_initializer_keys(node):
    if isinstance(node, dict):
        node.pop("initializer", None)
        for value in node.values():
            _drop_initializer_keys(value)
    elif isinstance(node, list):
        for value in node:
            _drop_initializer_keys(value)


@pytest.mark.parametrize("scheme", ["torch", "keras"])
def test_keras_file_round_trip_and_files_from_before_the_option(tmp_path, scheme):
    model = kc.ConvMixer(8, 2, 3, 2, input_shape=(8, 8, 3), classes=3, initializer=scheme)
    x = np.random.default_rng(5).uniform(0, 255, size=(2, 8, 8, 3)).astype("float32")
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.get_layer("block_1").initializer == scheme
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(model(x)), atol=1e-6)

    # Files written before the option existed have no "initializer" in their layer configs.
    _rewrite_keras_file(path, _drop_initializer_keys)
    with zipfile.ZipFile(path) as archive:
        assert b'"initializer"' not in archive.read("config.json")
    old = keras.saving.load_model(path)
    np.testing.assert_allclose(to_numpy(old(x)), to_numpy(model(x)), atol=1e-6)


@pytest.mark.parametrize(
    "call",
    [
        lambda: kc.ConvMixer(8, 1, 3, 2, initializer="pytorch"),
        lambda: kc.get_model("convmixer_256_8", initializer="Torch"),
        lambda: kc.PatchEmbed(8, 2, initializer="he_uniform"),
        lambda: kc.ConvMixerBlock(8, 3, initializer=None),
    ],
    ids=["ConvMixer", "get_model", "PatchEmbed", "ConvMixerBlock"],
)
def test_unknown_initializer_is_a_clear_value_error(call):
    with pytest.raises(ValueError, match=r"^initializer must be one of \('torch', 'keras'\), got .+\.$"):
        call()


def test_initializer_argument_errors():
    with pytest.raises(ValueError, match=r"fan_in must be a positive integer, got 0"):
        TorchUniform(fan_in=0)
    with pytest.raises(ValueError, match=r"layout must be one of \('conv', 'depthwise', 'dense'\), got 'conv1d'"):
        TorchKernelUniform("conv1d")
    with pytest.raises(ValueError, match=r"A 'dense' kernel has rank 2, got shape \(3, 3, 8, 8\)"):
        TorchKernelUniform("dense")((3, 3, 8, 8))
