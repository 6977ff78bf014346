"""timm/official checkpoint conversion against an independent PyTorch ConvMixer."""

import argparse
import json
import sys

import keras
import numpy as np
import pytest

import keras_convmixer as kc
from benchmarks import compare_timm
from keras_convmixer import convert
from tests.torch_reference import official_convmixer, timm_convmixer, torch_logits

torch = pytest.importorskip("torch", reason="the PyTorch reference model needs torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

# (dim, depth, kernel, patch, classes, activation, image size); the ReLU one has an even kernel,
# where "same" padding is asymmetric.
CONFIGS = {
    "gelu": (16, 2, 3, 4, 7, "gelu", 24),
    "relu": (12, 2, 4, 3, 5, "relu", 21),
}


def _images(size, n=3, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def _save_timm(model, path):
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors_torch.save_file(state, str(path))
    return path


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
    dim, depth, kernel, patch, classes, act, size = CONFIGS[request.param]
    reference = timm_convmixer(dim, depth, kernel, patch, classes, act)
    tmp = tmp_path_factory.mktemp(f"convert_{request.param}")
    ckpt = _save_timm(reference, tmp / "model.safetensors")
    out = tmp / "out"
    config = convert.convert_checkpoint(ckpt, out, activation=act, image_size=size)
    return dict(reference=reference, ckpt=ckpt, out=out, config=config, size=size, act=act, classes=classes)


def test_converted_keras_model_matches_torch_logits(converted):
    images = _images(converted["size"])
    expected = torch_logits(converted["reference"], images)
    model = keras.saving.load_model(converted["out"] / "model.keras")
    got = keras.ops.convert_to_numpy(model(images, training=False))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert np.abs(expected).max() > 0.1  # not a degenerate all-zero comparison


def test_converted_weights_load_into_builder(converted):
    config = converted["config"]["model_kwargs"]
    model = kc.ConvMixer(
        config["dim"],
        config["depth"],
        config["kernel_size"],
        config["patch_size"],
        activation=converted["act"],
        classes=config["classes"],
        input_shape=(converted["size"], converted["size"], 3),
        weights=str(converted["out"] / "model.weights.h5"),
    )
    images = _images(converted["size"], seed=1)
    logits = torch_logits(converted["reference"], images)
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    got = keras.ops.convert_to_numpy(model(images, training=False))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_converted_config_is_a_run_dir(converted):
    config = json.loads((converted["out"] / "config.json").read_text())
    # No named variant has these shapes: timm's eval transform for its ConvMixers, as timm's configs give it.
    assert (config["crop_pct"], config["interpolation"]) == (0.96, "bicubic")
    assert config["mean"] == [0.485, 0.456, 0.406] and config["std"] == [0.229, 0.224, 0.225]
    assert config["num_classes"] == converted["classes"]
    assert config["class_names"] == [f"class_{i}" for i in range(converted["classes"])]
    assert config["image_size"] == converted["size"]
    assert config["model_kwargs"]["activation"] == converted["act"]


def test_official_pth_tar_with_wrapper_and_module_prefix(tmp_path):
    dim, depth, kernel, patch, classes, act, size = CONFIGS["gelu"]
    full, body = official_convmixer(dim, depth, kernel, patch, classes, act)
    state = {f"module.{k}": v for k, v in body.state_dict().items()}
    path = tmp_path / "convmixer_tiny.pth.tar"
    torch.save({"epoch": 3, "state_dict": state, "args": argparse.Namespace(lr=0.01)}, path)
    model, arch = convert.build_from_checkpoint(path, image_size=size)
    assert (arch["dim"], arch["depth"], arch["kernel_size"], arch["patch_size"], arch["classes"]) == CONFIGS["gelu"][:5]
    images = _images(size, seed=2)
    got = keras.ops.convert_to_numpy(model(images, training=False))
    np.testing.assert_allclose(got, torch_logits(full, images), atol=1e-4, rtol=1e-4)


def _fake_shapes(dim, depth, kernel, patch, classes):
    shapes = {"stem.0.weight": (dim, 3, patch, patch), "stem.0.bias": (dim,), "head.weight": (classes, dim)}
    for i in range(depth):
        shapes[f"blocks.{i}.0.fn.0.weight"] = (dim, 1, kernel, kernel)
        shapes[f"blocks.{i}.1.weight"] = (dim, dim, 1, 1)
    return shapes


@pytest.mark.parametrize(
    "arch, variant, activation",
    [
        ((768, 32, 7, 7, 1000), "convmixer_768_32", "relu"),
        ((1536, 20, 9, 7, 1000), "convmixer_1536_20", "gelu"),
        ((1024, 20, 9, 14, 1000), "convmixer_1024_20", "gelu"),
        ((64, 3, 5, 2, 10), None, "gelu"),
    ],
)
def test_config_inferred_from_shapes_and_activation_from_variant(arch, variant, activation):
    config = convert.infer_config(_fake_shapes(*arch))
    assert (config["dim"], config["depth"], config["kernel_size"], config["patch_size"], config["classes"]) == arch
    assert config["variant"] == variant
    assert config["activation"] == activation


def test_variant_name_is_checked_against_shapes():
    shapes = _fake_shapes(1024, 20, 9, 14, 1000)
    assert convert.infer_config(shapes, variant="convmixer_1024_20_ks9_p14")["variant"] == "convmixer_1024_20"
    # Hugging Face's timm repositories add a pretrained tag to the name.
    assert convert.infer_config(shapes, variant="convmixer_1024_20_ks9_p14.in1k")["variant"] == "convmixer_1024_20"
    with pytest.raises(convert.CheckpointError, match="Unknown model 'convmixer_9_9'"):
        convert.infer_config(shapes, variant="convmixer_9_9")
    with pytest.raises(convert.CheckpointError, match="not convmixer_768_32"):
        convert.infer_config(shapes, variant="convmixer_768_32")


def test_truncated_safetensors_gives_clear_error(converted, tmp_path):
    data = converted["ckpt"].read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(convert.CheckpointError, match="truncated or corrupt"):
        convert.read_checkpoint(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(convert.CheckpointError, match="truncated or corrupt"):
        convert.read_checkpoint(garbage)


def test_truncated_pth_gives_clear_error(tmp_path):
    path = tmp_path / "model.pth.tar"
    torch.save({"state_dict": {"stem.0.weight": torch.zeros(8, 3, 2, 2)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(convert.CheckpointError, match="truncated or corrupt"):
        convert.read_checkpoint(path)


def test_mismatched_tensor_is_named(converted, tmp_path):
    state = convert.read_checkpoint(converted["ckpt"])
    dim = state["blocks.1.1.weight"].shape[0]
    state["blocks.1.1.weight"] = np.zeros((dim, dim + 1, 1, 1), "float32")
    model = kc.ConvMixer(
        dim,
        2,
        state["blocks.0.0.fn.0.weight"].shape[-1],
        state["stem.0.weight"].shape[-1],
        classes=converted["classes"],
        input_shape=(converted["size"],) * 2 + (3,),
    )
    with pytest.raises(convert.CheckpointError, match=r"'blocks\.1\.1\.weight'.*block_1/pointwise/kernel"):
        convert.load_state_dict(model, state)
    del state["blocks.1.1.weight"]
    with pytest.raises(convert.CheckpointError, match=r"missing tensor 'blocks\.1\.1\.weight'"):
        convert.load_state_dict(model, state)


def test_builder_names_mismatching_tensor_in_weights_file(converted):
    # A converted file loaded into the wrong builder: Keras names the variable.
    kwargs = converted["config"]["model_kwargs"]
    with pytest.raises(ValueError, match="block_0/depthwise/kernel"):
        kc.ConvMixer(
            kwargs["dim"],
            kwargs["depth"],
            kwargs["kernel_size"] + 2,
            kwargs["patch_size"],
            classes=kwargs["classes"],
            input_shape=(converted["size"],) * 2 + (3,),
            weights=str(converted["out"] / "model.weights.h5"),
        )


def test_pth_without_torch_says_torch_is_needed(tmp_path, monkeypatch):
    path = tmp_path / "model.pth.tar"
    path.write_bytes(b"placeholder")
    monkeypatch.setitem(sys.modules, "torch", None)  # what `import torch` sees where torch is absent
    with pytest.raises(ImportError, match="needs PyTorch.*safetensors"):
        convert.read_checkpoint(path)


@pytest.mark.parametrize("image_size", [0, -32, 2.5, "224", True])
def test_a_bad_image_size_is_named_before_the_checkpoint_is_read(tmp_path, image_size):
    with pytest.raises(ValueError, match="image_size must be a positive whole number"):
        convert.build_from_checkpoint(tmp_path / "not_read.safetensors", image_size=image_size)


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        convert.read_checkpoint(tmp_path / "nope.safetensors")
    other = tmp_path / "weights.npz"
    other.write_bytes(b"x")
    with pytest.raises(convert.CheckpointError, match="Unknown checkpoint type"):
        convert.read_checkpoint(other)


def test_compare_timm_script_on_a_timm_layout_stand_in(monkeypatch):
    """Runs benchmarks/compare_timm.py's comparison with our spec-written torch model standing in for timm, so
    that it is checked where timm is not installed; where it is, the real-timm test below runs too."""
    import types

    def create_model(name, pretrained=False):
        assert name == "convmixer_256_8" and not pretrained
        return timm_convmixer(256, 8, 5, 2, 10, "gelu", normalize=False)

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    result = compare_timm.compare_one("convmixer_256_8", batch_size=2, image_size=32)
    assert result["detected"] == dict(dim=256, depth=8, kernel_size=5, patch_size=2, classes=10, activation="gelu")
    assert result["max_abs_diff"] < 1e-4
    assert result["same_top1"]


def test_a_real_timm_model_converts_exactly():
    """timm's own ConvMixer-768/32 (the released ReLU one, 21M parameters). The other two timm variants take as
    long again each on the CI's CPU: ``scripts/compare_timm.py`` checks them all."""
    from tests.vision_reference import vision_or_skip

    vision_or_skip()
    # 56 x 56 (8 x 8 tokens) keeps it to seconds on a CPU; every weight is used at any size.
    result = compare_timm.compare_one("convmixer_768_32", batch_size=1, image_size=56)
    assert result["detected"]["activation"] == "relu"
    assert result["max_abs_diff"] < 1e-3, result


def test_conversion_refuses_a_directory_with_a_config(converted, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"model": "a training run"}')
    with pytest.raises(ValueError, match="already holds a config.json"):
        convert.convert_checkpoint(converted["ckpt"], run)
    assert (run / "config.json").read_text() == '{"model": "a training run"}'


@pytest.mark.parametrize("timm_name", ["convmixer_768_32", "convmixer_1536_20", "convmixer_1024_20_ks9_p14", None])
def test_converted_eval_transform_is_timms(timm_name):
    from tests.vision_reference import vision_or_skip

    _, _, timm = vision_or_skip()
    # A checkpoint whose shapes match no variant gets the transform timm gives all its ConvMixers.
    cfg = timm.models.get_pretrained_cfg(timm_name or "convmixer_768_32")
    variant = convert._variant_key(timm_name) if timm_name else None
    preset = convert.checkpoint_eval_preset(variant)
    assert (preset["crop_pct"], preset["interpolation"]) == (cfg.crop_pct, cfg.interpolation)
    assert (tuple(preset["mean"]), tuple(preset["std"])) == (tuple(cfg.mean), tuple(cfg.std))
    assert preset["image_size"] == cfg.input_size[-1]
