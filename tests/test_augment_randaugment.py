"""RandAugment against torchvision's and timm's own ops on PIL images, on the device and the host."""

import math

import keras
import numpy as np
import pytest

from keras_convmixer.augment import image_ops, policies
from keras_convmixer.augment import randaugment as ra
from keras_convmixer.augment.erasing import RandomErasing
from keras_convmixer.augment.xp import keras_namespace, tf_namespace
from tests.helpers import to_numpy
from tests.vision_reference import vision_or_skip

H, W = 24, 32  # not square: TranslateX must use the width, TranslateY the height


def structured_images(n=4, height=H, width=W, seed=0):
    """CIFAR-like uint8 content: gradients, a disc, a shaded block, noise; ranges differ per image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    out = []
    for i in range(n):
        img = np.zeros((height, width, 3))
        img[..., 0] = 40 + 150 * x / width
        img[..., 1] = 30 + 120 * y / height
        img[..., 2] = 100 + 60 * np.sin(x / 3.0 + i)
        cy, cx = rng.integers(6, height - 6), rng.integers(6, width - 6)
        img[(y - cy) ** 2 + (x - cx) ** 2 < 25] = rng.integers(0, 255, 3)
        img[rng.integers(0, height // 2) :, rng.integers(0, width // 2) : rng.integers(width // 2, width)] *= 0.6
        img += rng.normal(0, 8, img.shape)
        lo, hi = [(0, 255), (20, 230), (60, 200), (0, 255)][i % 4]
        out.append(np.clip(np.round(img), lo, hi).astype(np.uint8))
    return np.stack(out)


def device(fn, *arrays):
    """Run ``fn`` on backend tensors; jitted on JAX (eager JAX compiles every small op separately)."""
    if keras.backend.backend() == "jax":
        import jax

        return np.asarray(jax.jit(fn)(*arrays))
    return to_numpy(fn(*[keras.ops.convert_to_tensor(a) for a in arrays]))


def jax_jit_or_call(fn):
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(fn)
    return fn


def host(fn, *arrays):
    tf = pytest.importorskip("tensorflow")
    return fn(*[tf.convert_to_tensor(a) for a in arrays]).numpy()


def ours_both(layer, name, images, magnitude, sign):
    """Op ``name`` on images (B, H, W, 3) with per-image magnitudes and signs, on the device and the host."""
    images = images.astype("float32")
    magnitude, sign = np.asarray(magnitude, "float32"), np.asarray(sign, "float32")

    def run(xp):
        return lambda x, m, s: layer.apply_op(xp, x, name, m, s)

    return (device(run(keras_namespace()), images, magnitude, sign), host(run(tf_namespace()), images, magnitude, sign))


def check(ours, ref, name, exact):
    diff = np.abs(ours.astype(np.float64) - ref)
    if exact:
        assert diff.max() == 0, f"{name}: {int((diff > 0).sum())} pixels differ, max {diff.max()}"
    else:
        # float32 coordinates vs PIL's doubles: a sample exactly between two integers may truncate the
        # other way, so a few pixels are off by one (never more).
        assert diff.max() <= 1 and (diff > 0).mean() < 0.15, f"{name}: max {diff.max()}, {(diff > 0).mean():.3f}"


# --------------------------------------------------------------------------------------------------
# Each op against the libraries' own functions.


def test_torchvision_magnitude_tables_match():
    _, torchvision, _ = vision_or_skip()
    space = torchvision.transforms.RandAugment()._augmentation_space(31, (H, W))
    ours = image_ops.torchvision_magnitudes(31, H, W)
    assert list(space) == list(policies.TORCHVISION_OPS)
    for name, (table, signed) in space.items():
        assert ours[name][1] == signed, name
        np.testing.assert_array_equal(np.broadcast_to(table.numpy(), (31,)), ours[name][0], err_msg=name)


@pytest.mark.parametrize("name", policies.TORCHVISION_OPS)
def test_torchvision_op_matches_torchvision(name):
    torch, torchvision, _ = vision_or_skip()
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.autoaugment import _apply_op

    images = structured_images()
    cases = [(b, s) for b in (1, 12, 30) for s in (1.0, -1.0)]
    batch = np.concatenate([images] * len(cases))
    refs, values, signs = [], [], []
    for b, s in cases:
        table, signed = torchvision.transforms.RandAugment(2, b)._augmentation_space(31, (H, W))[name]
        m = float(table[b].item()) if table.ndim else 0.0
        m = -m if signed and s < 0 else m
        refs += [
            np.asarray(_apply_op(Image.fromarray(img), name, m, InterpolationMode.NEAREST, None)) for img in images
        ]
        values += [abs(m)] * len(images)
        signs += [s] * len(images)
    ref = np.stack(refs).astype(np.float64)

    # The layer takes its magnitude from the bin; feed each bin's value through the same argument rule.
    ctx = ra.RandAugment()._ctx(3)

    def run(xp):
        def op(x, v, s):
            arg = xp.cast(image_ops.torchvision_arg(name, xp, v, s), xp.float32)
            return image_ops.PIXEL_OPS[name](xp, x, arg, ctx)

        return op

    values, signs = np.asarray(values, "float32"), np.asarray(signs, "float32")
    on_device = device(run(keras_namespace()), batch.astype("float32"), values, signs)
    on_host = host(run(tf_namespace()), batch.astype("float32"), values, signs)
    check(on_device, ref, name, exact=True)
    check(on_host, ref, name, exact=True)
    # The layer's own argument for its bin is the table's (signed) value.
    for b in (1, 12, 30):
        layer = ra.RandAugment(magnitude=b)
        arg = to_numpy(
            layer.op_arg(keras_namespace(), name, keras.ops.zeros((2,)), keras.ops.convert_to_tensor([1.0, -1.0]), H, W)
        )
        table, signed = image_ops.torchvision_magnitudes(31, H, W)[name]
        expect = np.asarray(
            image_ops.torchvision_arg(name, np, np.float32(table[b]), np.array([1.0, -1.0]) if signed else np.ones(2))
        )
        np.testing.assert_allclose(arg, expect, rtol=1e-6)


TIMM_EXTRA = ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness")


@pytest.mark.parametrize("name", policies.TIMM_INCREASING_OPS + TIMM_EXTRA)
def test_timm_op_matches_timm(name, monkeypatch):
    _, _, timm = vision_or_skip()
    from PIL import Image
    from timm.data import auto_augment as taa

    images = structured_images()
    hparams = dict(taa._HPARAMS_DEFAULT, interpolation=Image.BILINEAR)
    cases = [(m, s) for m in (0.0, 4.5, 9.0, 10.0) for s in (1.0, -1.0)]
    refs, mags, signs = [], [], []
    for m, s in cases:
        op = taa.AugmentOp(name, prob=1.0, magnitude=m, hparams=hparams)
        monkeypatch.setattr(taa, "_randomly_negate", (lambda v: -v) if s < 0 else (lambda v: v))
        args = op.level_fn(m, op.hparams) if op.level_fn else ()
        for img in images:
            if name.startswith("Posterize") and args[0] == 0:
                # 0 bits: black. Pillow >= 13 refuses bits=0 (older Pillow returned black).
                refs.append(np.zeros_like(img))
            else:
                refs.append(np.asarray(op.aug_fn(Image.fromarray(img), *args, **dict(op.kwargs))))
        mags += [m] * len(images)
        signs += [s] * len(images)
    ref = np.stack(refs).astype(np.float64)
    layer = ra.RandAugment("timm", increasing=name not in TIMM_EXTRA)
    batch = np.concatenate([images] * len(cases))
    on_device, on_host = ours_both(layer, name, batch, mags, signs)
    exact = name not in image_ops.GEOMETRIC_OPS
    check(on_device, ref, name, exact)
    check(on_host, ref, name, exact)
    # Host and device run the same rule: equal up to float32 evaluation order.
    assert np.abs(on_device - on_host).max() <= (0 if exact else 1)


# --------------------------------------------------------------------------------------------------
# Sampling: which op, which sign, whether applied, which magnitude, per image.


def candidates(layer, image):
    """Every (op, sign) output of one torchvision-policy image, by the libraries' definitions."""
    _, torchvision, _ = vision_or_skip()
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.autoaugment import _apply_op

    space = torchvision.transforms.RandAugment(2, layer.magnitude)._augmentation_space(31, image.shape[:2])
    keys, outs = [], []
    for i, (name, (table, signed)) in enumerate(space.items()):
        m = float(table[layer.magnitude].item()) if table.ndim else 0.0
        for s in (1, -1) if signed else (1,):
            keys.append((i, s))
            outs.append(np.asarray(_apply_op(Image.fromarray(image), name, s * m, InterpolationMode.NEAREST, None)))
    return keys, np.stack(outs).astype(np.float32)


def identify(outputs, outs):
    flat = outputs.reshape(len(outputs), -1)
    dist = np.abs(flat[:, None, :] - outs.reshape(len(outs), -1)[None]).max(axis=2)
    assert (dist.min(axis=1) == 0).all(), "an output matches none of the ops"
    return dist.argmin(axis=1)


def check_frequencies(keys, found, n_ops):
    stats = pytest.importorskip("scipy.stats")
    op_counts = np.bincount([keys[k][0] for k in found], minlength=n_ops)
    assert stats.chisquare(op_counts).pvalue > 1e-4, op_counts
    signed = [keys[k][1] for k in found if sum(1 for key in keys if key[0] == keys[k][0]) == 2]
    assert stats.binomtest(int(np.sum(np.array(signed) > 0)), len(signed), 0.5).pvalue > 1e-4


def augment_path(layer, batch, path, seed=1):
    """``layer`` on ``batch`` by ``path``: "device" (the layer call), "host" (``host_map`` per image in
    tf.data) or "host_batch" (``host_batch_map`` after batching)."""
    if path == "device":
        return device(lambda x: layer(x, training=True), batch)
    tf = pytest.importorskip("tensorflow")
    tf.random.set_seed(seed)
    ds = tf.data.Dataset.from_tensor_slices(batch)
    if path == "host":
        ds = ds.map(layer.host_map).batch(len(batch))
    else:
        ds = ds.batch(len(batch)).map(layer.host_batch_map)
    return next(iter(ds)).numpy()


PATHS = ["device", "host", "host_batch"]


@pytest.mark.parametrize("path", PATHS)
def test_torchvision_ops_drawn_uniformly_per_image(path):
    image = structured_images(1, 16, 16, seed=3)[0]
    layer = ra.RandAugment("torchvision", num_ops=1, magnitude=12, seed=7)
    keys, outs = candidates(layer, image)
    # Every (op, sign) gives a different image here, so each output names its op.
    assert len({o.tobytes() for o in outs}) == len(keys)
    batch = np.repeat(image[None], 700, axis=0).astype("float32")
    outputs = augment_path(layer, batch, path)
    found = identify(outputs, outs)
    check_frequencies(keys, found, len(policies.TORCHVISION_OPS))
    assert len({keys[k][0] for k in found}) == len(policies.TORCHVISION_OPS)  # one batch, every op


@pytest.mark.parametrize("path", PATHS)
def test_timm_probability_and_magnitude_noise(path):
    stats = pytest.importorskip("scipy.stats")
    # Brightness (non-increasing) scales by m * 0.18 + 0.1: a flat grey 100 reveals each magnitude.
    layer = ra.RandAugment(
        "timm", num_ops=1, magnitude=9, magnitude_std=0.5, increasing=False, ops=("Brightness",), seed=3
    )
    n = 4000
    outputs = augment_path(layer, np.full((n, 4, 4, 3), 100.0, "float32"), path, seed=2)
    values = outputs[:, 0, 0, 0]
    assert (outputs == values[:, None, None, None]).all()
    applied = values != 100.0
    assert stats.binomtest(int(applied.sum()), n, 0.5).pvalue > 1e-4
    clipped = values[applied] == 190.0  # magnitude clipped to 10: factor 1.9
    assert stats.binomtest(int(clipped.sum()), int(applied.sum()), stats.norm.sf(2.0)).pvalue > 1e-4
    # Undo the factor (floor(f * 100): +0.5 centres the rounding) on the unclipped draws: N(9, 0.5) below 10.
    magnitude = ((values[applied][~clipped] + 0.5) / 100.0 - 0.1) / 0.18
    expected_mean = 9.0 - 0.5 * stats.norm.pdf(2.0) / stats.norm.cdf(2.0)
    assert abs(magnitude.mean() - expected_mean) < 0.05
    assert 0.43 < magnitude.std() < 0.53


def test_from_timm_string_matches_timm():
    _, _, timm = vision_or_skip()
    from timm.data.auto_augment import rand_augment_transform

    for config in ("rand-m9-mstd0.5-inc1", "rand-m7-n3-p0.3-mmax12", "rand-m5-mstd101"):
        ref = rand_augment_transform(config, {})
        layer = ra.from_timm_string(config)
        assert layer.op_names == tuple(op.name for op in ref.ops)
        assert layer.num_ops == ref.num_layers
        op = ref.ops[0]
        assert (layer.prob, layer.magnitude, layer.magnitude_max) == (op.prob, op.magnitude, op.magnitude_max)
        std = math.inf if layer.magnitude_std > 100 else layer.magnitude_std
        assert std == op.magnitude_std
    assert ra.from_timm_string("rand-m9-mstd0.5-inc1", mean=(0.485, 0.456, 0.406)).fill == (124.0, 116.0, 104.0)


# --------------------------------------------------------------------------------------------------
# The layer.


def test_layer_is_identity_at_inference_and_seeded():
    images = structured_images(6).astype("float32")
    layer = ra.RandAugment("torchvision", magnitude=12, seed=5)
    np.testing.assert_array_equal(to_numpy(layer(images, training=False)), images)

    layer.build(images.shape)
    augment = jax_jit_or_call(lambda state, x: layer.stateless_call([], state, x, training=True)[0])

    def state(seed):
        other = ra.RandAugment("torchvision", magnitude=12, seed=seed)
        other.build(images.shape)
        return [v.value for v in other.non_trainable_variables]

    first, again, other = (to_numpy(augment(state(seed), images)) for seed in (5, 5, 6))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first, images)
    assert first.min() >= 0 and first.max() <= 255 and (first == np.round(first)).all()


def test_config_round_trip():
    layer = ra.from_timm_string("rand-m9-mstd0.5-inc1", mean=(0.5, 0.5, 0.5), seed=3)
    clone = ra.RandAugment.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    model = keras.Sequential([keras.Input((8, 8, 3)), layer])
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
    assert isinstance(restored.layers[0], ra.RandAugment) and restored.layers[0].fill == (128.0, 128.0, 128.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(policy="autoaugment"), "policy"),
        (dict(magnitude=31), "magnitude"),
        (dict(magnitude=2.5), "magnitude"),
        (dict(num_ops=-1), "num_ops"),
        (dict(policy="timm", magnitude=-1), "magnitude"),
        (dict(magnitude_std=0.5), "magnitude_std"),
        (dict(prob=1.5), "prob"),
        (dict(fill=(0, 0, 300)), "fill"),
        (dict(interpolation="bicubic"), "interpolation"),
        (dict(ops=("Invert",)), "ops"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ra.RandAugment(**kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="images"):
        ra.RandAugment()(np.zeros((4, 8, 8), "float32"), training=True)
    with pytest.raises(ValueError, match="config"):
        ra.from_timm_string("rand-q9")
    with pytest.raises(ValueError, match="config"):
        ra.from_timm_string("augmix-m9")


def test_in_compiled_train_step():
    """A tiny model with RandAugment and RandomErasing inside trains under the backend's compiled step."""
    rng = np.random.default_rng(0)
    x = structured_images(16, 16, 16).astype("float32")
    y = rng.integers(0, 2, 16)
    inputs = keras.Input((16, 16, 3))
    h = ra.RandAugment("torchvision", num_ops=1, magnitude=12, seed=1)(inputs)
    h = ra.from_timm_string("rand-m9-mstd0.5-inc1", seed=2)(h)
    h = RandomErasing(0.5, seed=3)(h)
    h = keras.layers.Rescaling(1 / 255.0)(h)
    h = keras.layers.Conv2D(4, 3)(h)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    if keras.backend.backend() == "jax":
        assert model.jit_compile  # the layers declare supports_jit, so fit did not fall back to eager
