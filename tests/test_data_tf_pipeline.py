"""tf.data pipelines (keras_convmixer.data.tf_pipeline) on every backend; tf.data is the loader everywhere."""

from collections import Counter

import keras
import numpy as np
import pytest
from PIL import Image

from keras_convmixer import data
from keras_convmixer.data import tf_pipeline, transforms
from tests.data_images import AWKWARD_SIZES, batches, encoded, make_damaged, make_folder, one_line, smooth_image

tf = pytest.importorskip("tensorflow")


def test_training_dataset_order_maps_and_remainder(tmp_path):
    root, _ = make_folder(tmp_path)
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

    images, onehot = batches(make(0, "auto"))
    assert images.shape == (src.num_train // 5 * 5, 6, 6, 3)  # drop_remainder for training
    assert onehot.shape == (len(images), 3) and np.all(onehot.sum(axis=1) == 1)
    heights = {9.0, 10.0, 11.0, 16.0}  # the images' own heights reached image_map
    assert set(np.unique(images)) <= heights
    order = [np.argmax(y, axis=1).tolist() for _, y in make(0, "auto")]
    assert order == [np.argmax(y, axis=1).tolist() for _, y in make(0, False)]  # same seed, with or without cache
    other = [np.argmax(y, axis=1).tolist() for _, y in make(5, "auto")]
    assert order != other
    # Eval keeps every image, in the split's order.
    _, labels = batches(data.make_dataset(src.val, image_size=6, batch_size=4, training=False))
    np.testing.assert_array_equal(labels, src.val.labels)


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
    image = smooth_image(np.random.default_rng(h), h, w)
    # Independent reference: torchvision's Resize(int) + CenterCrop, done with PIL.
    scale = int(image_size / crop_pct)
    new_w, new_h = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample)).astype(np.float32)
    top, left = int(round((new_h - image_size) / 2)), int(round((new_w - image_size) / 2))
    want = resized[top : top + image_size, left : left + image_size]

    got = keras.ops.convert_to_numpy(tf_pipeline.eval_transform(image, image_size, crop_pct, interpolation))
    assert got.shape == (image_size, image_size, 3) and got.dtype == np.float32
    diff = np.abs(got - want)
    assert diff.mean() < 0.5 and diff.max() <= 4  # TF's and PIL's antialiased kernels differ in rounding only
    # The tolerance is tight enough to see a crop one pixel off.
    if new_w > image_size:
        shifted = resized[top : top + image_size, left + 1 : left + 1 + image_size]
        if shifted.shape == want.shape:
            assert np.abs(got - shifted).mean() > 5


def test_the_graph_geometry_is_eval_geometry():
    sizes = AWKWARD_SIZES + [(h, w) for h in (1, 2, 3, 17, 255, 1000) for w in (1, 2, 5, 16, 257, 999)]
    for image_size in (1, 7, 32, 224):
        for crop_pct in (0.875, 0.9, 0.96, 1.0):
            heights, widths = tf.constant([h for h, _ in sizes]), tf.constant([w for _, w in sizes])
            graph = np.stack([t.numpy() for t in tf_pipeline.eval_geometry_tf(heights, widths, image_size, crop_pct)])
            for (h, w), got in zip(sizes, graph.T, strict=True):
                assert tuple(got) == transforms.eval_geometry(h, w, image_size, crop_pct), (h, w, image_size, crop_pct)


def test_tf_and_pil_eval_transforms_agree_on_a_photo():
    from sklearn.datasets import load_sample_image

    photo = load_sample_image("china.jpg")  # a real 427x640 photograph, bundled with scikit-learn
    crops = {"landscape": photo, "portrait": photo[:, 100:401], "odd": photo[50:173, 300:377]}
    settings = [(224, 0.875, "bicubic"), (33, 0.96, "bilinear"), (32, 1.0, "bicubic")]
    for name, image in crops.items():
        for image_size, crop_pct, interpolation in settings:
            pil = transforms.eval_transform(image, image_size, crop_pct, interpolation)
            graph = tf_pipeline.eval_transform(image, image_size, crop_pct, interpolation).numpy()
            diff = np.abs(pil - graph)
            case = (name, image_size, crop_pct, interpolation)
            # Measured: 99.9% or more within one grey level, mean difference 0.05-0.2.
            assert np.mean(diff <= 1) >= 0.99 and diff.mean() < 0.3, case
            # A box one pixel off differs several times more (measured: 11x to 300x).
            new_h, new_w, top, left = transforms.eval_geometry(*image.shape[:2], image_size, crop_pct)
            resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
            big = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample), np.float32)
            for down, right in ((1, 0), (0, 1)):
                off = big[top + down : top + down + image_size, left + right : left + right + image_size]
                if off.shape == pil.shape:
                    assert np.abs(off - graph).mean() > 5 * diff.mean(), (*case, down, right)


def test_tf_eval_transform_arguments_are_checked():
    with pytest.raises(ValueError, match="interpolation"):
        tf_pipeline.eval_transform(np.zeros((4, 4, 3), np.uint8), 4, 1.0, "lanczos7")
    with pytest.raises(ValueError, match="crop_pct"):
        tf_pipeline.eval_transform(np.zeros((4, 4, 3), np.uint8), 4, 1.5)
    with pytest.raises(ValueError, match="image_size"):
        tf_pipeline.eval_transform(np.zeros((4, 4, 3), np.uint8), 0)


def test_make_dataset_arguments_are_checked():
    src = data.load_source("digits", val_split=0.1)
    cases = [
        (dict(split=None), "Split"),
        (dict(batch_size=0), "batch_size"),
        (dict(image_size=0), "image_size"),
        (dict(interpolation="lanczos7"), "interpolation"),
        (dict(audit="all"), "audit"),
        (dict(repeat=True), "repeat"),
    ]
    for change, name in cases:
        kwargs = dict(split=src.val, image_size=8, batch_size=4, training=False) | change
        with pytest.raises(ValueError) as excinfo:
            data.make_dataset(**kwargs)
        assert name in one_line(excinfo), change


def test_every_undecodable_file_is_counted_and_named_in_every_pipeline(tmp_path):
    root, bad = make_damaged(tmp_path)
    n_good = 304 - len(bad)
    # The scan reads headers only: the damage is after them, so it finds nothing (and the folder is over 256 files).
    src = data.load_source(f"folder:{root}", val_split=0)
    assert src.num_train == 304 and src.skipped == 0
    # Evaluation: every readable image comes out, every other file is named with a reason.
    images, labels = batches(data.make_dataset(src.train, image_size=8, batch_size=32, training=False))
    assert len(images) == n_good
    np.testing.assert_array_equal(
        labels, [y for p, y in zip(src.train.paths, src.train.labels, strict=True) if p not in bad]
    )
    assert src.skipped == len(bad) and sorted(src.skipped_files) == bad
    assert all(reason for reason in src.audit.failures.values())
    assert f"{len(bad)} files could not be read (" in src.audit.summary()

    def consumed(ds, n_batches):
        for i, _ in enumerate(ds):
            if i + 1 == n_batches:
                return

    # Training streams, each recording into its own audit: endless (one pass of batches, plus the one that
    # shows the pass has ended), cached, and a single pass that drops its remainder.
    batch = 16
    for kwargs in (dict(repeat=True, cache=False), dict(repeat=True, cache=True), dict(repeat=False, cache=False)):
        audit = data.DecodeAudit()
        ds = data.make_dataset(src.train, image_size=8, batch_size=batch, training=True, audit=audit, **kwargs)
        consumed(ds, n_good // batch + 1 if kwargs["repeat"] else None)
        assert sorted(audit.failures) == bad, kwargs
        assert len(audit) == len(bad)  # a second pass did not count them again
    # The in-memory PIL path names the same files, and remembers them in its cache.
    for _ in range(2):
        mem = data.load_in_memory(f"folder:{root}", image_size=8, val_split=0, cache_dir=str(tmp_path / "c"))
        assert sorted(mem.failures) == bad and mem.skipped == len(bad) and len(mem.x_train) == n_good


def test_a_batch_may_hold_several_passes(tmp_path):
    # 3 readable files in a batch of 8: the repeated stream must fill it from later passes, dropping the damaged
    # files in each pass (and naming each once) rather than ending or stalling.
    root = tmp_path / "tiny"
    bad = []
    for i in range(5):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        image = encoded(np.full((8, 8, 3), 40 * i, np.uint8), "JPEG")
        path = root / f"c{i % 2}" / f"{i}.jpg"
        path.write_bytes(image[: len(image) // 2] if i in (1, 4) else image)
        bad += [str(path)] if i in (1, 4) else []
    src = data.load_source(f"folder:{root}", val_split=0)
    for cache in (False, True):
        audit = data.DecodeAudit()
        ds = data.make_dataset(
            src.train, image_size=8, batch_size=8, training=True, repeat=True, cache=cache, audit=audit
        )
        (_, labels), *_ = ds.take(2)  # the first batch: two whole passes of the 3 good files, and then some
        assert sorted(audit.failures) == sorted(bad), cache
        # Files 0 and 2 are in c0, file 3 in c1: two passes give four 0s and two 1s.
        assert Counter(keras.ops.convert_to_numpy(labels).tolist()[:6]) == {0: 4, 1: 2}, cache


def test_partial_evaluation_names_the_failures_it_passed(tmp_path):
    root, bad = make_damaged(tmp_path)
    src = data.load_source(f"folder:{root}", val_split=0)
    ds = data.make_dataset(src.train, image_size=8, batch_size=50, training=False)
    first = next(iter(ds))
    seen_last = [p for p in src.train.paths if p not in bad][len(first[1]) - 1]
    passed = [p for p in bad if p < seen_last]
    assert passed and set(passed) <= set(src.skipped_files) <= set(bad)
