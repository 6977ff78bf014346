"""Sources (keras_convmixer.data.sources): source strings, stratified splits, folders, digits and TFDS."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from keras_convmixer import data
from tests.data_images import batches, make_folder, one_line, save


def _labels_of(split):
    return Counter(int(y) for y in split.labels)


def test_val_split_stratified_and_deterministic(tmp_path):
    root, _ = make_folder(tmp_path)
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


def test_separate_val_folder(tmp_path):
    root, _ = make_folder(tmp_path)
    rng = np.random.default_rng(1)
    val_root = tmp_path / "val"
    for name in ("bee", "cat"):  # a subset of the training classes
        (val_root / name).mkdir(parents=True)
        for i in range(3):
            save(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8), val_root / name / f"{i}.png")
    src = data.load_source(f"folder:{root}", val_source=f"folder:{val_root}", val_split=0.5)
    assert src.num_train == 33 and src.num_val == 6
    assert sorted(Counter(src.class_names[y] for y in src.val.labels).items()) == [("bee", 3), ("cat", 3)]
    (val_root / "dog").mkdir()
    with pytest.raises(ValueError, match="dog"):
        data.load_source(f"folder:{root}", val_source=str(val_root))


def test_digits_source_shapes_and_labels():
    pytest.importorskip("tensorflow")
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
    images, labels = batches(data.make_dataset(src.val, image_size=32, batch_size=64, training=False))
    assert images.shape == (src.num_val, 32, 32, 3) and labels.dtype == np.int32
    np.testing.assert_array_equal(labels, src.val.labels)
    np.testing.assert_array_equal(images[..., 0], images[..., 2])  # still gray
    # Upscaling keeps the picture: block means of the 32x32 image follow the 8x8 original.
    blocks = images[..., 0].reshape(-1, 8, 4, 8, 4).mean(axis=(2, 4))
    assert np.corrcoef(blocks.ravel(), src.val.images[..., 0].ravel())[0, 1] > 0.95


@pytest.mark.parametrize("source", ["", "imagenet", "folder:", "tfds:", "digits:foo", "file:/x", "/some/path"])
def test_bad_source_strings(source):
    with pytest.raises(ValueError) as excinfo:
        data.load_source(source)
    assert "source" in one_line(excinfo)


def test_bad_val_split_and_verify(tmp_path):
    root, _ = make_folder(tmp_path)
    for val_split in (1.5, -0.1, 1000):
        with pytest.raises(ValueError) as excinfo:
            data.load_source(f"folder:{root}", val_split=val_split)
        assert "val_split" in one_line(excinfo)
    with pytest.raises(ValueError) as excinfo:
        data.load_source(f"folder:{root}", verify="quick")
    assert "verify" in one_line(excinfo)
    with pytest.raises(ValueError) as excinfo:
        data.load_source("digits", val_source="folder:/x")
    assert "val_split" in one_line(excinfo)


def test_tfds_errors_without_network(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError) as excinfo:
        data.load_source("tfds:mnist", data_dir=str(tmp_path), download=False)
    message = one_line(excinfo)
    assert "mnist" in message and "download" in message
    with pytest.raises(ValueError) as excinfo:
        data.load_source("tfds:no_such_dataset_xyz", data_dir=str(tmp_path))
    assert "no_such_dataset_xyz" in one_line(excinfo)


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
    images, labels = batches(data.make_dataset(src.val, image_size=8, batch_size=4, training=False))
    np.testing.assert_array_equal(labels, np.arange(6) % 3)
    # Gray images become RGB; an 8-wide image of height >= 8 is centre-cropped, not resized.
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        want = tfds_tiny.tiny_image("test", i)
        if want.shape[0] == 8:
            np.testing.assert_array_equal(image, np.repeat(want, 3, axis=-1).astype(np.float32), err_msg=str(i))
        assert label == i % 3
    images, labels = batches(data.make_dataset(src.train, image_size=8, batch_size=4, training=True))
    assert images.shape == (12, 8, 8, 3) and sorted(labels.tolist()) == sorted((np.arange(12) % 3).tolist())
    with pytest.raises(ValueError, match="no split"):
        data.load_source("tfds:tiny_convmixer_images", data_dir=data_dir, val_source="holdout")
