"""The three released ConvMixers, built by the real timm package, converted through the command line and checked
against timm's own logits: float32 on every backend, and float64 (under TensorFlow) for all three, which shows the
mapping exact where float32 rounding through 20-32 blocks cannot."""

import contextlib
import copy
import shutil

import keras
import numpy as np
import pytest

from keras_convmixer.cli import convert as convert_cli
from keras_convmixer.models import BUILDERS
from keras_convmixer.presets import IMAGENET_MEAN, IMAGENET_STD, MODEL_CONFIGS, canonical_name
from tests.vision_reference import vision_or_skip

# timm's name -> image side: 6 x 6 tokens, so that the 9 x 9 depthwise kernels use every tap (a 4 x 4 map leaves
# the outer ring of the kernel on padding) while the forward passes stay cheap on a CPU.
MODELS = {
    "convmixer_1536_20": 42,
    "convmixer_768_32": 42,
    "convmixer_1024_20_ks9_p14": 84,
}
GELU_FLOAT32_ATOL = 1e-4
# The 32-block ReLU model's logits reach hundreds here, and float32 rounding grows through its depth: torch's own
# float32 is ~4e-5 of the largest logit off its float64 result. So the bound is relative to that logit, and only
# float64 below shows the mapping exact.
RELU_FLOAT32_RTOL = 2e-4
VARIANCE_FLOOR = 1e-2
FLOAT64_ATOL = 1e-9
# Keras 3.15's BatchNormalization computes a float64 layer with float32-level error on the torch and JAX backends
# (2.6e-7 off an exact float64 BN in one stem), and its Normalization layer rounds the mean to float32 on TensorFlow
# (7e-8): the mapping is checked where BN is exact, on input normalised in float64 by the test itself.
FLOAT64_BACKEND = "tensorflow"


def structured_images(size, n=3):
    """Gradients, a checkerboard, rings and bars in [0, 255]: image-like input, not pure noise."""
    y, x = np.mgrid[0:size, 0:size].astype("float64") / (size - 1)
    gradient = np.stack([255 * x, 255 * y, 255 * (1 - x) * y], -1)
    checker = ((np.floor(x * 6) + np.floor(y * 6)) % 2)[..., None] * np.array([230.0, 40.0, 120.0]) + 10
    radius = np.hypot(x - 0.4, y - 0.6)
    rings = np.stack([127.5 * (1 + np.cos(radius * 30)), 200 * (radius < 0.3), 255 * radius / radius.max()], -1)
    bars = np.stack([255 * (np.sin(x * 15) > 0), 128 + 100 * np.sin(y * 9), np.full_like(x, 64.0)], -1)
    return np.stack([gradient, checker, rings, bars][:n]).round().astype("float32")


def _timm_model(torch, timm, name, pixels, seed=0):
    """timm's model with BatchNorm that is not the identity: random affine parameters, running statistics from
    one train-mode pass over the test images, then perturbed by a few percent (more, and float32 rounding grows
    past 1e-3 through 20 blocks). Statistics set at random instead leave a random-init ConvMixer's logits
    independent of the input (each block shrinks the signal that the biases then drown), and channels
    whose gathered variance is ~0 get a floor: there eps would turn rounding-level differences into large ones."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for module in norms:
            c = module.num_features
            module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
            module.bias.copy_(torch.randn(c, generator=generator) * 0.1)
            module.momentum = None  # running statistics = this batch's
        model.train()
        model(torch.from_numpy(_normalised(pixels)).float())
        for module in norms:
            # Then perturbed, so that no BN is exactly the batch's normalisation either.
            c = module.num_features
            module.running_mean.add_(0.02 * module.running_var.sqrt() * torch.randn(c, generator=generator))
            module.running_var.mul_(torch.rand(c, generator=generator) * 0.1 + 0.95)
            module.running_var.clamp_(min=VARIANCE_FLOOR)
            module.momentum = 0.1
    return model.eval()


def _normalised(pixels):
    # timm takes normalised NCHW input; our models take [0, 255] pixels and normalise inside.
    mean = 255 * np.asarray(IMAGENET_MEAN, "float64")
    std = 255 * np.asarray(IMAGENET_STD, "float64")
    return np.ascontiguousarray(((pixels.astype("float64") - mean) / std).transpose(0, 3, 1, 2))


def _timm_logits(torch, model, pixels, dtype):
    with torch.no_grad():
        return model(torch.from_numpy(_normalised(pixels)).to(dtype)).double().numpy()


@pytest.fixture(scope="module", params=sorted(MODELS))
def converted(request, tmp_path_factory):
    """One timm model per parameter, built once for the module: building one takes tens of seconds on a CPU."""
    torch, _, timm = vision_or_skip()
    from safetensors.torch import save_file

    name, size = request.param, MODELS[request.param]
    pixels = structured_images(size)
    reference = _timm_model(torch, timm, name, pixels)
    tmp = tmp_path_factory.mktemp(name)
    # As timm's hub files are made: the state dict as it is, saved with safetensors.
    save_file(reference.state_dict(), str(tmp / "model.safetensors"))
    out = tmp / "converted"
    code = convert_cli.main([str(tmp / "model.safetensors"), "--output", str(out), "--image-size", str(size)])
    assert code == 0
    result = dict(
        name=name,
        variant=canonical_name(name),
        out=out,
        size=size,
        pixels=pixels,
        float32=_timm_logits(torch, reference, pixels, torch.float32),
        float64=None,
    )
    if keras.backend.backend() == FLOAT64_BACKEND:
        result["float64"] = _timm_logits(torch, copy.deepcopy(reference).double(), pixels, torch.float64)
    del reference
    yield result
    shutil.rmtree(tmp, ignore_errors=True)  # hundreds of MB per model


def test_converted_model_keras_matches_timm_in_float32(converted):
    model = keras.saving.load_model(converted["out"] / "model.keras")
    got = keras.ops.convert_to_numpy(model(converted["pixels"], training=False)).astype("float64")
    expected = converted["float32"]
    assert np.abs(expected).max() > 0.1  # not a degenerate all-zero comparison
    assert np.ptp(expected, axis=0).max() > 0.1  # the images give different logits: the input reaches the head
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    if MODEL_CONFIGS[converted["variant"]]["activation"] == "relu":
        np.testing.assert_allclose(got, expected, atol=RELU_FLOAT32_RTOL * np.abs(expected).max(), rtol=0)
    else:
        np.testing.assert_allclose(got, expected, atol=GELU_FLOAT32_ATOL, rtol=0)


@contextlib.contextmanager
def _float64():
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)


def test_converted_weights_match_timm_in_float64(converted):
    if keras.backend.backend() != FLOAT64_BACKEND:
        pytest.skip(f"float64 equivalence runs under KERAS_BACKEND={FLOAT64_BACKEND}")
    with _float64():
        # The variant's builder, as a user loads a conversion; the file's float32 values are exact in float64.
        model = BUILDERS[converted["variant"]](
            weights=str(converted["out"] / "model.weights.h5"),
            input_shape=(converted["size"], converted["size"], 3),
            include_preprocessing=False,
            classifier_activation=None,
        )
        normalised = _normalised(converted["pixels"]).transpose(0, 2, 3, 1)
        got = keras.ops.convert_to_numpy(model(normalised, training=False))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, converted["float64"], atol=FLOAT64_ATOL, rtol=0)
