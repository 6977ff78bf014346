"""timm/official checkpoint conversion against an independent PyTorch ConvMixer."""

import argparse
import json
import shutil
import sys

import keras
import numpy as np
import pytest

import keras_convmixer as kc
from benchmarks import compare_timm
from keras_convmixer import conversion, convert, presets
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
    config = conversion.convert_checkpoint(ckpt, out, activation=act, image_size=size)
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


def test_export_state_gives_the_checkpoint_back(converted):
    # The inverse mapping, which the weights cache stores a saved model's weights with: timm's own tensors.
    model = keras.saving.load_model(converted["out"] / "model.keras")
    exported = convert.export_state(model)
    reference = {k: v.numpy() for k, v in converted["reference"].state_dict().items()}
    assert set(exported) == {k for k in reference if not k.endswith("num_batches_tracked")}
    for name, value in exported.items():
        np.testing.assert_array_equal(value, reference[name], err_msg=name)


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
    model, arch = conversion.build_from_checkpoint(path, image_size=size)
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
    config = convert.convert_backbone_config(_fake_shapes(*arch))
    assert (config["dim"], config["depth"], config["kernel_size"], config["patch_size"], config["classes"]) == arch
    assert config["variant"] == variant
    assert config["activation"] == activation


def test_variant_name_is_checked_against_shapes():
    shapes = _fake_shapes(1024, 20, 9, 14, 1000)
    infer = convert.convert_backbone_config
    assert infer(shapes, variant="convmixer_1024_20_ks9_p14")["variant"] == "convmixer_1024_20"
    # Hugging Face's timm repositories add a pretrained tag to the name.
    assert infer(shapes, variant="convmixer_1024_20_ks9_p14.in1k")["variant"] == "convmixer_1024_20"
    with pytest.raises(convert.CheckpointError, match="Unknown model 'convmixer_9_9'"):
        convert.convert_backbone_config(shapes, variant="convmixer_9_9")
    with pytest.raises(convert.CheckpointError, match="not convmixer_768_32"):
        convert.convert_backbone_config(shapes, variant="convmixer_768_32")


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
        conversion.build_from_checkpoint(tmp_path / "not_read.safetensors", image_size=image_size)


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        convert.read_checkpoint(tmp_path / "nope.safetensors")
    other = tmp_path / "weights.npz"
    other.write_bytes(b"x")
    with pytest.raises(convert.CheckpointError, match="Unknown checkpoint type"):
        convert.read_checkpoint(other)


def test_compare_timm_script_on_a_timm_layout_stand_in(monkeypatch):
    """Runs benchmarks/compare_timm.py's comparison with our spec-written torch model standing in for timm, so
    that it is checked where timm is not installed; where it is, tests/test_convert_timm.py runs real timm."""
    import types

    def create_model(name, pretrained=False):
        assert name == "convmixer_256_8" and not pretrained
        return timm_convmixer(256, 8, 5, 2, 10, "gelu", normalize=False)

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    result = compare_timm.compare_one("convmixer_256_8", batch_size=2, image_size=32)
    assert result["detected"] == dict(dim=256, depth=8, kernel_size=5, patch_size=2, classes=10, activation="gelu")
    assert result["max_abs_diff"] < 1e-4
    assert result["same_top1"]


def test_conversion_refuses_a_directory_with_a_config(converted, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"model": "a training run"}')
    with pytest.raises(ValueError, match="already holds a config.json"):
        conversion.convert_checkpoint(converted["ckpt"], run)
    assert (run / "config.json").read_text() == '{"model": "a training run"}'


def test_conversion_refuses_an_output_that_is_or_lies_under_a_file(converted, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for output, says in (
        (tmp_path / "notes.txt", "is a file, not a folder"),
        (tmp_path / "notes.txt" / "converted", f"is under '{tmp_path / 'notes.txt'}', a file, not a folder"),
    ):
        with pytest.raises(ValueError) as err:
            conversion.convert_checkpoint(converted["ckpt"], output)
        assert says in str(err.value) and "\n" not in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("timm_name", ["convmixer_768_32", "convmixer_1536_20", "convmixer_1024_20_ks9_p14", None])
def test_converted_eval_transform_is_timms(timm_name):
    from tests.vision_reference import vision_or_skip

    _, _, timm = vision_or_skip()
    # A checkpoint whose shapes match no variant gets the transform timm gives all its ConvMixers.
    cfg = timm.models.get_pretrained_cfg(timm_name or "convmixer_768_32")
    variant = presets.canonical_name(timm_name) if timm_name else None
    preset = presets.eval_transform(variant)
    assert (preset["crop_pct"], preset["interpolation"]) == (cfg.crop_pct, cfg.interpolation)
    assert (tuple(preset["mean"]), tuple(preset["std"])) == (tuple(cfg.mean), tuple(cfg.std))
    assert preset["image_size"] == cfg.input_size[-1]


# ---------------------------------------------------------------- CIFAR shapes, normalisation flags, EMA weights


def _cifar_checkpoint(path, seed=0):
    """A checkpoint shaped like convmixer_256_8 (what the CIFAR script trains). Its BatchNorm statistics come from a
    train-mode pass: random ones leave a random-init model's logits blind to the input, and so to its
    normalisation."""
    torch.manual_seed(seed)
    model = timm_convmixer(256, 8, 5, 2, 10, "gelu")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for module in norms:
            module.momentum = None
        model.train()
        model(torch.randn(8, 3, 32, 32))
        for module in norms:
            module.running_var.clamp_(min=1e-2)
    return _save_timm(model.eval(), path)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cifar")
    ckpt = _cifar_checkpoint(tmp / "model.safetensors")
    out = tmp / "out"
    config = conversion.convert_checkpoint(ckpt, out)
    return dict(ckpt=ckpt, out=out, config=config)


def test_a_cifar_checkpoint_loads_the_same_both_documented_ways(cifar):
    from keras_convmixer.presets import CIFAR10_MEAN, CIFAR10_STD

    config = json.loads((cifar["out"] / "config.json").read_text())
    assert config["model"] == "convmixer_256_8"
    assert (config["mean"], config["std"]) == (list(CIFAR10_MEAN), list(CIFAR10_STD))
    assert (config["crop_pct"], config["image_size"]) == (1.0, 32)
    images = _images(32, n=2, seed=3)
    from_keras = keras.saving.load_model(cifar["out"] / "model.keras")
    from_builder = kc.ConvMixer256_8(weights=str(cifar["out"] / "model.weights.h5"), classifier_activation=None)
    expected = keras.ops.convert_to_numpy(from_keras(images, training=False))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(from_builder(images, training=False)), expected, atol=1e-5, rtol=0
    )
    # Both normalise with CIFAR's statistics: a model normalising with ImageNet's gives other logits.
    imagenet_normalised = kc.ConvMixer(
        256,
        8,
        5,
        2,
        classes=10,
        input_shape=(32, 32, 3),
        classifier_activation=None,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        weights=str(cifar["out"] / "model.weights.h5"),
    )
    assert np.abs(keras.ops.convert_to_numpy(imagenet_normalised(images, training=False)) - expected).max() > 1e-3


def _cli(capsys, *argv):
    from keras_convmixer.cli import convert as convert_cli

    try:
        code = convert_cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_a_converted_keras_file_alone_carries_its_eval_transform(cifar, tmp_path):
    from keras_convmixer.artifacts import open_model

    # Settings no variant has, so that only the file itself can be where they come from.
    mean, std, names = [0.25, 0.5, 0.75], [0.2, 0.3, 0.4], [f"kind {i}" for i in range(10)]
    conversion.convert_checkpoint(cifar["ckpt"], tmp_path / "out", image_size=40, mean=mean, std=std, class_names=names)
    alone = tmp_path / "copied.keras"  # no config.json beside it
    shutil.copy(tmp_path / "out" / "model.keras", alone)
    config = open_model(alone).config
    assert (config["model"], config["image_size"], config["num_classes"]) == ("convmixer_256_8", 40, 10)
    assert (list(config["mean"]), list(config["std"]), config["class_names"]) == (mean, std, names)


def test_cli_image_size_defaults_to_the_variants_and_says_so(cifar, tmp_path, capsys):
    code, out, _ = _cli(capsys, cifar["ckpt"], "--output", tmp_path / "out")
    assert code == 0
    assert "image size   32 (the variant's default)" in out
    assert "ACTIVATION   GELU (inferred from the variant convmixer_256_8" in out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["image_size"] == 32


def test_cli_mean_std_override_is_recorded_and_applied(cifar, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, _ = _cli(capsys, cifar["ckpt"], "--output", out_dir, "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.5")
    assert code == 0 and "(--mean/--std)" in out
    config = json.loads((out_dir / "config.json").read_text())
    assert (config["mean"], config["std"]) == ([0.5, 0.5, 0.5], [0.25, 0.25, 0.5])
    assert config["conversion"]["normalization_from"] == "given"
    # Applied: the saved model equals the builder given those statistics, not CIFAR's.
    images = _images(32, n=2, seed=4)
    got = keras.ops.convert_to_numpy(keras.saving.load_model(out_dir / "model.keras")(images, training=False))
    given = kc.ConvMixer256_8(
        weights=str(out_dir / "model.weights.h5"), classifier_activation=None, mean=(0.5,) * 3, std=(0.25, 0.25, 0.5)
    )
    np.testing.assert_allclose(keras.ops.convert_to_numpy(given(images, training=False)), got, atol=1e-5, rtol=0)
    default = keras.saving.load_model(cifar["out"] / "model.keras")
    assert np.abs(keras.ops.convert_to_numpy(default(images, training=False)) - got).max() > 1e-3


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--mean", "0.5,0.5", "expected 3 comma-separated numbers"),
        ("--mean", "124,116,104", "not 0-255"),
        ("--std", "a,b,c", "expected 3 comma-separated numbers"),
        ("--std", "0,0.2,0.2", "std must be 3 numbers in (0, 1]"),
    ],
)
def test_cli_bad_mean_std_is_one_line_and_exit_2(cifar, tmp_path, capsys, flag, value, message):
    code, _, err = _cli(capsys, cifar["ckpt"], "--output", tmp_path / "out", flag, value)
    assert code == 2
    assert message in err and flag.lstrip("-") in err
    # argparse's usage, then the one error line
    assert err.strip().splitlines()[-1].startswith("__main__.py: error: argument " + flag) or message in err
    assert sum("error" in line for line in err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def _ema_pth(path):
    """A training checkpoint holding different state_dict and state_dict_ema; returns their torch models."""
    plain = timm_convmixer(*CONFIGS["gelu"][:6])
    ema = timm_convmixer(*CONFIGS["gelu"][:6])
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.05)
    torch.save({"epoch": 9, "state_dict": plain.state_dict(), "state_dict_ema": ema.state_dict()}, path)
    return plain, ema


def test_cli_takes_state_dict_by_default_and_the_ema_with_use_ema(tmp_path, capsys):
    size = CONFIGS["gelu"][-1]
    plain, ema = _ema_pth(tmp_path / "train.pth.tar")
    images = _images(size, n=2, seed=5)
    for flags, reference, taken in (([], plain, "'state_dict'"), (["--use-ema"], ema, "'state_dict_ema'")):
        out_dir = tmp_path / ("ema" if flags else "plain")
        code, out, _ = _cli(capsys, tmp_path / "train.pth.tar", "--output", out_dir, "--image-size", size, *flags)
        assert code == 0
        assert f"weights      {taken}" in out
        model = keras.saving.load_model(out_dir / "model.keras")
        got = keras.ops.convert_to_numpy(model(images, training=False))
        np.testing.assert_allclose(got, torch_logits(reference, images), atol=1e-4, rtol=1e-4)
        assert json.loads((out_dir / "config.json").read_text())["conversion"]["use_ema"] == bool(flags)
    assert "--use-ema takes them" in _cli(capsys, tmp_path / "train.pth.tar", "--output", tmp_path / "x")[1]


def test_use_ema_on_a_file_without_ema_is_one_line(converted, tmp_path, capsys):
    pth = tmp_path / "plain.pth"
    torch.save({"state_dict": converted["reference"].state_dict()}, pth)
    with pytest.raises(convert.CheckpointError, match="has no EMA weights"):
        convert.read_checkpoint(pth, use_ema=True)
    for path in (pth, converted["ckpt"]):
        code, _, err = _cli(capsys, path, "--output", tmp_path / "out", "--use-ema")
        assert code == 2 and "EMA" in err
        assert len(err.strip().splitlines()) == 1
