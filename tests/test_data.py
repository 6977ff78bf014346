"""Data sources and pipelines (keras_convmixer.data) on every backend; tf.data is the loader everywhere."""

import logging
import os
import subprocess
import sys
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


def test_truncated_jpeg_counted_by_full_verify_and_dropped_by_tf_data(folder):
    root, _ = folder
    good = (root / "ant" / "000.jpg").read_bytes()
    (root / "ant" / "truncated.jpg").write_bytes(good[:-100])  # a valid header, the scan data cut short
    header = data.load_source(f"folder:{root}", val_split=0)
    full = data.load_source(f"folder:{root}", val_split=0, verify="full")
    assert sorted(Path(p).name for p in full.skipped_files) == ["corrupt.jpg", "truncated.jpg"]
    assert header.skipped == 1 and header.num_train == full.num_train + 1
    # The header check lets it through; tf.data then drops it instead of failing the epoch.
    images, _ = _batches(data.make_dataset(header.train, image_size=8, batch_size=64, training=False))
    assert len(images) == full.num_train


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
