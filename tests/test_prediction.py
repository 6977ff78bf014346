"""keras_convmixer.prediction: top-k against torchvision's eval transform and the Keras model, without
TensorFlow on the JAX and torch backends."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

from keras_convmixer.prediction import list_images, predict
from tests.helpers import HIDE_TENSORFLOW
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
