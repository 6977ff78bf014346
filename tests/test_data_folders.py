"""Folders (keras_convmixer.data.folders): listing, the header scan and the record of unusable files."""

import logging
import os
import resource
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from keras_convmixer import data, progress
from tests.data_images import batches, make_folder, one_line, png_of_zeros, save


def test_folder_skips_and_counts_corrupt_file(tmp_path, caplog):
    pytest.importorskip("tensorflow")
    root, _ = make_folder(tmp_path)
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
    images, labels = batches(data.make_dataset(src.train, image_size=8, batch_size=4, training=True, seed=1))
    assert images.shape == (src.num_train // 4 * 4, 8, 8, 3) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 255


def test_truncated_jpeg_counted_by_full_verify_and_by_tf_data(tmp_path):
    pytest.importorskip("tensorflow")
    root, _ = make_folder(tmp_path)
    good = (root / "ant" / "000.jpg").read_bytes()
    (root / "ant" / "truncated.jpg").write_bytes(good[:-100])  # a valid header, the scan data cut short
    header = data.load_source(f"folder:{root}", val_split=0)
    full = data.load_source(f"folder:{root}", val_split=0, verify="full")
    assert sorted(Path(p).name for p in full.skipped_files) == ["corrupt.jpg", "truncated.jpg"]
    assert header.skipped == 1 and header.num_train == full.num_train + 1
    # The header check lets it through; tf.data drops it instead of failing the epoch, and says so.
    images, _ = batches(data.make_dataset(header.train, image_size=8, batch_size=64, training=False))
    assert len(images) == full.num_train
    assert sorted(Path(p).name for p in header.skipped_files) == ["corrupt.jpg", "truncated.jpg"]
    assert header.skipped == 2


def test_missing_empty_and_all_corrupt_folders(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        data.load_source(f"folder:{tmp_path / 'nope'}")
    assert "nope" in one_line(excinfo)
    with pytest.raises(FileNotFoundError):
        data.load_in_memory(f"folder:{tmp_path / 'nope'}", image_size=8)
    with pytest.raises(ValueError) as excinfo:
        data.load_source(f"folder:{tmp_path}")
    assert "class sub-folders" in one_line(excinfo)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"garbage")
    (tmp_path / "a" / "y.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    for load in (lambda s: data.load_source(s), lambda s: data.load_in_memory(s, image_size=8)):
        with pytest.raises(ValueError) as excinfo:
            load(f"folder:{tmp_path}")
        assert "no decodable images" in one_line(excinfo)


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
    pytest.importorskip("tensorflow")
    root = tmp_path / "bomb"
    for name, side in (("a", 16), ("b", 8)):
        (root / name).mkdir(parents=True)
        for i in range(3):
            save(np.full((side, side, 3), 40 * i, np.uint8), root / name / f"{i}.png")
    big = png_of_zeros(root / "a" / "big.png", 20000, 20000)
    assert big.stat().st_size < 2_000_000
    reason = "20000x20000 = 400,000,000 pixels, over the limit of 89,478,485"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    src = data.load_source(f"folder:{root}", val_split=0)
    assert src.skipped_files == (str(big),) and reason in src.audit.failures[str(big)]
    assert src.num_train == 6
    # A split that the scan did not read: the pipeline reads the size from the encoded bytes instead.
    split = data.Split("files", labels=np.zeros(2, np.int32), paths=(str(big), str(root / "a" / "0.png")), size=2)
    audit = data.DecodeAudit()
    images, _ = batches(data.make_dataset(split, image_size=8, batch_size=2, training=False, audit=audit))
    assert len(images) == 1 and list(audit.failures) == [str(big)] and reason in audit.failures[str(big)]
    mem = data.load_in_memory(f"folder:{root}", image_size=8, val_split=0, cache_dir=str(tmp_path / "c"))
    assert list(mem.failures) == [str(big)] and reason in mem.failures[str(big)] and len(mem.x_train) == 6
    with pytest.raises(ValueError) as excinfo:
        data.read_image(big)
    assert str(big) in one_line(excinfo) and reason in str(excinfo.value)
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
    with pytest.raises(ValueError, match="max_pixels"):
        data.load_source(f"folder:{root}", max_pixels=True)


def test_symlink_loop_counts_each_image_once(tmp_path, caplog):
    rng = np.random.default_rng(0)
    root = tmp_path / "linked"
    for name in ("x", "y"):
        (root / name / "sub").mkdir(parents=True)
        for i in range(24):
            where = root / name / ("sub" if i % 2 else "") / f"{i:02d}.png"
            save(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), where)
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
            save(np.zeros((4, 4, 3), np.uint8), root / name / f"{i}.png")
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
    save(np.zeros((4, 4, 3), np.uint8), single / "only" / "0.png")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="keras_convmixer.data"):
        data.load_source(f"folder:{single}", val_split=0)
    assert any("single class folder ('only')" in r.getMessage() for r in caplog.records)


def test_a_file_given_as_a_folder(tmp_path):
    root, _ = make_folder(tmp_path)
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
        message = one_line(excinfo)
        assert f"data folder {afile} is a file, not a directory of class folders" in message, what
        assert ("val_source" in message) == what.endswith("val_source"), what


def test_the_scan_logs_its_progress(tmp_path, caplog, monkeypatch):
    root, _ = make_folder(tmp_path)
    with caplog.at_level(logging.INFO, logger="keras_convmixer.data"):
        data.load_source(f"folder:{root}", val_split=0)
    assert not [r for r in caplog.records if "checked image files" in r.getMessage()]  # quick work stays quiet
    monkeypatch.setattr(progress, "QUIET_S", 0.0)  # as if each file took long
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="keras_convmixer.data"):
        data.load_source(f"folder:{root}", val_split=0)
    lines = [r.getMessage() for r in caplog.records if "checked image files" in r.getMessage()]
    assert str(root) in lines[0] and lines[-1].startswith(f"checked image files in {root}: 34 of 34 (100%")
    assert 10 <= len(lines) <= 34  # a line per further tenth, not one per file
    assert all(r.name == "keras_convmixer.data.folders" for r in caplog.records if "checked" in r.getMessage())
