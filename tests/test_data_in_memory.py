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
