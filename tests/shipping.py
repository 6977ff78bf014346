"""Tiny run directories and a tiny trained colour classifier for the artifact, evaluation, prediction, export
and command-line tests (not tests)."""

import contextlib
import importlib
import json
import logging

import keras
import numpy as np
import pytest
from PIL import Image

import keras_convmixer as kc
from tests.helpers import randomize_batchnorm

TINY = dict(dim=8, depth=1, kernel_size=3, patch_size=4)

# The colour data set: class folders (sorted, as they are listed) of noisy single-colour images.
COLOURS = {
    "black": (0, 0, 0),
    "blue": (0, 0, 255),
    "cyan": (0, 255, 255),
    "green": (0, 255, 0),
    "magenta": (255, 0, 255),
    "red": (255, 0, 0),
    "white": (255, 255, 255),
    "yellow": (255, 255, 0),
}
CLASSES = list(COLOURS)
SIZE = 16
PER_CLASS = 4
MISLABELLED = 2  # red images filed under "green": a perfect colour classifier gets exactly these wrong
TOTAL = len(CLASSES) * PER_CLASS + MISLABELLED


def make_run_dir(path, *, image_size=16, class_names=("a", "b", "c", "d", "e", "f"), crop_pct=0.875, model=None):
    """A run dir per the run-dir contract, with a random (but non-trivial) logits model."""
    path.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = kc.ConvMixer(
            **TINY,
            classes=len(class_names),
            classifier_activation=None,
            input_shape=(image_size, image_size, 3),
        )
        randomize_batchnorm(model)
        head = model.get_layer("head")
        # Spread the logits so probabilities and the top-5 order are far from ties.
        rng = np.random.default_rng(0)
        head.kernel.assign(rng.normal(0, 3.0, head.kernel.shape).astype("float32"))
    model.save(path / "best.keras")
    config = {
        "model": "custom",
        "model_kwargs": dict(TINY, classes=len(class_names)),
        "image_size": image_size,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "crop_pct": crop_pct,
        "interpolation": "bilinear",
        "data": "generated",
        "val_split": 0.0,
        "seed": 0,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path, model


def softmax(x):
    x = np.asarray(x, "float64")
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def keras_outputs(model, images):
    """(probabilities, pooled features) straight from the Keras model (the reference)."""
    logits = model.predict(images, verbose=0)
    features = keras.Model(model.inputs, model.get_layer("pool").output).predict(images, verbose=0)
    return softmax(logits), features


# ----------------------------------------------------------------------------- the colour classifier


def noisy(colour, rng, h, w):
    base = np.array(colour, "float32")[None, None, :]
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype("uint8")


def write_colour_folder(root, rng):
    """PER_CLASS 20x26 images per colour, plus MISLABELLED red 22x18 images in the green folder."""
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            Image.fromarray(noisy(colour, rng, 20, 26)).save(root / name / f"{i}.png")
    for i in range(MISLABELLED):
        Image.fromarray(noisy(COLOURS["red"], rng, 22, 18)).save(root / "green" / f"red_{i}.png")


class _UnregisteredSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Stands in for a training run's custom schedule: its optimizer cannot be deserialized
    by a process that has not imported it, which must not stop evaluate/predict."""

    def __call__(self, step):
        return keras.ops.convert_to_tensor(0.02)

    def get_config(self):
        return {}


def train_colour_model(rng):
    x = np.concatenate([[noisy(c, rng, SIZE, SIZE) for _ in range(16)] for c in COLOURS.values()]).astype("float32")
    y = np.repeat(np.arange(len(COLOURS)), 16)
    model = kc.ConvMixer(16, 1, 3, 4, classes=len(COLOURS), classifier_activation=None, input_shape=(SIZE, SIZE, 3))
    model.compile(
        keras.optimizers.Adam(_UnregisteredSchedule()),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    for _ in range(20):
        model.fit(x, y, batch_size=32, epochs=5, shuffle=True, verbose=0)
        if (model.predict(x, verbose=0).argmax(-1) == y).all():
            return model
    pytest.fail("the tiny colour classifier did not fit its (trivially separable) training set")


def make_trained(tmp):
    """A run dir whose model classifies every image of the colour folder by its colour.

    Returns ``dict(model, run, data, tmp)``; the run's config names the folder with val_split 0.25.
    """
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    data = tmp / "colours"
    write_colour_folder(data, rng)
    model = train_colour_model(rng)
    run = tmp / "run"
    run.mkdir()
    model.save(run / "best.keras")
    config = {
        "model": "custom",
        "model_kwargs": dict(dim=16, depth=1, kernel_size=3, patch_size=4, classes=len(CLASSES)),
        "image_size": SIZE,
        "num_classes": len(CLASSES),
        "class_names": CLASSES,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "data": f"folder:{data}",
        "val_split": 0.25,
        "seed": 0,
    }
    (run / "config.json").write_text(json.dumps(config))
    return dict(model=model, run=run, data=data, tmp=tmp)


def torchvision_eval_images(files, image_size, crop_pct, interpolation="bilinear"):
    """Reference pixels: torchvision's Resize(int(size / crop_pct)) + CenterCrop(size), timm's eval transform,
    on each file's RGB image, as float32 ``[N, S, S, 3]`` (skips the test where torchvision is missing)."""
    from tests.vision_reference import vision_or_skip

    vision_or_skip()
    from torchvision import transforms as T

    mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[interpolation]
    transform = T.Compose([T.Resize(int(image_size / crop_pct), interpolation=mode), T.CenterCrop(image_size)])
    images = []
    for path in files:
        with Image.open(path) as image:
            images.append(np.asarray(transform(image.convert("RGB")), "float32"))
    return np.stack(images)


# ----------------------------------------------------------------------------- running the commands


@contextlib.contextmanager
def _package_logging_restored():
    """``main`` configures the package's logger for a terminal; the next tests must find it as it was."""
    logger = logging.getLogger("keras_convmixer")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        yield
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def run_cli(name, argv, capsys):
    """Run ``keras_convmixer.cli.<name>.main`` in-process; returns (exit code, stdout, stderr)."""
    module = importlib.import_module(f"keras_convmixer.cli.{name}")
    with _package_logging_restored():
        try:
            code = module.main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err):
    """The lines of stderr that are not progress (``INFO ...``) lines."""
    return [line for line in err.strip().splitlines() if line.strip() and not line.startswith("INFO ")]


def one_error_line(err):
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
