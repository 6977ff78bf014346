"""keras_convmixer.evaluation: every number of the report against NumPy, from the model's own logits."""

import logging

import keras
import numpy as np
import pytest
from PIL import Image

from keras_convmixer.evaluation import evaluate, per_class_accuracy, plot_confusion
from tests.shipping import make_run_dir, softmax

CLASSES = ("a", "b", "c", "d", "e", "f")
SIZE = 16
# Unequal classes, so that per-class accuracy and overall accuracy differ.
COUNTS = {"a": 2, "b": 5, "c": 3, "d": 4, "e": 1, "f": 9}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random (not trained) model and a folder of SIZE x SIZE images: at crop_pct 1.0 the eval transform
    leaves such images as they are, so the reference below feeds the decoded pixels straight to the model."""
    keras.utils.set_random_seed(0)
    tmp = tmp_path_factory.mktemp("evaluation")
    run, model = make_run_dir(tmp / "run", image_size=SIZE, class_names=CLASSES, crop_pct=1.0)
    rng = np.random.default_rng(1)
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        (tmp / "data" / name).mkdir(parents=True)
        for i in range(COUNTS[name]):
            image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(image).save(tmp / "data" / name / f"{i}.png")
            images.append(image)
            labels.append(label)
    logits = model.predict(np.stack(images).astype("float32"), verbose=0).astype("float64")
    return dict(run=run, data=f"folder:{tmp / 'data'}", logits=logits, labels=np.array(labels))


def _numpy_reference(logits, labels, num_classes):
    """The report's numbers, counted image by image."""
    predicted = logits.argmax(-1)
    confusion = np.zeros((num_classes, num_classes), int)
    for t, p in zip(labels, predicted, strict=True):
        confusion[t, p] += 1
    per_class = []
    for c in range(num_classes):
        mine = labels == c
        per_class.append(float((predicted[mine] == c).mean()) if mine.any() else None)
    top5 = [t in np.argsort(-row)[:5] for row, t in zip(logits, labels, strict=True)]
    loss = -np.log(softmax(logits)[np.arange(len(labels)), labels])
    return dict(
        confusion=confusion,
        per_class=per_class,
        top1=float((predicted == labels).mean()),
        top5=float(np.mean(top5)),
        loss=float(loss.mean()),
    )


def test_report_matches_numpy_from_the_logits(setup):
    report = evaluate(setup["run"], setup["data"], split="train", val_split=0, batch_size=4)
    expected = _numpy_reference(setup["logits"], setup["labels"], len(CLASSES))
    assert report["num_images"] == sum(COUNTS.values())
    assert report["class_names"] == list(CLASSES)
    assert report["confusion_matrix"]["rows"] == "true class"
    assert report["confusion_matrix"]["columns"] == "predicted class"
    np.testing.assert_array_equal(report["confusion_matrix"]["counts"], expected["confusion"])
    assert [row["class"] for row in report["per_class"]] == list(CLASSES)
    assert [row["images"] for row in report["per_class"]] == [COUNTS[name] for name in CLASSES]
    assert [row["top1"] for row in report["per_class"]] == pytest.approx(expected["per_class"], abs=1e-12)
    assert report["top1"] == pytest.approx(expected["top1"], abs=1e-12)
    assert report["top5"] == pytest.approx(expected["top5"], abs=1e-12)
    assert report["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    # A random model gets some right and some wrong: otherwise the comparison above proves little.
    assert 0 < expected["top1"] < 1 and 0 < expected["confusion"].trace()
    assert len({row["top1"] for row in report["per_class"]}) > 1


def test_progress_is_logged_per_tenth_of_the_batches(setup, caplog):
    with caplog.at_level(logging.INFO, logger="keras_convmixer"):
        evaluate(setup["run"], setup["data"], split="train", val_split=0, batch_size=5)
    messages = [r.getMessage() for r in caplog.records if r.name == "keras_convmixer.evaluation"]
    assert messages[0].startswith("Evaluating the train split of folder:") and "5 batches" in messages[0]
    assert [m.split(" (")[0] for m in messages[1:]] == [f"Evaluated batches: {i} of 5" for i in range(1, 6)]
    assert messages[-1].split(" (")[1].startswith("100%") and "images/s)" in messages[-1]


def test_per_class_accuracy_of_a_class_absent_from_the_split_is_none():
    rows = per_class_accuracy(np.array([[3, 1, 0], [0, 0, 0], [2, 0, 2]]), ["x", "y", "z"])
    assert rows == [
        {"class": "x", "index": 0, "images": 4, "correct": 3, "top1": 0.75},
        {"class": "y", "index": 1, "images": 0, "correct": 0, "top1": None},
        {"class": "z", "index": 2, "images": 4, "correct": 2, "top1": 0.5},
    ]


@pytest.mark.parametrize("classes", [3, 40])
def test_confusion_png(tmp_path, classes):
    counts = np.random.default_rng(0).integers(0, 20, (classes, classes))
    counts[1] = 0  # a class with no image must not divide by zero
    path = plot_confusion(counts, [f"class {i}" for i in range(classes)], tmp_path / "confusion.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= 300
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10  # something was drawn
    with pytest.raises(ValueError, match=f"shape \\({classes}, {classes}\\) but there are 2 class names"):
        plot_confusion(counts, ["a", "b"], tmp_path / "bad.png")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(split="test"), "split must be 'train', 'val' or 'all'"),
        (dict(batch_size=0), "batch_size must be"),
        (dict(batch_size=2.5), "batch_size must be"),
    ],
)
def test_bad_arguments_name_the_argument(setup, kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluate(setup["run"], setup["data"], **kwargs)


def test_a_model_without_a_data_source_asks_for_one(tmp_path):
    run, _ = make_run_dir(tmp_path / "run", image_size=SIZE)
    config = (run / "config.json").read_text().replace('"data": "generated"', '"data": null')
    (run / "config.json").write_text(config)
    with pytest.raises(ValueError, match="No data source: pass --data"):
        evaluate(run)
