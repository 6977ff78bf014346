"""Data sources and pipelines (keras_convmixer.data) on every backend; tf.data is the loader everywhere."""

import io
import logging
import os
import resource
import struct
import subprocess
import sys
import threading
import zlib
from collections import Counter
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from keras_convmixer import data
from tests.helpers import HIDE_TENSORFLOW

tf = pytest.importorskip("tensorflow")

CLASS_COUNTS = {"ant": 5, "bee": 10, "cat": 15}  # unequal on purpose: stratification must follow them


def _save(array, path, **kwargs):
    Image.fromarray(array).save(path, **kwargs)
    return path


def _smooth_image(rng, h, w):
    """A smooth random RGB image: resampling errors stay small, a one-pixel shift does not."""
    small = rng.integers(0, 256, (h // 4 + 2, w // 4 + 2, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


@pytest.fixture()
def folder(tmp_path):
    """Class folders of small JPEGs plus a gray PNG, an RGBA PNG, a palette PNG, a corrupt file and a non-image."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for name, count in CLASS_COUNTS.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            _save(rng.integers(0, 256, (9 + i % 3, 12, 3), dtype=np.uint8), root / name / f"{i:03d}.jpg")
    special = {
        "gray": _save(rng.integers(0, 256, (16, 16), dtype=np.uint8), root / "ant" / "gray.png"),
        "rgba": _save(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), root / "bee" / "rgba.png"),
    }
    palette = Image.fromarray(rng.integers(0, 4, (16, 16), dtype=np.uint8), mode="P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30] + [0] * 756)
    palette.save(root / "cat" / "palette.png")
    special["palette"] = root / "cat" / "palette.png"
    (root / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    (root / "cat" / "notes.txt").write_text("not an image, not counted")
    return root, special


def _labels_of(split):
    return Counter(int(y) for y in split.labels)


def _batches(ds):
    xs, ys = zip(*[(keras.ops.convert_to_numpy(x), keras.ops.convert_to_numpy(y)) for x, y in ds], strict=True)
    return np.concatenate(xs), np.concatenate(ys)


# ----------------------------------------------------------------------------- folder source


def test_folder_skips_and_counts_corrupt_file(folder, caplog):
    root, _ = folder
    with caplog.at_level(logging.WARNING, logger="keras_convmixer.data"):
        src = data.load_source(f"folder:{root}", val_split=0.2, seed=0)
    assert src.class_names == ["ant", "bee", "cat"]
    assert src.num_classes == 3
    assert src.skipped == 1
    assert [Path(p).name for p in src.skipped_files] == ["corrupt.jpg"]
    assert any("skipped 1 " in r.getMessage() and "corrupt.jpg" in r.getMessage() for r in caplog.records)
    # 30 JPEGs + 3 special PNGs decode; the text file is no image at all.
    assert src.num_train + src.num_val == 33
    all_paths = set(src.train.paths) | set(src.val.paths)
    assert not any(p.endswith(("corrupt.jpg", "notes.txt")) for p in all_paths)
    # Every decodable image goes through the training pipeline: nothing is silently lost.
    images, labels = _batches(data.make_dataset(src.train, image_size=8, batch_size=4, training=True, seed=1))
    assert images.shape == (src.num_train // 4 * 4, 8, 8, 3) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 255


def test_truncated_jpeg_counted_by_full_verify_and_by_tf_data(folder):
    root, _ = folder
    good = (root / "ant" / "000.jpg").read_bytes()
    (root / "ant" / "truncated.jpg").write_bytes(good[:-100])  # a valid header, the scan data cut short
    header = data.load_source(f"folder:{root}", val_split=0)
    full = data.load_source(f"folder:{root}", val_split=0, verify="full")
    assert sorted(Path(p).name for p in full.skipped_files) == ["corrupt.jpg", "truncated.jpg"]
    assert header.skipped == 1 and header.num_train == full.num_train + 1
    # The header check lets it through; tf.data drops it instead of failing the epoch, and says so.
    images, _ = _batches(data.make_dataset(header.train, image_size=8, batch_size=64, training=False))
    assert len(images) == full.num_train
    assert sorted(Path(p).name for p in header.skipped_files) == ["corrupt.jpg", "truncated.jpg"]
    assert header.skipped == 2


def test_gray_rgba_palette_become_rgb(folder):
    root, special = folder
    gray = np.asarray(Image.open(special["gray"]))
    rgba = np.asarray(Image.open(special["rgba"]))
    pal_im = Image.open(special["palette"])
    pal = np.array(pal_im.getpalette()[:12], dtype=np.uint8).reshape(4, 3)
    expected = {
        "gray": np.repeat(gray[..., None], 3, axis=-1),
        "rgba": rgba[..., :3],
        "palette": pal[np.asarray(pal_im)],
    }
    for key, path in special.items():
        np.testing.assert_array_equal(data.read_image(path), expected[key], err_msg=key)
        # The tf.data decoder agrees: a 16x16 image at image_size 16 passes the eval transform unchanged.
        split = data.Split("files", labels=np.array([0], np.int32), paths=(str(path),), size=1)
        images, _ = _batches(data.make_dataset(split, image_size=16, batch_size=1, training=False))
        np.testing.assert_array_equal(images[0], expected[key].astype(np.float32), err_msg=key)


def test_val_split_stratified_and_deterministic(folder):
    root, _ = folder
    source = f"folder:{root}"
    a = data.load_source(source, val_split=0.2, seed=3)
    b = data.load_source(source, val_split=0.2, seed=3)
    c = data.load_source(source, val_split=0.2, seed=4)
    # Per-class counts after skipping: ant 5+1 gray, bee 10+1 rgba, cat 15+1 palette.
    per_class = {0: 6, 1: 11, 2: 16}
    assert a.num_val == round(0.2 * 33)
    for label, n in per_class.items():  # each class holds its share of the 7 val images, to within one
        share = n * a.num_val / 33
        assert np.floor(share) <= _labels_of(a.val)[label] <= np.ceil(share)
    assert set(a.train.paths).isdisjoint(a.val.paths)
    assert len(set(a.train.paths) | set(a.val.paths)) == 33
    assert a.val.paths == b.val.paths and a.train.paths == b.train.paths
    assert a.val.paths != c.val.paths
    # Labels stay attached to their files.
    for path, label in zip(a.val.paths, a.val.labels, strict=True):
        assert Path(path).parent.name == a.class_names[label]
    # A whole count works as well as a fraction.
    assert data.load_source(source, val_split=9, seed=3).num_val == 9
    assert data.load_source(source, val_split=0.0).val is None


def test_stratified_split_on_large_imbalanced_labels():
    labels = np.repeat(np.arange(4), [100, 250, 400, 1250])
    train, val = data.stratified_split(labels, 0.1, seed=0)
    assert len(val) == 200 and len(train) == 1800
    np.testing.assert_array_equal(np.bincount(labels[val]), [10, 25, 40, 125])
    train2, val2 = data.stratified_split(labels, 200, seed=0)
    np.testing.assert_array_equal(val, val2)
    _, val3 = data.stratified_split(labels, 0.1, seed=1)
    assert not np.array_equal(val, val3)
    # Fractions that do not divide evenly still give exactly round(f * n) in total, each class within one.
    labels = np.repeat(np.arange(3), [7, 7, 7])
    _, val = data.stratified_split(labels, 0.5, seed=0)
    assert len(val) == round(0.5 * 21) and set(np.bincount(labels[val])) <= {3, 4}


def test_separate_val_folder(folder, tmp_path):
    root, _ = folder
    rng = np.random.default_rng(1)
    val_root = tmp_path / "val"
    for name in ("bee", "cat"):  # a subset of the training classes
        (val_root / name).mkdir(parents=True)
        for i in range(3):
            _save(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8), val_root / name / f"{i}.png")
    src = data.load_source(f"folder:{root}", val_source=f"folder:{val_root}", val_split=0.5)
    assert src.num_train == 33 and src.num_val == 6
    assert sorted(Counter(src.class_names[y] for y in src.val.labels).items()) == [("bee", 3), ("cat", 3)]
    (val_root / "dog").mkdir()
    with pytest.raises(ValueError, match="dog"):
        data.load_source(f"folder:{root}", val_source=str(val_root))


# ----------------------------------------------------------------------------- datasets


def test_training_dataset_order_maps_and_remainder(folder):
    root, _ = folder
    src = data.load_source(f"folder:{root}", val_split=0.2, seed=0)

    def image_map(image):  # a caller's crop: constant image, records that it ran per image
        return tf.fill([6, 6, 3], tf.cast(tf.shape(image)[0], tf.float32))

    def batch_map(images, labels):
        return images, tf.one_hot(labels, 3)

    def make(seed, cache):
        return data.make_dataset(
            src.train,
            image_size=6,
            batch_size=5,
            training=True,
            seed=seed,
            image_map=image_map,
            batch_map=batch_map,
            cache=cache,
        )

    images, onehot = _batches(make(0, "auto"))
    assert images.shape == (src.num_train // 5 * 5, 6, 6, 3)  # drop_remainder for training
    assert onehot.shape == (len(images), 3) and np.all(onehot.sum(axis=1) == 1)
    heights = {9.0, 10.0, 11.0, 16.0}  # the images' own heights reached image_map
    assert set(np.unique(images)) <= heights
    order = [np.argmax(y, axis=1).tolist() for _, y in make(0, "auto")]
    assert order == [np.argmax(y, axis=1).tolist() for _, y in make(0, False)]  # same seed, with or without cache
    other = [np.argmax(y, axis=1).tolist() for _, y in make(5, "auto")]
    assert order != other
    # Eval keeps every image, in the split's order.
    _, labels = _batches(data.make_dataset(src.val, image_size=6, batch_size=4, training=False))
    np.testing.assert_array_equal(labels, src.val.labels)


def test_digits_source_shapes_and_labels():
    from sklearn.datasets import load_digits

    digits = load_digits()
    src = data.load_source("digits", val_split=0.1, seed=0)
    assert src.class_names == [str(i) for i in range(10)]
    assert src.num_train + src.num_val == len(digits.target) and src.num_val == round(0.1 * len(digits.target))
    assert set(src.val.labels.tolist()) == set(range(10))
    # Each 8x8 image is the sklearn digit scaled 0..16 -> 0..255, as gray RGB, with its own label.
    known = {
        np.round(im * 255 / 16).astype(np.uint8).tobytes(): int(t)
        for im, t in zip(digits.images, digits.target, strict=True)
    }
    for im, label in zip(src.val.images, src.val.labels, strict=True):
        assert im.shape == (8, 8, 3) and im.dtype == np.uint8
        assert known[np.ascontiguousarray(im[..., 0]).tobytes()] == label
    images, labels = _batches(data.make_dataset(src.val, image_size=32, batch_size=64, training=False))
    assert images.shape == (src.num_val, 32, 32, 3) and labels.dtype == np.int32
    np.testing.assert_array_equal(labels, src.val.labels)
    np.testing.assert_array_equal(images[..., 0], images[..., 2])  # still gray
    # Upscaling keeps the picture: block means of the 32x32 image follow the 8x8 original.
    blocks = images[..., 0].reshape(-1, 8, 4, 8, 4).mean(axis=(2, 4))
    assert np.corrcoef(blocks.ravel(), src.val.images[..., 0].ravel())[0, 1] > 0.95


def test_dataset_feeds_fit():
    src = data.load_source("digits", val_split=0.1)
    train = data.make_dataset(src.train, image_size=8, batch_size=256, training=True)
    val = data.make_dataset(src.val, image_size=8, batch_size=256, training=False)
    model = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Rescaling(1 / 255), keras.layers.Flatten(), keras.layers.Dense(10)]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = model.fit(train, validation_data=val, epochs=2, verbose=0)
    assert len(history.history["val_accuracy"]) == 2


@pytest.mark.parametrize("shape", [(37, 50), (61, 40)])
@pytest.mark.parametrize(
    "image_size,crop_pct,interpolation", [(24, 0.875, "bicubic"), (32, 0.96, "bilinear"), (48, 1.0, "bicubic")]
)
def test_eval_transform_matches_pil(shape, image_size, crop_pct, interpolation):
    h, w = shape
    image = _smooth_image(np.random.default_rng(h), h, w)
    # Independent reference: torchvision's Resize(int) + CenterCrop, done with PIL.
    scale = int(image_size / crop_pct)
    new_w, new_h = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample)).astype(np.float32)
    top, left = int(round((new_h - image_size) / 2)), int(round((new_w - image_size) / 2))
    want = resized[top : top + image_size, left : left + image_size]

    got = keras.ops.convert_to_numpy(data.eval_transform(image, image_size, crop_pct, interpolation))
    assert got.shape == (image_size, image_size, 3) and got.dtype == np.float32
    diff = np.abs(got - want)
    assert diff.mean() < 0.5 and diff.max() <= 4  # TF's and PIL's antialiased kernels differ in rounding only
    # The tolerance is tight enough to see a crop one pixel off.
    if new_w > image_size:
        shifted = resized[top : top + image_size, left + 1 : left + 1 + image_size]
        if shifted.shape == want.shape:
            assert np.abs(got - shifted).mean() > 5


# ----------------------------------------------------------------------------- in memory


def test_in_memory_cache_written_and_reused(folder, tmp_path):
    root, special = folder
    cache_dir = tmp_path / "cache"
    mem = data.load_in_memory(f"folder:{root}", image_size=16, val_split=0.2, seed=3, cache_dir=str(cache_dir))
    src = data.load_source(f"folder:{root}", val_split=0.2, seed=3)
    assert mem.skipped == 1 and mem.class_names == src.class_names
    assert mem.x_train.shape == (src.num_train, 16, 16, 3) and mem.x_train.dtype == np.uint8
    assert mem.x_val.shape == (src.num_val, 16, 16, 3)
    np.testing.assert_array_equal(mem.y_val, src.val.labels)  # the same split as the tf.data path
    np.testing.assert_array_equal(mem.y_train, src.train.labels)
    # A 16x16 image is stored as decoded: find the gray PNG among the val/train images.
    gray = np.repeat(np.asarray(Image.open(special["gray"]))[..., None], 3, axis=-1)
    all_images = np.concatenate([mem.x_train, mem.x_val])
    assert any(np.array_equal(im, gray) for im in all_images)
    # A 9x12 JPEG is resized (shorter side 16) and centre-cropped, as PIL does it.
    jpg = np.asarray(Image.open(root / "ant" / "000.jpg").convert("RGB"))
    ref = np.asarray(Image.fromarray(jpg).resize((21, 16), Image.BILINEAR))[:, 2:18]
    assert any(np.array_equal(im, ref) for im in all_images)

    cached = list(cache_dir.rglob("*.npy"))
    assert sorted(p.name for p in cached) == ["images.npy", "labels.npy"]
    assert not (root.parent / "images.convmixer-cache").exists()  # cache_dir wins over "beside the data"
    # Reused: a second call reads the .npy files (marked here) instead of decoding again.
    images_npy = next(p for p in cached if p.name == "images.npy")
    np.save(images_npy, np.full_like(np.load(images_npy), 7))
    again = data.load_in_memory(f"folder:{root}", image_size=16, val_split=0.2, seed=3, cache_dir=str(cache_dir))
    assert np.all(again.x_train == 7) and again.skipped == 1
    assert again.failures == mem.failures and [Path(p).name for p in mem.failures] == ["corrupt.jpg"]
    # A changed folder is a different cache entry.
    _save(np.zeros((16, 16, 3), np.uint8), root / "ant" / "new.png")
    fresh = data.load_in_memory(f"folder:{root}", image_size=16, val_split=0.2, seed=3, cache_dir=str(cache_dir))
    assert len(fresh.y_train) + len(fresh.y_val) == 34 and not np.all(fresh.x_train == 7)


def test_in_memory_cache_beside_data_by_default(folder):
    root, _ = folder
    mem = data.load_in_memory(f"folder:{root}", image_size=8, val_split=0)
    assert len(mem.x_val) == 0 and len(mem.x_train) == 33
    assert Path(mem.cache_path).parent == root.parent / "images.convmixer-cache"
    assert (Path(mem.cache_path) / "images.npy").is_file()


def test_in_memory_unwritable_cache_keeps_the_data(folder, tmp_path, caplog):
    root, _ = folder
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where the cache directory would go")
    with caplog.at_level(logging.WARNING, logger="keras_convmixer.data"):
        mem = data.load_in_memory(f"folder:{root}", image_size=8, val_split=0, cache_dir=str(blocker / "cache"))
    assert mem.cache_path is None and len(mem.x_train) == 33
    assert any("could not cache" in r.getMessage() for r in caplog.records)


def test_in_memory_separate_val_folder(folder, tmp_path):
    root, _ = folder
    val_root = tmp_path / "val"
    (val_root / "cat").mkdir(parents=True)
    _save(np.full((8, 8, 3), 9, np.uint8), val_root / "cat" / "0.png")
    mem = data.load_in_memory(f"folder:{root}", image_size=8, val_source=str(val_root), cache_dir=str(tmp_path / "c"))
    assert len(mem.x_train) == 33 and mem.y_val.tolist() == [2]  # "cat" is class 2 of the training folder
    np.testing.assert_array_equal(mem.x_val[0], np.full((8, 8, 3), 9, np.uint8))


def test_in_memory_digits():
    mem = data.load_in_memory("digits", image_size=24, val_split=0.1, seed=0)
    src = data.load_source("digits", val_split=0.1, seed=0)
    assert mem.x_train.shape == (src.num_train, 24, 24, 3) and mem.x_val.shape == (src.num_val, 24, 24, 3)
    np.testing.assert_array_equal(mem.y_val, src.val.labels)
    blocks = mem.x_val[..., 0].reshape(-1, 8, 3, 8, 3).mean(axis=(2, 4))
    assert np.corrcoef(blocks.ravel(), src.val.images[..., 0].ravel())[0, 1] > 0.95


def test_load_in_memory_without_tensorflow(folder, tmp_path):
    root, _ = folder
    code = HIDE_TENSORFLOW + (
        "from keras_convmixer import data\n"
        f"m = data.load_in_memory('folder:{root}', image_size=8, val_split=0.2, cache_dir={str(tmp_path / 'c')!r})\n"
        "d = data.load_in_memory('digits', image_size=16)\n"
        "assert m.x_train.shape[1:] == (8, 8, 3) and d.x_val.shape[1:] == (16, 16, 3)\n"
        "assert not any(k.split('.')[0] == 'tensorflow' for k in sys.modules)\n"
        "print('ok', len(m.y_train), len(m.y_val))\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "jax" if keras.backend.backend() == "tensorflow" else keras.backend.backend()}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok 26 7")


# ----------------------------------------------------------------------------- user mistakes


def _one_line(excinfo):
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("source", ["", "imagenet", "folder:", "tfds:", "digits:foo", "file:/x", "/some/path"])
def test_bad_source_strings(source):
    with pytest.raises(ValueError) as excinfo:
        data.load_source(source)
    assert "source" in _one_line(excinfo)


def test_missing_empty_and_all_corrupt_folders(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        data.load_source(f"folder:{tmp_path / 'nope'}")
    assert "nope" in _one_line(excinfo)
    with pytest.raises(FileNotFoundError):
        data.load_in_memory(f"folder:{tmp_path / 'nope'}", image_size=8)
    with pytest.raises(ValueError) as excinfo:
        data.load_source(f"folder:{tmp_path}")
    assert "class sub-folders" in _one_line(excinfo)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"garbage")
    (tmp_path / "a" / "y.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    for load in (lambda s: data.load_source(s), lambda s: data.load_in_memory(s, image_size=8)):
        with pytest.raises(ValueError) as excinfo:
            load(f"folder:{tmp_path}")
        assert "no decodable images" in _one_line(excinfo)


def test_bad_arguments(folder):
    root, _ = folder
    for val_split in (1.5, -0.1, 1000):
        with pytest.raises(ValueError) as excinfo:
            data.load_source(f"folder:{root}", val_split=val_split)
        assert "val_split" in _one_line(excinfo)
    with pytest.raises(ValueError, match="interpolation"):
        data.eval_transform(np.zeros((4, 4, 3), np.uint8), 4, 1.0, "lanczos7")
    with pytest.raises(ValueError, match="crop_pct"):
        data.eval_transform(np.zeros((4, 4, 3), np.uint8), 4, 1.5)
    with pytest.raises(ValueError) as excinfo:
        data.read_image(root / "cat" / "corrupt.jpg")
    assert "corrupt.jpg" in _one_line(excinfo)
    with pytest.raises(FileNotFoundError):
        data.read_image(root / "cat" / "missing.jpg")
    with pytest.raises(ValueError, match="tfds"):
        data.load_in_memory("tfds:cifar10", image_size=32)


def test_tfds_errors_without_network(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError) as excinfo:
        data.load_source("tfds:mnist", data_dir=str(tmp_path), download=False)
    message = _one_line(excinfo)
    assert "mnist" in message and "download" in message
    with pytest.raises(ValueError) as excinfo:
        data.load_source("tfds:no_such_dataset_xyz", data_dir=str(tmp_path))
    assert "no_such_dataset_xyz" in _one_line(excinfo)


def test_in_memory_worker_processes_match_in_process(folder, tmp_path, monkeypatch):
    root, _ = folder
    source = f"folder:{root}"
    serial = data.load_in_memory(source, image_size=12, val_split=0.2, seed=1, workers=0, cache_dir=str(tmp_path / "a"))
    monkeypatch.setattr(data, "_PROCESS_POOL_MIN_FILES", 1)  # the folder is tiny; use the processes anyway
    pooled = data.load_in_memory(source, image_size=12, val_split=0.2, seed=1, workers=2, cache_dir=str(tmp_path / "b"))
    for name in ("x_train", "y_train", "x_val", "y_val"):
        np.testing.assert_array_equal(getattr(pooled, name), getattr(serial, name), err_msg=name)
    assert pooled.skipped == serial.skipped == 1


def test_tfds_source_on_a_locally_built_dataset(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("importlib_resources", reason="tensorflow-datasets needs it to prepare a dataset")
    from tests import tfds_tiny

    data_dir = str(tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match="download"):
        data.load_source("tfds:tiny_convmixer_images", data_dir=data_dir)
    src = data.load_source("tfds:tiny_convmixer_images", data_dir=data_dir, download=True, val_split=0.25)
    assert src.class_names == tfds_tiny.CLASS_NAMES
    assert (src.num_train, src.num_val) == (9, 3)  # no validation split: the last 25% of train
    src = data.load_source("tfds:tiny_convmixer_images", data_dir=data_dir, val_source="test")  # prepared: no download
    assert (src.num_train, src.num_val) == (12, 6)
    images, labels = _batches(data.make_dataset(src.val, image_size=8, batch_size=4, training=False))
    np.testing.assert_array_equal(labels, np.arange(6) % 3)
    # Gray images become RGB; an 8-wide image of height >= 8 is centre-cropped, not resized.
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        want = tfds_tiny.tiny_image("test", i)
        if want.shape[0] == 8:
            np.testing.assert_array_equal(image, np.repeat(want, 3, axis=-1).astype(np.float32), err_msg=str(i))
        assert label == i % 3
    images, labels = _batches(data.make_dataset(src.train, image_size=8, batch_size=4, training=True))
    assert images.shape == (12, 8, 8, 3) and sorted(labels.tolist()) == sorted((np.arange(12) % 3).tolist())
    with pytest.raises(ValueError, match="no split"):
        data.load_source("tfds:tiny_convmixer_images", data_dir=data_dir, val_source="holdout")


# ----------------------------------------------------------------------------- every file accounted for


def _encoded(array, fmt, **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _png_of_zeros(path, width, height):
    """A black 1-bit PNG of ``width`` x ``height`` (a multiple of 500), written without holding its pixels."""

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    compressor = zlib.compressobj(1)
    rows = bytes(1 + (width + 7) // 8) * 500  # each row: a filter byte, then the packed bits
    idat = b"".join(compressor.compress(rows) for _ in range(height // 500)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture()
def damaged(tmp_path):
    """300 readable 8x8 images in two classes, and 4 JPEGs plus 1 PNG cut in half after a valid header."""
    rng = np.random.default_rng(7)
    root = tmp_path / "damaged"
    bad = []
    for c, name in enumerate(("cats", "dogs")):
        (root / name).mkdir(parents=True)
        for i in range(152):
            fmt = "PNG" if i % 10 == 0 else "JPEG"
            path = root / name / f"{i:03d}.{fmt.lower()[:3].replace('jpe', 'jpg')}"
            encoded = _encoded(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), fmt)
            if i in ((3, 77) if c == 0 else (40, 41, 150)):
                encoded = encoded[: len(encoded) // 2]
                bad.append(str(path))
            path.write_bytes(encoded)
    return root, sorted(bad)


def test_every_undecodable_file_is_counted_and_named_in_every_pipeline(damaged, tmp_path):
    root, bad = damaged
    n_good = 304 - len(bad)
    # The scan reads headers only: the damage is after them, so it finds nothing (and the folder is over 256 files).
    src = data.load_source(f"folder:{root}", val_split=0)
    assert src.num_train == 304 and src.skipped == 0
    good_labels = [y for p, y in zip(src.train.paths, src.train.labels, strict=True) if p not in bad]
    # Evaluation: every readable image comes out, with its label, and every other file is named with a reason.
    evaluation = data.make_dataset(src.train, image_size=8, batch_size=32, training=False)
    for _ in range(2):  # a second pass counts nothing twice
        images, labels = _batches(evaluation)
        assert len(images) == n_good
        np.testing.assert_array_equal(labels, good_labels)
        assert src.skipped == len(bad) and sorted(src.skipped_files) == bad
    assert all(reason for reason in src.audit.failures.values())
    assert f"{len(bad)} files could not be read (" in src.audit.summary()

    # Training streams, each recording into its own audit: endless (one pass of batches, plus the one that
    # shows the pass has ended), cached, and single passes with and without their remainder.
    batch = 16
    for kwargs in (
        dict(repeat=True, cache=False),
        dict(repeat=True, cache=True),
        dict(repeat=False, cache=False),
        dict(repeat=False, cache=True, drop_remainder=False),
    ):
        audit = data.DecodeAudit()
        ds = data.make_dataset(src.train, image_size=8, batch_size=batch, training=True, audit=audit, **kwargs)
        labels = []
        for _, y in ds.take(n_good // batch + 1 if kwargs["repeat"] else -1):
            labels += keras.ops.convert_to_numpy(y).tolist()
        assert sorted(audit.failures) == bad, kwargs
        assert len(audit) == len(bad)  # the second pass did not count them again
        if kwargs.get("drop_remainder") is False:  # one whole pass: the labels are the good files' labels
            assert Counter(labels) == Counter(good_labels)
    # The in-memory PIL path names the same files, and remembers them in its cache.
    for _ in range(2):
        mem = data.load_in_memory(f"folder:{root}", image_size=8, val_split=0, cache_dir=str(tmp_path / "c"))
        assert sorted(mem.failures) == bad and mem.skipped == len(bad) and len(mem.x_train) == n_good


def test_a_batch_may_hold_several_passes(tmp_path):
    root = tmp_path / "tiny"
    bad = []
    for i in range(5):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        encoded = _encoded(np.full((8, 8, 3), 40 * i, np.uint8), "JPEG")
        path = root / f"c{i % 2}" / f"{i}.jpg"
        path.write_bytes(encoded[: len(encoded) // 2] if i in (1, 4) else encoded)
        bad += [str(path)] if i in (1, 4) else []
    src = data.load_source(f"folder:{root}", val_split=0)
    for cache in (False, True):
        audit = data.DecodeAudit()
        ds = data.make_dataset(
            src.train, image_size=8, batch_size=8, training=True, repeat=True, cache=cache, audit=audit
        )
        (_, labels), *_ = ds.take(2)  # the first batch: two whole passes of the 3 good files, and then some
        assert sorted(audit.failures) == sorted(bad)
        assert Counter(keras.ops.convert_to_numpy(labels).tolist()[:6]) == {0: 4, 1: 2}  # files 0, 2 (c0) and 3 (c1)


def test_partial_evaluation_names_the_failures_it_passed(damaged):
    root, bad = damaged
    src = data.load_source(f"folder:{root}", val_split=0)
    ds = data.make_dataset(src.train, image_size=8, batch_size=50, training=False)
    first = next(iter(ds))
    seen_last = [p for p in src.train.paths if p not in bad][len(first[1]) - 1]
    passed = [p for p in bad if p < seen_last]
    assert passed and set(passed) <= set(src.skipped_files) <= set(bad)


def test_decode_audit_is_thread_safe_and_keeps_the_first_reason():
    audit = data.DecodeAudit()

    def add(k):
        for i in range(200):
            audit.add(f"/x/{i % 50}.jpg", f"reason {k}")

    threads = [threading.Thread(target=add, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(audit) == 50 and len(set(audit.failures.values())) <= 8
    assert list(audit.failures) == [f"/x/{i}.jpg" for i in range(50)]  # the order they were found
    summary = audit.summary(limit=2)
    assert summary.startswith("50 files could not be read (/x/0.jpg: reason ") and summary.endswith("; and 48 more)")
    assert "\n" not in summary
    audit.failures.clear()  # a copy
    assert len(audit) == 50


def test_a_huge_image_is_named_and_never_decoded(tmp_path):
    root = tmp_path / "bomb"
    for name, side in (("a", 16), ("b", 8)):
        (root / name).mkdir(parents=True)
        for i in range(3):
            _save(np.full((side, side, 3), 40 * i, np.uint8), root / name / f"{i}.png")
    big = _png_of_zeros(root / "a" / "big.png", 20000, 20000)
    assert big.stat().st_size < 2_000_000
    reason = "20000x20000 = 400,000,000 pixels, over the limit of 89,478,485"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    src = data.load_source(f"folder:{root}", val_split=0)
    assert src.skipped_files == (str(big),) and reason in src.audit.failures[str(big)]
    assert src.num_train == 6
    # A split that the scan did not read: the pipeline reads the size from the encoded bytes instead.
    split = data.Split("files", labels=np.zeros(2, np.int32), paths=(str(big), str(root / "a" / "0.png")), size=2)
    audit = data.DecodeAudit()
    images, _ = _batches(data.make_dataset(split, image_size=8, batch_size=2, training=False, audit=audit))
    assert len(images) == 1 and list(audit.failures) == [str(big)] and reason in audit.failures[str(big)]
    mem = data.load_in_memory(f"folder:{root}", image_size=8, val_split=0, cache_dir=str(tmp_path / "c"))
    assert list(mem.failures) == [str(big)] and reason in mem.failures[str(big)] and len(mem.x_train) == 6
    with pytest.raises(ValueError) as excinfo:
        data.read_image(big)
    assert str(big) in _one_line(excinfo) and reason in str(excinfo.value)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 500, f"peak memory grew by {grown_mb:.0f} MB: the image was decoded"  # decoded: 1.2 GB
    # The limit is the caller's to set, everywhere.
    small = data.load_source(f"folder:{root}", val_split=0, max_pixels=64)
    assert small.num_train == 3 and small.skipped == 4
    assert "16x16 = 256 pixels, over the limit of 64" in small.audit.failures[str(root / "a" / "0.png")]
    assert data.read_image(root / "b" / "0.png", max_pixels=64).shape == (8, 8, 3)
    with pytest.raises(ValueError, match="over the limit of 63"):
        data.read_image(root / "b" / "0.png", max_pixels=63)
    with pytest.raises(ValueError, match="max_pixels"):
        data.load_in_memory(f"folder:{root}", image_size=8, max_pixels=0)


@pytest.mark.parametrize(
    "fmt,kwargs,mode",
    [
        ("JPEG", {}, "RGB"),
        ("PNG", {}, "RGB"),
        ("GIF", {}, "P"),
        ("BMP", {}, "RGB"),
        ("WEBP", {"lossless": False}, "RGB"),  # VP8
        ("WEBP", {"lossless": True}, "RGB"),  # VP8L
        ("WEBP", {"lossless": False}, "RGBA"),  # VP8X (extended, for the alpha)
    ],
)
def test_sizes_read_from_headers_match_pil_and_the_decoder(tmp_path, fmt, kwargs, mode):
    rng = np.random.default_rng(3)
    height, width = 13, 29
    array = rng.integers(0, 256, (height, width, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    im = Image.fromarray(array)
    if mode == "P":
        im = im.convert("P")
    path = tmp_path / f"image.{fmt.lower()}"
    im.save(path, format=fmt, **kwargs)
    with Image.open(path) as ref:  # the independent reference
        assert ref.size == (width, height)
    assert data._image_header(str(path)) == (fmt, (height, width))  # the scan's reader
    contents = tf.io.read_file(str(path))
    got = [int(v) for v in data._encoded_size(contents)]  # the pipeline's reader
    assert got == [height, width]
    assert tuple(tf.io.decode_image(contents, expand_animations=False).shape[:2]) == (height, width)


def test_symlink_loop_counts_each_image_once(tmp_path, caplog):
    rng = np.random.default_rng(0)
    root = tmp_path / "linked"
    for name in ("x", "y"):
        (root / name / "sub").mkdir(parents=True)
        for i in range(24):
            where = root / name / ("sub" if i % 2 else "") / f"{i:02d}.png"
            _save(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), where)
    os.symlink(root / "x", root / "x" / "sub" / "loop")  # x/sub/loop -> x: a cycle
    os.symlink(root / "y" / "00.png", root / "y" / "again.png")  # one file under two names
    with caplog.at_level(logging.WARNING, logger="keras_convmixer.data"):
        src = data.load_source(f"folder:{root}", val_split=0.25, seed=0)
    assert src.num_train + src.num_val == 48
    assert dict(Counter(src.class_names[y] for y in np.concatenate([src.train.labels, src.val.labels]))) == {
        "x": 24,
        "y": 24,
    }
    real_train = {os.path.realpath(p) for p in src.train.paths}
    real_val = {os.path.realpath(p) for p in src.val.paths}
    assert len(real_train) == src.num_train and len(real_val) == src.num_val and real_train.isdisjoint(real_val)
    assert any("reached again through links" in r.getMessage() for r in caplog.records)
    mem = data.load_in_memory(f"folder:{root}", image_size=4, val_split=0, cache_dir=str(tmp_path / "c"))
    assert len(mem.x_train) == 48


def test_empty_class_and_single_class_warn(tmp_path, caplog):
    root = tmp_path / "few"
    for name, count in (("a", 3), ("b", 0), ("c", 2)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            _save(np.zeros((4, 4, 3), np.uint8), root / name / f"{i}.png")
    with caplog.at_level(logging.WARNING, logger="keras_convmixer.data"):
        src = data.load_source(f"folder:{root}", val_split=0)
    assert src.class_names == ["a", "b", "c"] and src.num_classes == 3  # the empty class keeps its output
    (message,) = [r.getMessage() for r in caplog.records if "'b'" in r.getMessage()]
    assert "no usable image files" in message and "kept as classes" in message and "\n" not in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="keras_convmixer.data"):
        mem = data.load_in_memory(f"folder:{root}", image_size=4, val_split=0, cache_dir=str(tmp_path / "c"))
    assert mem.class_names == ["a", "b", "c"]
    assert any("'b'" in r.getMessage() and "kept as classes" in r.getMessage() for r in caplog.records)
    single = tmp_path / "single"
    (single / "only").mkdir(parents=True)
    _save(np.zeros((4, 4, 3), np.uint8), single / "only" / "0.png")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="keras_convmixer.data"):
        data.load_source(f"folder:{single}", val_split=0)
    assert any("single class folder ('only')" in r.getMessage() for r in caplog.records)


def test_a_file_given_as_a_folder(folder, tmp_path):
    root, _ = folder
    afile = tmp_path / "images.zip"
    afile.write_bytes(b"PK not a folder")
    calls = {
        "source": lambda: data.load_source(f"folder:{afile}"),
        "val_source": lambda: data.load_source(f"folder:{root}", val_source=str(afile)),
        "in-memory source": lambda: data.load_in_memory(f"folder:{afile}", image_size=8),
        "in-memory val_source": lambda: data.load_in_memory(
            f"folder:{root}", image_size=8, val_source=f"folder:{afile}", cache_dir=str(tmp_path / "c")
        ),
    }
    for what, call in calls.items():
        with pytest.raises(ValueError) as excinfo:
            call()
        message = _one_line(excinfo)
        assert f"data folder {afile} is a file, not a directory of class folders" in message, what
        assert ("val_source" in message) == what.endswith("val_source"), what
