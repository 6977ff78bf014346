"""keras_convmixer.prediction: top-k against torchvision's eval transform and the Keras model, without
TensorFlow on the JAX and torch backends; streamed in batches, unreadable files left out and named."""

import json
import logging
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

from keras_convmixer.data import DecodeAudit
from keras_convmixer.prediction import list_images, predict
from tests.data_images import encoded, make_damaged
from tests.helpers import HIDE_TENSORFLOW, ROOT
from tests.shipping import make_run_dir, softmax, torchvision_eval_images

BACKEND = keras.backend.backend()
SIZE, CROP = 16, 0.875
CLASSES = ["a", "b", "c", "d", "e", "f"]
# Portrait, landscape and odd sizes: the resize and the centre crop both matter.
SHAPES = [(20, 30), (37, 16), (16, 16), (25, 25)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    keras.utils.set_random_seed(0)
    tmp = tmp_path_factory.mktemp("prediction")
    run, model = make_run_dir(tmp / "run", image_size=SIZE, crop_pct=CROP)
    rng = np.random.default_rng(3)
    folder = tmp / "images"
    folder.mkdir()
    for i, (h, w) in enumerate(SHAPES):
        # Smooth images (a gradient plus mild noise), as photos are: resamplers agree on them.
        ramp = np.linspace(0, 200, w)[None, :, None] + np.linspace(0, 50, h)[:, None, None]
        image = np.clip(ramp + rng.normal(0, 5, (h, w, 3)) + 10 * np.arange(3), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return dict(run=run, model=model, folder=folder, tmp=tmp)


def _torchvision_probabilities(model, files):
    """Reference: torchvision's eval transform on the PIL image, then the Keras model's own softmax."""
    return softmax(model.predict(torchvision_eval_images(files, SIZE, CROP), verbose=0))


def _check(results, files, probabilities, k):
    assert [r["file"] for r in results] == [str(f) for f in files]
    for result, probs in zip(results, probabilities, strict=True):
        order = np.argsort(-probs, kind="stable")[:k]
        assert [t["class"] for t in result["top_k"]] == [CLASSES[i] for i in order]
        assert [t["index"] for t in result["top_k"]] == order.tolist()
        np.testing.assert_allclose([t["score"] for t in result["top_k"]], probs[order], atol=1e-5)


def test_predict_matches_torchvision_and_keras(setup):
    results = predict(setup["run"], [setup["folder"]], top_k=3)
    files = [setup["folder"] / f"{i}.png" for i in range(len(SHAPES))]  # sorted, notes.txt left out
    _check(results, files, _torchvision_probabilities(setup["model"], files), k=3)


def test_top_k_is_capped_at_the_number_of_classes(setup):
    image = setup["folder"] / "1.png"
    (result,) = predict(setup["run"] / "best.keras", image, top_k=50)
    assert sorted(t["class"] for t in result["top_k"]) == CLASSES
    assert sum(t["score"] for t in result["top_k"]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("top_k", [0, -1, True])
def test_a_bad_top_k_names_the_argument(setup, top_k):
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        predict(setup["run"], [setup["folder"] / "0.png"], top_k=top_k)


def test_list_images(setup, tmp_path):
    folder = setup["folder"]
    single = folder / "2.png"
    assert list_images([folder, single]) == [str(folder / f"{i}.png") for i in range(len(SHAPES))] + [str(single)]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "sub").mkdir()
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no image")
    with pytest.raises(FileNotFoundError, match="has no image files"):
        list_images([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images([tmp_path / "nope.png"])
    with pytest.raises(ValueError, match="images is empty"):
        predict(setup["run"], [])


@pytest.mark.skipif(BACKEND == "tensorflow", reason="the TensorFlow backend is TensorFlow")
def test_predict_on_a_keras_file_needs_no_tensorflow(setup):
    # A subprocess whose import system cannot find TensorFlow, as on a JAX- or torch-only machine.
    code = HIDE_TENSORFLOW + (
        "import json, sys\n"
        "from keras_convmixer.prediction import predict\n"
        f"results = predict({str(setup['run'] / 'best.keras')!r}, [{str(setup['folder'])!r}], top_k=6)\n"
        "assert not any(name.split('.')[0] == 'tensorflow' for name in sys.modules)\n"
        "print(json.dumps(results))\n"
    )
    env = {**os.environ, "KERAS_BACKEND": BACKEND}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    files = [setup["folder"] / f"{i}.png" for i in range(len(SHAPES))]
    _check(results, files, _torchvision_probabilities(setup["model"], files), k=6)


@pytest.mark.parametrize("batch_size", [0, -2, True, 1.5])
def test_a_bad_batch_size_names_the_argument(setup, batch_size):
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        predict(setup["run"], [setup["folder"] / "0.png"], batch_size=batch_size)


# --------------------------------------------------------------------------- folders as users have them


def test_a_folder_of_class_folders_is_searched_as_training_walks_it(tmp_path):
    root, _ = make_damaged(tmp_path)  # cats/ and dogs/, 152 images each
    (root / "dogs" / "deeper").mkdir()
    (root / "dogs" / "deeper" / "x.png").write_bytes((root / "cats" / "000.png").read_bytes())
    (root / ".hidden").mkdir()
    (root / ".hidden" / "y.png").write_bytes((root / "cats" / "000.png").read_bytes())
    # Sorted and depth first: a folder's own files, then its sub-folders'; hidden folders skipped.
    dogs = sorted(name for name in os.listdir(root / "dogs") if name != "deeper")
    expected = [str(root / "cats" / name) for name in sorted(os.listdir(root / "cats"))]
    expected += [str(root / "dogs" / name) for name in dogs] + [str(root / "dogs" / "deeper" / "x.png")]
    assert list_images([root]) == expected


def test_unreadable_files_are_left_out_named_and_counted(setup, tmp_path, caplog):
    root, damaged = make_damaged(tmp_path)  # 5 files cut after a valid header: only a decode finds them
    (root / "dogs" / "not_really.png").write_bytes(b"plain text with an image's name")  # the header scan finds it
    audit = DecodeAudit()
    with caplog.at_level(logging.WARNING):
        results = predict(setup["run"], [root], top_k=2, batch_size=7, audit=audit)
    bad = sorted([*damaged, str(root / "dogs" / "not_really.png")])
    good = [f for f in list_images([root]) if f not in bad]
    assert len(good) == 299 and sorted(audit.failures) == bad
    _check(results, good, softmax(setup["model"].predict(_pil_eval_images(good), verbose=0)), k=2)
    # One line, and nothing else warns (no retracing for batches that skipped files shortened).
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert line.startswith("Left out 6 of 305 image files that could not be read: ")
    assert all(path in line for path in bad) and "\n" not in line


def test_a_folder_with_no_readable_file_fails_in_one_line(setup, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 5)
    (tmp_path / "bad" / "b.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="none of the 2 image files could be read: cannot decode image") as info:
        predict(setup["run"], [tmp_path / "bad"])
    assert "\n" not in str(info.value) and "b.jpg" in str(info.value)


def _pil_eval_images(files, size=SIZE, crop_pct=CROP):
    """Reference pixels by PIL and NumPy alone: the shorter side resized to int(size / crop_pct) (bilinear),
    the longer keeping the aspect ratio (rounded down), then the centred size x size box."""
    scale = int(size / crop_pct + 1e-6)
    out = []
    for path in files:
        with Image.open(path) as image:
            image = image.convert("RGB")
        w, h = image.size
        new_w, new_h = (scale, scale * h // w) if w <= h else (scale * w // h, scale)
        pixels = np.asarray(image.resize((new_w, new_h), Image.BILINEAR), "float32")
        top, left = round((new_h - size) / 2), round((new_w - size) / 2)
        out.append(pixels[top : top + size, left : left + size])
    return np.stack(out)


# --------------------------------------------------------------------------- a big folder through the CLI

# Files small on disk (smooth PNGs and JPEGs of about 1 kB) that decode to 50-60 kB each: a predict that held
# every decoded image would grow by ~110 MB from N to 4N files; a streamed one by the results alone.
BIG_SHAPES = [(128, 128), (96, 160), (160, 112), (120, 120)]
RSS_GROWTH_LIMIT_MB = 40
_PEAK_RSS = r"""
import resource, sys
from keras_convmixer.cli.predict import main
code = main(sys.argv[1:])
print("@@peak_rss_kb", code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _blobs():
    rng = np.random.default_rng(11)
    blobs = []
    for i in range(16):
        h, w = BIG_SHAPES[i % len(BIG_SHAPES)]
        ramp = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.2, 1, 3) + np.linspace(0, 60, h)[:, None, None]
        image = np.clip(ramp, 0, 255).astype(np.uint8)
        blobs.append(encoded(image, "PNG") if i % 2 else encoded(image, "JPEG", quality=90))
    return blobs


def _write_big_folder(root, n, blobs):
    """``n`` files in three class folders, each a copy of one of ``blobs``, and 3 damaged files;
    returns ``{path: blob index}`` of the good ones and the damaged paths."""
    contents = {}
    for i in range(n):
        folder = root / ("abc"[i % 3])
        folder.mkdir(parents=True, exist_ok=True)
        k = (i * 7) % len(blobs)
        path = folder / f"{i:05d}.{'png' if k % 2 else 'jpg'}"
        path.write_bytes(blobs[k])
        contents[str(path)] = k
    damaged = [root / "a" / "00003.png", root / "b" / "00004.jpg", root / "c" / "zz.png"]
    damaged[0].write_bytes(blobs[1][: len(blobs[1]) // 2])
    damaged[1].write_bytes(blobs[0][: len(blobs[0]) // 3])
    damaged[2].write_bytes(b"not an image")
    for path in damaged:
        contents.pop(str(path), None)
    return contents, [str(p) for p in damaged]


def _predict_in_a_subprocess(run, folder, output):
    env = {**os.environ, "KERAS_BACKEND": BACKEND}
    argv = [str(run), str(folder), "--top-k", "3", "--output", str(output)]
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    marker = [line.split() for line in done.stdout.splitlines() if line.startswith("@@peak_rss_kb")]
    assert marker and marker[-1][1] == "0", done.stderr[-3000:]
    return int(marker[-1][2]) / 1024, done.stderr


@pytest.mark.skipif(BACKEND != "jax", reason="memory is the host decode's, the same on every backend: one is enough")
def test_a_big_folder_streams_in_bounded_memory_and_skips_damaged_files(setup, tmp_path):
    blobs = _blobs()
    small, _ = _write_big_folder(tmp_path / "small", 750, blobs)
    big, damaged = _write_big_folder(tmp_path / "big", 3000, blobs)
    peak_small, _ = _predict_in_a_subprocess(setup["run"], tmp_path / "small", tmp_path / "small.json")
    peak_big, err = _predict_in_a_subprocess(setup["run"], tmp_path / "big", tmp_path / "big.json")
    assert peak_big - peak_small < RSS_GROWTH_LIMIT_MB, (peak_small, peak_big)

    results = json.loads((tmp_path / "big.json").read_text())
    assert [r["file"] for r in results] == [f for f in list_images([tmp_path / "big"]) if f in big]
    assert len(results) == 2998  # 3000 written, 2 overwritten by damaged copies, 1 more damaged file
    warnings = [line for line in err.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING Left out 3 of 3001 image files")
    assert all(path in warnings[0] for path in damaged)
    # Each distinct content once through PIL + NumPy and the model: every file must match its own.
    shutil.rmtree(tmp_path / "small")
    refs = tmp_path / "refs"
    refs.mkdir()
    ref_files = [refs / f"{k}.img" for k in range(len(blobs))]
    for path, blob in zip(ref_files, blobs, strict=True):
        path.write_bytes(blob)
    expected = softmax(setup["model"].predict(_pil_eval_images(ref_files), verbose=0))
    _check(results, [r["file"] for r in results], expected[[big[r["file"]] for r in results]], k=3)


# --------------------------------------------------------------------------- the SavedModel path, batched


@pytest.mark.skipif(BACKEND not in ("tensorflow", "jax"), reason=f"SavedModel export runs from TF/JAX, not {BACKEND}")
def test_a_savedmodel_predicts_in_batches_and_skips_unreadable_files(setup, tmp_path):
    from keras_convmixer import export
    from keras_convmixer.data.tf_pipeline import eval_transform

    saved = export.export_model(setup["run"], "savedmodel", output=tmp_path / "sm")
    folder = tmp_path / "mixed"
    shutil.copytree(setup["folder"], folder)
    for i in range(len(SHAPES)):  # two images of each size, so that batches hold several sizes
        shutil.copy(folder / f"{i}.png", folder / f"{i}_again.png")
    (folder / "2_broken.png").write_bytes((folder / "2.png").read_bytes()[:60])
    audit = DecodeAudit()
    results = predict(saved, [folder], top_k=6, batch_size=3, trust_savedmodel=True, audit=audit)
    files = [f for f in list_images([folder]) if not f.endswith("2_broken.png")]
    assert list(audit.failures) == [str(folder / "2_broken.png")]
    # The reference: the graph's own transform (tf.data's resampler), then the Keras model's softmax.
    pixels = np.stack([np.asarray(eval_transform(np.asarray(Image.open(f).convert("RGB")), SIZE, CROP)) for f in files])
    _check(results, files, softmax(setup["model"].predict(pixels, verbose=0)), k=6)
