"""The recipe's augmentation stacks: which layers the recipes build, the tf.data maps and DeviceAugment."""

import json

import keras
import numpy as np
import pytest

from keras_convmixer import augment as aug
from keras_convmixer.recipes import resolve_config
from tests.helpers import to_numpy


def test_recipes_build_the_libraries_randaugment():
    cifar = aug.make_randaugment(resolve_config("cifar10", dict(output_dir="unused")))
    assert (cifar.policy, cifar.num_ops, cifar.magnitude, cifar.num_magnitude_bins, cifar.prob, cifar.fill) == (
        "torchvision",
        2,
        12,
        31,
        1.0,
        (0.0, 0.0, 0.0),
    )
    imagenet = aug.make_randaugment(resolve_config("imagenet", dict(output_dir="unused")))
    # rand-m9-mstd0.5-inc1 with create_transform's fill: round(255 * ImageNet mean).
    assert (
        imagenet.policy,
        imagenet.num_ops,
        imagenet.magnitude,
        imagenet.magnitude_std,
        imagenet.prob,
        imagenet.increasing,
        imagenet.fill,
    ) == ("timm", 2, 9.0, 0.5, 0.5, True, (124.0, 116.0, 104.0))
    with pytest.raises(ValueError, match="whole bin"):
        aug.make_randaugment(resolve_config("cifar10", dict(randaug_m=12.5, output_dir="unused")))


@pytest.mark.parametrize("impl", ["convmixer", "keras_cv"])
def test_host_image_map_in_tf_data(impl):
    tf = pytest.importorskip("tensorflow")
    if impl == "keras_cv":
        pytest.importorskip("keras_cv")
    cfg = resolve_config("imagenet", dict(image_size=14, augment_impl=impl, output_dir="unused"))
    image_map = aug.host_image_map(cfg)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    ds = tf.data.Dataset.from_tensors(image).repeat(6).map(image_map)
    outs = np.stack([x.numpy() for x in ds])
    assert outs.shape == (6, 14, 14, 3) and outs.dtype == np.float32
    # timm's erasing noise is N(0, 1) after normalisation: a few pixels may leave [0, 255].
    assert -5 * 255 < outs.min() and outs.max() < 6 * 255 and np.median(outs) > 0
    assert len({o.tobytes() for o in outs}) == 6  # random per image


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(augment_impl="albumentations"), "--augment-impl"),
        (dict(augment_impl="keras_cv", augment_on="device"), "keras_cv runs only in the tf.data map"),
        (dict(train_interpolation="nearest"), "--train-interpolation"),
        (dict(randaug_scale="keras"), "--randaug-scale"),
    ],
)
def test_recipes_refuse_what_the_pipelines_do_not_check(overrides, match):
    # The pipelines trust the resolved config: these settings are refused once, when it is resolved.
    with pytest.raises(ValueError, match=match):
        resolve_config("demo", dict(overrides, output_dir="unused"))


def device_cfg(**overrides):
    return resolve_config("imagenet", dict(image_size=14, output_dir="unused", seed=3, **overrides))


def augment(layer, images):
    """``layer`` on ``images`` in training mode from its seed state; jitted on JAX (eager JAX compiles
    every small op separately)."""
    layer.build(images.shape)
    state = [v.value for v in layer.non_trainable_variables]

    def run(state, x):
        return layer.stateless_call([], state, x, training=True)[0]

    if keras.backend.backend() == "jax":
        import jax

        run = jax.jit(run)
    return to_numpy(run(state, keras.ops.convert_to_tensor(images)))


def test_device_augment_config_keeps_only_its_settings_and_round_trips():
    cfg = device_cfg()
    layer = aug.DeviceAugment(cfg, crop=True, name="device_augment")
    config = layer.get_config()
    assert set(config["cfg"]) == set(aug.DEVICE_KEYS)
    assert len(cfg) > 2 * len(aug.DEVICE_KEYS)  # the training config it was given holds far more
    assert config["cfg"] == {k: cfg[k] for k in aug.DEVICE_KEYS}
    # Through JSON, as a saved model stores it, and found by its registered name.
    assert keras.saving.get_registered_object("keras_convmixer>DeviceAugment") is aug.DeviceAugment
    clone = aug.DeviceAugment.from_config(json.loads(json.dumps(config)))
    assert isinstance(clone, aug.DeviceAugment) and clone.get_config() == config
    assert [type(x) for x in clone.image_layers] == [type(x) for x in layer.image_layers]
    assert [type(x).__name__ for x in layer.image_layers] == ["RandomFlip", "RandAugment", "RandomErasing"]

    def settings(sublayer):
        return {k: v for k, v in sublayer.get_config().items() if k != "name"}  # names count up per instance

    for ours, theirs in zip(
        [clone.crop_layer, *clone.image_layers], [layer.crop_layer, *layer.image_layers], strict=True
    ):
        assert settings(ours) == settings(theirs)

    # Rebuilt from its config, the layer draws the same augmentation from the same seed. (Without
    # RandAugment, whose round trip its own tests cover: compiling it twice more takes half a minute on JAX.)
    layer = aug.DeviceAugment(dict(cfg, randaug_n=0), crop=True)
    clone = aug.DeviceAugment.from_config(layer.get_config())
    images = np.random.default_rng(0).integers(0, 256, (4, 24, 20, 3)).astype("float32")
    out = augment(layer, images)
    assert out.shape == (4, 14, 14, 3)
    np.testing.assert_array_equal(augment(clone, images), out)


def test_device_augment_accepts_a_full_config_and_names_missing_settings():
    cfg = device_cfg()
    # A config saved with every training setting still loads: the extra keys are dropped.
    restored = aug.DeviceAugment.from_config({"cfg": cfg, "crop": False, "name": "device_augment"})
    assert set(restored.get_config()["cfg"]) == set(aug.DEVICE_KEYS) and restored.crop_layer is None
    with pytest.raises(ValueError, match="DeviceAugment cfg lacks the settings randaug_m, reprob"):
        aug.DeviceAugment({k: v for k, v in cfg.items() if k not in ("randaug_m", "reprob")})


def test_device_augment_is_the_identity_at_inference_without_crop():
    layer = aug.DeviceAugment(device_cfg())
    images = np.random.default_rng(1).integers(0, 256, (2, 14, 14, 3)).astype("float32")
    np.testing.assert_array_equal(to_numpy(layer(images, training=False)), images)
    assert layer.compute_output_shape((2, 14, 14, 3)) == (2, 14, 14, 3)
    assert aug.DeviceAugment(device_cfg(), crop=True).compute_output_shape((2, 30, 20, 3)) == (2, 14, 14, 3)
