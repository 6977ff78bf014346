"""The TensorFlow-free in-memory loader (keras_convmixer.data.in_memory) and its cache."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from keras_convmixer import data, progress
from keras_convmixer.data import in_memory
from tests.data_images import make_folder, one_line, save
from tests.helpers import HIDE_TENSORFLOW


def test_in_memory_cache_written_and_reused(tmp_path):
    root, special = make_folder(tmp_path)
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
    save(np.zeros((16, 16, 3), np.uint8), root / "ant" / "new.png")
    fresh = data.load_in_memory(f"folder:{root}", image_size=16, val_split=0.2, seed=3, cache_dir=str(cache_dir))
    assert len(fresh.y_train) + len(fresh.y_val) == 34 and not np.all(fresh.x_train == 7)


def test_in_memory_cache_beside_data_by_default(tmp_path):
    root, _ = make_folder(tmp_path)
    mem = data.load_in_memory(f"folder:{root}", image_size=8, val_split=0)
    assert len(mem.x_val) == 0 and len(mem.x_train) == 33
    assert Path(mem.cache_path).parent == root.parent / "images.convmixer-cache"
    assert (Path(mem.cache_path) / "images.npy").is_file()


def test_in_memory_unwritable_cache_keeps_the_data(tmp_path, caplog):
    root, _ = make_folder(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where the cache directory would go")
    with caplog.at_level(logging.WARNING, logger="keras_convmixer.data"):
        mem = data.load_in_memory(f"folder:{root}", image_size=8, val_split=0, cache_dir=str(blocker / "cache"))
    assert mem.cache_path is None and len(mem.x_train) == 33
    assert any("could not cache" in r.getMessage() for r in caplog.records)


def test_in_memory_separate_val_folder(tmp_path):
    root, _ = make_folder(tmp_path)
    val_root = tmp_path / "val"
    (val_root / "cat").mkdir(parents=True)
    save(np.full((8, 8, 3), 9, np.uint8), val_root / "cat" / "0.png")
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


def test_load_in_memory_without_tensorflow(tmp_path):
    root, _ = make_folder(tmp_path)
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


def test_in_memory_arguments_are_checked(tmp_path):
    root, _ = make_folder(tmp_path)
    with pytest.raises(ValueError) as excinfo:
        data.load_in_memory("tfds:cifar10", image_size=32)
    assert "tfds" in one_line(excinfo)
    with pytest.raises(ValueError) as excinfo:
        data.load_in_memory(f"folder:{root}", image_size=8, interpolation="lanczos7")
    assert "interpolation" in one_line(excinfo)
    with pytest.raises(ValueError) as excinfo:
        data.load_in_memory("digits", image_size=8, val_source=str(root))
    assert "val_split" in one_line(excinfo)


def test_in_memory_worker_processes_match_in_process(tmp_path, monkeypatch):
    root, _ = make_folder(tmp_path)
    source = f"folder:{root}"
    serial = data.load_in_memory(source, image_size=12, val_split=0.2, seed=1, workers=0, cache_dir=str(tmp_path / "a"))
    monkeypatch.setattr(in_memory, "_PROCESS_POOL_MIN_FILES", 1)  # the folder is tiny; use the processes anyway
    pooled = data.load_in_memory(source, image_size=12, val_split=0.2, seed=1, workers=2, cache_dir=str(tmp_path / "b"))
    for name in ("x_train", "y_train", "x_val", "y_val"):
        np.testing.assert_array_equal(getattr(pooled, name), getattr(serial, name), err_msg=name)
    assert pooled.skipped == serial.skipped == 1


def test_the_decode_logs_its_progress(tmp_path, caplog, monkeypatch):
    root, _ = make_folder(tmp_path)
    monkeypatch.setattr(progress, "QUIET_S", 0.0)  # as if each file took long
    with caplog.at_level(logging.INFO, logger="keras_convmixer.data"):
        data.load_in_memory(f"folder:{root}", image_size=8, val_split=0, cache_dir=str(tmp_path / "c"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("decoded image files")]
    assert lines and lines[-1].startswith(f"decoded image files in {root}: 34 of 34 (100%")
    counts = [int(line.split(": ")[1].split(" of ")[0]) for line in lines]
    assert counts == sorted(counts) and len(lines) <= 10  # per chunk of files, not per file
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="keras_convmixer.data"):  # a cache hit decodes nothing
        data.load_in_memory(f"folder:{root}", image_size=8, val_split=0, cache_dir=str(tmp_path / "c"))
    assert not [r for r in caplog.records if r.getMessage().startswith("decoded image files")]
    assert any(r.getMessage().startswith("read 33 decoded images from cache") for r in caplog.records)


# ----------------------------------------------------------------------------- the training stream


def chained_permutations(n, seed, passes):
    # The rule written out independently: seeded permutations of all n examples, one after another.
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(n) for _ in range(passes)])


def tagged_arrays(n):
    # Each image carries its index in every pixel, so a batch shows which examples it holds.
    images = (np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1) * np.ones((1, 2, 3, 3), np.uint8)).copy()
    return images, (np.arange(n, dtype=np.int32) * 7) % 10


@pytest.mark.parametrize("placement", ["host", "device"])
def test_stream_cuts_chained_permutations_into_batches(placement):
    if placement == "device" and keras.backend.backend() != "jax":
        pytest.skip("the device-resident stream is JAX's")
    n, batch = 23, 5  # batches straddle the passes; chunks of 2 steps straddle them too
    images, labels = tagged_arrays(n)
    stream = in_memory.batch_stream(images, labels, batch, seed=4, placement=placement, chunk_steps=2)
    drawn = [next(stream) for _ in range(14)]  # 70 examples: three passes and one more
    expected = chained_permutations(n, 4, passes=4)[:70]
    got = np.concatenate([keras.ops.convert_to_numpy(x["images"])[:, 0, 0, 0] for x, _ in drawn])
    np.testing.assert_array_equal(got, expected)
    for x, y in drawn:  # the labels travel with their images, twice (input and target)
        index = keras.ops.convert_to_numpy(x["images"])[:, 0, 0, 0]
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(y), labels[index])
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(x["labels"]), labels[index])
        assert keras.ops.convert_to_numpy(x["images"]).dtype == np.uint8  # 1 byte a pixel crosses


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the device-resident stream is JAX's")
def test_device_stream_copies_nothing_per_step():
    import jax

    n, batch = 40, 8
    images, labels = tagged_arrays(n)
    stream = in_memory.batch_stream(images, labels, batch, seed=0, placement="device")
    first, _ = next(stream)  # copies the data to the device and gathers the first pass
    assert isinstance(first["images"], jax.Array)
    # The rest of the pass: no transfer to the device at all, not even an explicit one. (A read back
    # would be a sync; the CPU backend's guard cannot see one, its device memory being the host's.)
    with jax.transfer_guard_host_to_device("disallow_explicit"):
        rest = [next(stream) for _ in range(n // batch - 1)]
    assert all(isinstance(x["images"], jax.Array) for x, _ in rest)
    seen = np.concatenate([np.asarray(x["images"])[:, 0, 0, 0] for x in [first, *(x for x, _ in rest)]])
    assert sorted(seen.tolist()) == list(range(n))
    # The next pass starts with one transfer: its indices.
    guard = jax.transfer_guard_host_to_device("disallow_explicit")
    with pytest.raises(Exception, match="host-to-device transfer"), guard:
        next(stream)


def test_stream_placement_rules():
    images, labels = tagged_arrays(12)
    on_jax = keras.backend.backend() == "jax"
    assert in_memory.stream_placement(images) == ("device" if on_jax else "host")
    assert in_memory.stream_placement(images, max_device_bytes=images.nbytes - 1) == "host"
    assert in_memory.stream_placement(images, "host") == "host"
    with pytest.raises(ValueError, match="placement must be one of"):
        in_memory.stream_placement(images, "gpu")
    if not on_jax:
        with pytest.raises(ValueError, match="needs the JAX backend"):
            in_memory.stream_placement(images, "device")
    with pytest.raises(ValueError, match="batch_size must be in"):
        next(in_memory.batch_stream(images, labels, 13, seed=0))
    with pytest.raises(ValueError, match="12 images but 11 labels"):
        next(in_memory.batch_stream(images, labels[:11], 4, seed=0))


def test_fit_trains_from_the_stream():
    # What training does with it: an endless stream, a fixed number of steps per epoch.
    images, labels = tagged_arrays(32)
    pixels = keras.Input((2, 3, 3), name="images", dtype="uint8")
    ids = keras.Input((), name="labels", dtype="int32")
    flat = keras.layers.Flatten()(keras.ops.cast(pixels, "float32") / 32.0)
    model = keras.Model({"images": pixels, "labels": ids}, keras.layers.Dense(10)(flat))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    stream = in_memory.batch_stream(images, labels, 8, seed=0)
    history = model.fit(stream, steps_per_epoch=4, epochs=2, shuffle=False, verbose=0)
    assert len(history.history["loss"]) == 2 and np.isfinite(history.history["loss"]).all()
