import inspect
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_convmixer as kc
from keras_convmixer import presets
from tests.helpers import HIDE_TENSORFLOW, randomize_batchnorm, to_numpy
from tests.numpy_reference import convmixer_forward
from tests.vision_reference import vision_or_skip

# Published trainable parameter counts (the paper, timm) at 224x224, 1000 classes.
PUBLISHED_PARAMS = {
    "ConvMixer1536_20": 51_625_960,
    "ConvMixer768_32": 21_110_248,
    "ConvMixer1024_20": 24_383_464,
    "ConvMixer1536_24": 62_275_048,
    "ConvMixer1024_16": 19_381_224,
    "ConvMixer512_16": 5_357_544,
}


def trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize("builder_name", sorted(PUBLISHED_PARAMS))
def test_imagenet_variant_param_counts(builder_name):
    model = getattr(kc, builder_name)(input_shape=(224, 224, 3), classes=1000)
    assert trainable_count(model) == PUBLISHED_PARAMS[builder_name]


@pytest.mark.parametrize(
    "builder_name, trainable, bn_stats",
    [("ConvMixer256_8", 594_186, 8_704), ("ConvMixer256_16", 1_409_034, None)],
)
def test_cifar_variant_param_counts(builder_name, trainable, bn_stats):
    model = getattr(kc, builder_name)()
    assert model.input_shape == (None, 32, 32, 3)
    assert model.output_shape == (None, 10)
    assert trainable_count(model) == trainable
    if bn_stats is not None:
        assert model.count_params() - trainable == bn_stats


def test_variant_table_matches_paper():
    expected = {  # name: (h, d, k, p, act)
        "convmixer_1536_20": (1536, 20, 9, 7, "gelu"),
        "convmixer_768_32": (768, 32, 7, 7, "relu"),
        "convmixer_1024_20": (1024, 20, 9, 14, "gelu"),
        "convmixer_1536_24": (1536, 24, 9, 14, "gelu"),
        "convmixer_1024_16": (1024, 16, 9, 7, "gelu"),
        "convmixer_512_16": (512, 16, 8, 7, "gelu"),
        "convmixer_256_8": (256, 8, 5, 2, "gelu"),
        "convmixer_256_16": (256, 16, 9, 1, "gelu"),
    }
    assert kc.list_models() == sorted(expected)
    for name, (h, d, k, p, act) in expected.items():
        c = kc.MODEL_CONFIGS[name]
        assert (c["dim"], c["depth"], c["kernel_size"], c["patch_size"], c["activation"]) == (h, d, k, p, act)


def _reference_params(model, depth):
    def arrays(layer):
        return [np.asarray(w, np.float64) for w in layer.get_weights()]

    stem = model.get_layer("stem")
    params = {"stem": (*arrays(stem.conv), arrays(stem.bn)), "blocks": []}
    for i in range(depth):
        b = model.get_layer(f"block_{i}")
        params["blocks"].append((*arrays(b.depthwise), arrays(b.dw_bn), *arrays(b.pointwise), arrays(b.pw_bn)))
    params["head"] = tuple(arrays(model.get_layer("head")))
    return params


@pytest.mark.parametrize(
    "make_model, depth, activation, shape, mean, std",
    [
        (
            lambda: kc.ConvMixer256_8(classifier_activation=None),
            8,
            "gelu",
            (2, 32, 32, 3),
            (0.4914, 0.4822, 0.4465),
            (0.2471, 0.2435, 0.2616),
        ),
        (
            lambda: kc.ConvMixer(
                12,
                3,
                kernel_size=7,
                patch_size=3,
                activation="relu",
                input_shape=(None, None, 3),
                classes=5,
                classifier_activation=None,
            ),
            3,
            "relu",
            (3, 15, 21, 3),
            (0.485, 0.456, 0.406),
            (0.229, 0.224, 0.225),
        ),
    ],
    ids=["ConvMixer256_8", "small-k7-p3-relu"],
)
def test_logits_match_independent_numpy_forward(make_model, depth, activation, shape, mean, std):
    model = make_model()
    randomize_batchnorm(model, seed=depth)
    images = np.random.default_rng(4).uniform(0, 255, size=shape).astype("float32")
    got = to_numpy(model(images, training=False))
    want = convmixer_forward(images, _reference_params(model, depth), activation=activation, mean=mean, std=std)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_output_shapes():
    tiny = dict(dim=16, depth=2, kernel_size=3, patch_size=7, input_shape=(28, 28, 3), classes=7)
    assert kc.ConvMixer(**tiny).output_shape == (None, 7)
    assert kc.ConvMixer(**tiny, include_top=False).output_shape == (None, 4, 4, 16)
    assert kc.ConvMixer(**tiny, include_top=False, pooling="avg").output_shape == (None, 16)
    assert kc.ConvMixer(**tiny, include_top=False, pooling="max").output_shape == (None, 16)

    x = np.zeros((2, 28, 28, 3), "float32")
    out = kc.ConvMixer(**tiny, feature_extractor=True)(x)
    assert sorted(out) == ["block_0", "block_1", "stem"]
    assert all(tuple(v.shape) == (2, 4, 4, 16) for v in out.values())


def test_pooling_max_is_max_of_feature_map():
    tiny = dict(dim=8, depth=1, kernel_size=3, patch_size=2, input_shape=(8, 8, 3))
    fmap_model = kc.ConvMixer(**tiny, include_top=False)
    pooled_model = kc.ConvMixer(**tiny, include_top=False, pooling="max")
    pooled_model.set_weights(fmap_model.get_weights())
    x = np.random.default_rng(6).uniform(0, 255, size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(to_numpy(pooled_model(x)), to_numpy(fmap_model(x)).max(axis=(1, 2)), atol=1e-6)


def test_variable_input_size():
    model = kc.ConvMixer(16, 2, 5, 4, input_shape=(None, None, 3), classes=3)
    for size in [(16, 16), (24, 40)]:
        x = np.zeros((1, *size, 3), "float32")
        assert tuple(model(x).shape) == (1, 3)
    fmap = kc.ConvMixer(16, 2, 5, 4, input_shape=(None, None, 3), include_top=False)
    assert tuple(fmap(np.zeros((1, 24, 40, 3), "float32")).shape) == (1, 6, 10, 16)


def test_builders_accept_convmixer_kwargs_and_registry():
    model = kc.get_model("convmixer_256_8", classes=4, dropout=0.1, input_shape=(16, 16, 3))
    assert model.output_shape == (None, 4)
    assert model.get_layer("dropout").rate == pytest.approx(0.1)
    assert kc.get_model("ConvMixer256_8").name == "convmixer_256_8"
    assert kc.ConvMixer768_32(input_shape=(None, None, 3)).get_layer("block_0").activation == "relu"


def test_save_and_load_keras_file(tmp_path):
    model = kc.ConvMixer(16, 2, 5, 2, input_shape=(8, 8, 3), classes=3, dropout=0.2)
    randomize_batchnorm(model)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = np.random.default_rng(7).uniform(0, 255, size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(model(x)), atol=1e-6)
    assert isinstance(loaded.get_layer("block_1"), kc.ConvMixerBlock)


def test_weights_argument_loads_file(tmp_path):
    model = kc.ConvMixer(8, 1, 3, 2, input_shape=(8, 8, 3), classes=2)
    randomize_batchnorm(model)
    path = tmp_path / "w.weights.h5"
    model.save_weights(path)
    other = kc.ConvMixer(8, 1, 3, 2, input_shape=(8, 8, 3), classes=2, weights=str(path))
    x = np.random.default_rng(8).uniform(0, 255, size=(1, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(to_numpy(other(x)), to_numpy(model(x)), atol=1e-6)


def test_short_fit_decreases_loss():
    model = kc.ConvMixer(16, 2, 3, 2, input_shape=(8, 8, 3), classes=4, classifier_activation=None)
    rng = np.random.default_rng(9)
    x = rng.uniform(0, 255, size=(32, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 4, size=32)
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(x, y, batch_size=16, epochs=8, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: kc.ConvMixer1536_20(input_shape=(225, 225, 3)), "height 225 is not divisible by the patch size 7"),
        (lambda: kc.get_model("convmixer_9000"), "Unknown model 'convmixer_9000'. Available: convmixer_1024_16"),
        (lambda: kc.ConvMixer(8, 1, 3, 2, activation="nope"), "Unknown activation 'nope'"),
        (lambda: kc.ConvMixer(8, 1, 3, 2, pooling="mean", include_top=False), "pooling must be one of"),
        (lambda: kc.ConvMixer(8, 1, 3, 2, input_shape=(8, 8)), r"input_shape must be \(height, width, 3\)"),
    ],
    ids=["patch", "model-name", "activation", "pooling", "input-shape"],
)
def test_bad_input_is_a_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_mismatched_weights_name_the_tensor(tmp_path):
    path = tmp_path / "w8.weights.h5"
    kc.ConvMixer(8, 1, 3, 2, input_shape=(8, 8, 3), classes=2).save_weights(path)
    with pytest.raises(
        ValueError,
        match=r"w8\.weights\.h5.*does not fit convmixer: \S+/\S+ has shape \(16,?.*\) "
        r"in this model but \(8,?.*\) in the file",
    ):
        kc.ConvMixer(16, 1, 3, 2, input_shape=(8, 8, 3), classes=2, weights=str(path))


def test_missing_weights_path_names_it(tmp_path):
    missing = tmp_path / "nope.weights.h5"
    with pytest.raises(FileNotFoundError, match=r"nope\.weights\.h5.*does not exist"):
        kc.ConvMixer256_8(weights=str(missing))


@pytest.mark.skipif(keras.backend.backend() == "tensorflow", reason="keras imports TF itself here")
def test_import_and_build_without_tensorflow():
    code = HIDE_TENSORFLOW + (
        "import numpy as np, keras_convmixer as kc\n"
        "m = kc.ConvMixer256_8()\n"
        "y = m(np.zeros((1, 32, 32, 3), 'float32'))\n"
        "assert tuple(y.shape) == (1, 10)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "KERAS_BACKEND": keras.backend.backend()}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


# ----------------------------------------------------------------------------- presets and builder signatures

CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_preset_param_formula_gives_the_published_counts():
    for builder_name, published in PUBLISHED_PARAMS.items():
        row = kc.MODEL_CONFIGS[presets.canonical_name(builder_name)]
        args = (row["dim"], row["depth"], row["kernel_size"], row["patch_size"])
        assert presets.trainable_params(*args, 1000) == published


# The keyword arguments a builder declares itself (keras.applications' set, plus the normalisation); the rest of
# ConvMixer's are passed on through **kwargs.
BUILDER_ARGS = (
    "include_top",
    "include_preprocessing",
    "weights",
    "input_tensor",
    "input_shape",
    "pooling",
    "classes",
    "classifier_activation",
    "mean",
    "std",
    "name",
)


@pytest.mark.parametrize("builder_name", sorted(PUBLISHED_PARAMS) + ["ConvMixer256_8", "ConvMixer256_16"])
def test_builder_signature_is_written_out(builder_name):
    builder = getattr(kc, builder_name)
    params = inspect.signature(builder).parameters
    cifar = builder_name.startswith("ConvMixer256")
    assert tuple(params)[:-1] == BUILDER_ARGS and params["kwargs"].kind is inspect.Parameter.VAR_KEYWORD
    assert all(params[name].kind is inspect.Parameter.KEYWORD_ONLY for name in BUILDER_ARGS)
    assert params["classes"].default == (10 if cifar else 1000)
    assert params["mean"].default is None and params["std"].default is None
    assert params["name"].default == builder_name.lower().replace("convmixer", "convmixer_")
    general = inspect.signature(kc.ConvMixer).parameters
    for name in set(BUILDER_ARGS) - {"classes", "name"}:
        assert params[name].default == general[name].default, name
    # Every argument a builder takes is documented in its Args section.
    args = builder.__doc__.split("Args:")[1]
    for name in BUILDER_ARGS:
        assert f"\n    {name}: " in args, name


def test_builders_pass_on_convmixer_arguments_and_default_to_their_variants_normalisation():
    model = kc.ConvMixer256_8(dropout=0.25, bn_momentum=0.5, initializer="keras", input_shape=(8, 8, 3))
    assert model.get_layer("dropout").rate == pytest.approx(0.25)
    assert model.get_layer("stem").bn.momentum == pytest.approx(0.5)
    np.testing.assert_allclose(to_numpy(model.get_layer("head").bias), 0.0)  # Keras's zero biases
    np.testing.assert_allclose(to_numpy(model.get_layer("normalize").mean).ravel(), 255 * np.array(CIFAR_STATS[0]))
    # mean=None: the variant's own, also when the model is renamed; a shape that is no variant gets ImageNet's.
    renamed = kc.ConvMixer256_16(name="mine", input_shape=(8, 8, 3))
    np.testing.assert_allclose(
        to_numpy(renamed.get_layer("normalize").variance).ravel(), (255 * np.array(CIFAR_STATS[1])) ** 2, rtol=1e-6
    )
    custom = kc.ConvMixer(8, 1, 3, 2, input_shape=(8, 8, 3))
    np.testing.assert_allclose(to_numpy(custom.get_layer("normalize").mean).ravel(), 255 * np.array(IMAGENET_STATS[0]))
    given = kc.ConvMixer256_8(mean=(0.5, 0.5, 0.5), input_shape=(8, 8, 3))
    np.testing.assert_allclose(to_numpy(given.get_layer("normalize").mean).ravel(), 127.5)


def test_builder_argument_mistakes():
    with pytest.raises(ValueError, match=r"ConvMixer256_8 fixes dim=256: for another dim, build it with ConvMixer"):
        kc.ConvMixer256_8(dim=128)
    with pytest.raises(ValueError, match=r"ConvMixer768_32 fixes activation='relu'"):
        kc.get_model("convmixer_768_32", activation="gelu")
    with pytest.raises(ValueError, match=r"fixes default_size=32: .* pass input_shape"):
        kc.ConvMixer256_8(default_size=64)
    with pytest.raises(TypeError, match=r"ConvMixer256_8\(\) got an unexpected keyword argument 'clases'"):
        kc.ConvMixer256_8(clases=3)
    with pytest.raises(TypeError, match=r"ConvMixer256_8\(\) takes 0 positional arguments"):
        kc.ConvMixer256_8(False)


def test_registry_accepts_timm_names_and_keeps_eval_metadata_of_timm():
    _, _, timm = vision_or_skip()
    for timm_name in timm.list_models("convmixer*"):
        key = presets.canonical_name(timm_name)
        row = kc.MODEL_CONFIGS[key]
        cfg = timm.models.get_pretrained_cfg(f"{timm_name}.in1k")
        assert presets.eval_preset(key) == dict(
            image_size=cfg.input_size[-1],
            crop_pct=cfg.crop_pct,
            interpolation=cfg.interpolation,
            mean=tuple(cfg.mean),
            std=tuple(cfg.std),
        )
        assert row["classes"] == cfg.num_classes
    assert kc.get_model("convmixer_1024_20_ks9_p14", input_shape=(28, 28, 3)).name == "convmixer_1024_20"
    # The Hub's pretrained tags name the same variant.
    assert presets.canonical_name("convmixer_1024_20_ks9_p14.in1k") == "convmixer_1024_20"
    assert presets.eval_preset("ConvMixer256_8") == dict(
        image_size=32, crop_pct=1.0, interpolation="bilinear", mean=CIFAR_STATS[0], std=CIFAR_STATS[1]
    )
    with pytest.raises(ValueError, match="Unknown model 'convmixer_1024_20_ks7'"):
        presets.canonical_name("convmixer_1024_20_ks7")


# ----------------------------------------------------------------------------- .keras files and registration


def _saved_compiled_model(tmp_path):
    from keras_convmixer.schedules import OneCycle

    model = kc.ConvMixer(8, 1, 3, 2, input_shape=(8, 8, 3), classes=3)
    randomize_batchnorm(model)
    # A compiled schedule is saved with the optimizer, as training saves best.keras/last.keras.
    model.compile(optimizer=keras.optimizers.AdamW(OneCycle(1e-3, 10)), loss="categorical_crossentropy")
    path = tmp_path / "compiled.keras"
    model.save(path)
    x = np.random.default_rng(10).uniform(0, 255, size=(2, 8, 8, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", to_numpy(model(x)))
    return path


_CHECK_LOADED = (
    "import numpy as np\n"
    "x, y = np.load(r'{x}'), np.load(r'{y}')\n"
    "assert type(m.get_layer('block_0')).__name__ == 'ConvMixerBlock'\n"
    "assert m.optimizer.get_config()['learning_rate']['class_name'] == 'OneCycle'\n"
    "np.testing.assert_allclose(keras.ops.convert_to_numpy(m(x)), y, atol=1e-6)\n"
    "print('ok')\n"
)


@pytest.mark.parametrize(
    "program",
    [
        # keras first: importing the package registers the layers, so Keras's own loader works.
        "import keras\nimport keras_convmixer\nm = keras.saving.load_model(r'{path}')\n",
        # the package first (it imports no keras): load_model registers them.
        "import keras_convmixer as kc\nimport keras\nm = kc.load_model(r'{path}')\n",
    ],
    ids=["keras-imported-first", "load_model"],
)
def test_keras_file_with_our_layers_loads(tmp_path, program):
    path = _saved_compiled_model(tmp_path)
    code = (program + _CHECK_LOADED).format(path=path, x=tmp_path / "x.npy", y=tmp_path / "y.npy")
    env = {**os.environ, "KERAS_BACKEND": keras.backend.backend()}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_preprocess_input_matches_numpy_with_literal_stats():
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype("float32")
    imagenet = (pixels / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    cifar = (pixels / 255.0 - np.array([0.4914, 0.4822, 0.4465])) / np.array([0.2471, 0.2435, 0.2616])
    out = kc.preprocess_input(pixels, "convmixer_768_32")
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, imagenet, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kc.preprocess_input(pixels), imagenet, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(kc.preprocess_input(pixels, "ConvMixer256_8")), cifar, rtol=1e-5, atol=1e-5)
    tensor = kc.preprocess_input(keras.ops.convert_to_tensor(pixels), "convmixer_256_8")
    np.testing.assert_allclose(to_numpy(tensor), cifar, rtol=1e-5, atol=1e-5)
    # The model without preprocessing, fed preprocess_input's output, gives the model with it.
    with_pre = kc.ConvMixer(dim=8, depth=1, kernel_size=3, patch_size=2, classes=3, input_shape=(4, 4, 3))
    without = kc.ConvMixer(
        dim=8, depth=1, kernel_size=3, patch_size=2, classes=3, input_shape=(4, 4, 3), include_preprocessing=False
    )
    without.set_weights(with_pre.get_weights()[-len(without.get_weights()) :])
    np.testing.assert_allclose(
        to_numpy(without(kc.preprocess_input(pixels))), to_numpy(with_pre(pixels)), rtol=1e-4, atol=1e-5
    )


def test_get_model_takes_timms_spellings():
    model = kc.get_model("convmixer_256_8", num_classes=7, classifier_activation=None)
    assert model.output.shape[-1] == 7
    with pytest.raises(ValueError, match=r"both num_classes= \(timm's spelling\) and classes="):
        kc.get_model("convmixer_256_8", num_classes=7, classes=7)
    with pytest.raises(ValueError, match=r"both pretrained= \(timm's spelling\) and weights="):
        kc.get_model("convmixer_768_32", pretrained=True, weights=None)
    # pretrained=True asks for the released weights: for a variant without any, the builder's own one-line refusal.
    with pytest.raises(ValueError, match="imagenet"):
        kc.get_model("convmixer_256_8", pretrained=True)
