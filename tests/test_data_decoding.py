"""The training crop done while decoding (keras_convmixer.data.decoding), through make_dataset on every backend."""

import math

import numpy as np
import pytest

from keras_convmixer import data
from keras_convmixer.data import decoding
from keras_convmixer.data.decoding import HostCrop
from tests.data_images import encoded, make_damaged, one_line, smooth_image
from tests.test_augment_crop import boxes_from_outputs, check_crop_statistics, ramp_image

tf = pytest.importorskip("tensorflow")


def timm_box(u, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
    """timm's ``RandomResizedCrop.get_params`` in plain Python, drawing its uniforms from ``u`` in order:
    (area, log-aspect) per attempt, then the corner's (top, left)."""
    for k in range(attempts):
        area = height * width * (scale[0] + (scale[1] - scale[0]) * u[2 * k])
        aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[2 * k + 1])
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = min(math.floor(u[2 * attempts] * (height - h + 1)), height - h)  # random.randint(0, height - h)
            left = min(math.floor(u[2 * attempts + 1] * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    w = round(height * ratio[1]) if in_ratio > ratio[1] else width
    h = round(width / ratio[0]) if in_ratio < ratio[0] else height
    return (height - h) // 2, (width - w) // 2, h, w


def test_windows_are_timms_for_the_same_uniforms():
    rng = np.random.default_rng(0)
    crop = HostCrop()
    sizes = [(375, 500), (500, 375), (33, 33), (5, 301), (299, 7), (1, 1)]
    for height, width in sizes:
        for _ in range(40):
            u = rng.uniform(size=2 * crop.attempts + 3).astype(np.float32)
            got = tuple(int(v) for v in decoding.crop_window(height, width, tf.constant(u), crop))
            assert got == timm_box(u.astype(np.float64), height, width), (height, width, u)


def jpeg_bytes(height, width, **kwargs):
    image = smooth_image(np.random.default_rng(height + width), height, width)
    return encoded(image, "JPEG", quality=90, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(subsampling=0), dict(subsampling=2), dict(progressive=True)])
def test_a_cropped_decode_equals_a_full_decode_then_crop(kwargs):
    # decode_and_crop_jpeg alone is up to 58 grey levels off in a window's edge columns with 4:2:0 chroma.
    contents = jpeg_bytes(75, 100, **kwargs)
    full = tf.io.decode_jpeg(contents, channels=3)
    rng = np.random.default_rng(1)
    crop = HostCrop(interpolation="random")
    for _ in range(60):
        u = tf.constant(rng.uniform(size=2 * crop.attempts + 3), tf.float32)
        got = decoding.decode_crop(tf.constant(contents), 24, u, crop).numpy()
        top, left, h, w = (int(v) for v in decoding.crop_window(75, 100, u, crop))
        window = full[top : top + h, left : left + w]
        method = "bicubic" if float(u[-1]) < 0.5 else "bilinear"
        want = tf.image.resize(window, [24, 24], method=method, antialias=True)
        want = np.round(np.clip(want.numpy(), 0, 255)).astype(np.uint8)
        np.testing.assert_array_equal(got, want)


def test_only_the_window_is_decoded():
    # A second start-of-image marker three quarters into the scan: a full decode fails there, a decode of a
    # window at the top stops before it.
    contents = jpeg_bytes(120, 160)
    cut = len(contents) * 3 // 4
    contents = contents[:cut] + b"\xff\xd8" + contents[cut:]
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.io.decode_jpeg(contents, channels=3)
    top_left = tf.zeros([2 * HostCrop().attempts + 3])  # smallest area, corner (0, 0)
    out = decoding.decode_crop(tf.constant(contents), 8, top_left, HostCrop())
    assert out.shape == (8, 8, 3) and out.dtype == tf.uint8
    # A file cut short has no end-of-image marker: it is decoded whole and fails, as without the crop
    # (a cropped decode of its top alone would succeed).
    cut = jpeg_bytes(120, 160)
    cut = cut[: len(cut) // 2]
    assert tf.io.decode_and_crop_jpeg(cut, [0, 0, 8, 8], channels=3).shape == (8, 8, 3)
    with pytest.raises(tf.errors.InvalidArgumentError):
        decoding.decode_crop(tf.constant(cut), 8, top_left, HostCrop())


RAMP = 4  # the ramps' slope: the uint8 output's rounding then moves a box read from it by under a pixel


def ramp_folder(tmp_path, fmt):
    root = tmp_path / "ramps"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            image = (ramp_image(40, 60) * RAMP).astype(np.uint8)
            kwargs = dict(quality=100, subsampling=0) if fmt == "JPEG" else {}
            (root / name / f"{i}.{fmt.lower()}").write_bytes(encoded(image, fmt, **kwargs))
    return root


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_the_crops_of_a_stream_follow_timms_distribution(tmp_path, fmt):
    src = data.load_source(f"folder:{ramp_folder(tmp_path, fmt)}", val_split=0)
    size, n = 24, 400
    ds = data.make_dataset(
        src.train,
        image_size=size,
        batch_size=n,
        training=True,
        repeat=True,
        cache=False,
        crop=HostCrop(),
        dtype="uint8",
    )
    images, _ = next(iter(ds))
    assert images.dtype == tf.uint8 and images.shape == (n, size, size, 3)
    h, w = boxes_from_outputs(images.numpy() / RAMP, size, (size // 4, 3 * size // 4))
    check_crop_statistics(h, w, 40, 60, np.random.default_rng(2))


def crops(split, seed, cache=False, batches=3):
    ds = data.make_dataset(
        split, image_size=8, batch_size=10, training=True, seed=seed, repeat=True, cache=cache, crop=HostCrop()
    )
    return [x.numpy() for x, _ in ds.take(batches)]


def test_the_same_seed_gives_the_same_crops(tmp_path):
    root = tmp_path / "f"
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(8):
            (root / name / f"{i}.jpg").write_bytes(encoded(smooth_image(rng, 30, 40), "JPEG"))
    split = data.load_source(f"folder:{root}", val_split=0).train
    for cache in (False, True):  # cached: decoded whole once, cropped on each pass
        first = crops(split, 1, cache)
        assert first[0].dtype == np.float32
        np.testing.assert_array_equal(np.stack(first), np.stack(crops(split, 1, cache)))
        assert not np.array_equal(np.stack(first), np.stack(crops(split, 2, cache)))
    # Arrays splits are cropped after their shuffle.
    digits = data.load_source("digits", val_split=0).train
    np.testing.assert_array_equal(np.stack(crops(digits, 4)), np.stack(crops(digits, 4)))


def test_undecodable_files_are_still_named_with_the_crop(tmp_path):
    root, bad = make_damaged(tmp_path)
    src = data.load_source(f"folder:{root}", val_split=0)
    n_good = 304 - len(bad)
    for cache in (False, True):
        audit = data.DecodeAudit()
        ds = data.make_dataset(
            src.train,
            image_size=8,
            batch_size=16,
            training=True,
            repeat=True,
            cache=cache,
            audit=audit,
            crop=HostCrop(),
        )
        for i, _ in enumerate(ds):
            if i + 1 == n_good // 16 + 1:
                break
        assert sorted(audit.failures) == bad, cache


def test_crop_arguments_are_checked():
    src = data.load_source("digits", val_split=0.1)
    cases = [
        (dict(training=False, crop=HostCrop()), "evaluation"),
        (dict(crop="inception"), "HostCrop"),
        (dict(dtype="uint8"), "crop="),
        (dict(dtype="uint8", crop=HostCrop(), image_map=lambda x: x), "image_map"),
        (dict(dtype="float16", crop=HostCrop()), "dtype"),
    ]
    for change, name in cases:
        kwargs = dict(split=src.train, image_size=8, batch_size=4, training=True) | change
        with pytest.raises(ValueError) as excinfo:
            data.make_dataset(**kwargs)
        assert name in one_line(excinfo), change
    for bad, name in [
        (dict(scale=(0.5, 0.1)), "scale"),
        (dict(ratio=(0, 1)), "ratio"),
        (dict(interpolation="area"), "interpolation"),
        (dict(attempts=0), "attempts"),
    ]:
        with pytest.raises(ValueError) as excinfo:
            HostCrop(**bad)
        assert name in one_line(excinfo), bad
