"""Open a trained model in any of its shipped forms.

Accepted: a ``.keras`` file, a run directory (``config.json`` + ``best.keras``,
``model.keras`` or ``last.keras``), or an exported SavedModel directory (with
its ``export.json``). All three give a ``ModelBundle`` with one interface:
``logits(images)`` on eval-transformed float32 ``[N, S, S, 3]`` pixels in
[0, 255], plus the class names and eval transform from the run's config.

A ``.keras`` file carries its own eval preset (``preset_entries``, which ``atomic.save_model`` writes
into the archive: image size, crop, interpolation, class names, mean/std), which Keras's loader ignores, so
the file alone predicts and evaluates as its run does, copied anywhere. The preset wins over a
``config.json`` beside it.

``.keras`` files are loaded in Keras's safe mode (no code from the file runs).
A SavedModel cannot be opened that way: it is a TensorFlow graph, and running
it runs whatever ops it holds, file reads and writes included. So it is only
opened with ``trust_savedmodel=True`` (``--trust-savedmodel`` on the command line).
"""

import dataclasses
import json
import logging
import os
import zipfile

import numpy as np

from keras_convmixer import presets, pretrained, rundir, structure
from keras_convmixer.atomic import read_json
from keras_convmixer.errors import first_line

DEFAULT_IMAGE_SIZE = presets.UNNAMED_EVAL["image_size"]
SAVEDMODEL_TRUST_MESSAGE = (
    "a SavedModel runs its own TensorFlow graph, which can read and write files: pass --trust-savedmodel "
    "(trust_savedmodel=True) only for SavedModels you exported yourself or trust"
)

# The zip entry of a .keras archive that holds its eval preset, and the run-config keys it keeps.
PRESET_ENTRY = "convmixer_preset.json"
PRESET_KEYS = ("model", "image_size", "crop_pct", "interpolation", "class_names", "num_classes", "mean", "std")

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelBundle:
    kind: str  # "keras", "run" or "savedmodel"
    source: str  # absolute path of what was opened
    config: dict  # run config (model, image_size, class_names, crop_pct, interpolation, ...)
    model: object = None  # keras.Model (kind keras/run)
    model_file: str = None  # the .keras file that was loaded (kind keras/run)
    saved_model: object = None  # tf.saved_model.load result (kind savedmodel)
    _logits_model: object = dataclasses.field(default=None, repr=False)

    @property
    def image_size(self):
        return int(self.config["image_size"])

    @property
    def crop_pct(self):
        return float(self.config.get("crop_pct") or presets.eval_transform(self.config.get("model"))["crop_pct"])

    @property
    def interpolation(self):
        return self.config.get("interpolation") or presets.eval_transform(self.config.get("model"))["interpolation"]

    @property
    def class_names(self):
        return list(self.config["class_names"])

    @property
    def num_classes(self):
        return len(self.config["class_names"])

    def logits(self, images, batch_size=64):
        """Logits for eval-transformed float32 images ``[N, S, S, 3]`` in [0, 255]."""
        images = np.asarray(images, dtype="float32")
        if self.saved_model is not None:
            import tensorflow as tf

            fn = self.saved_model.signatures["serve_preprocessed"]
            chunks = [
                fn(images=tf.constant(images[i : i + batch_size]))["logits"].numpy()
                for i in range(0, len(images), batch_size)
            ]
            return np.concatenate(chunks) if chunks else np.zeros((0, self.num_classes), "float32")
        if self._logits_model is None:
            self._logits_model = logits_model(self.model)
        return np.asarray(self._logits_model.predict(images, batch_size=batch_size, verbose=0)[0])


class ModelPathError(ValueError):
    """The given path is not a model we can open."""


class UntrustedSavedModelError(ModelPathError):
    """A SavedModel was given without ``trust_savedmodel=True``."""


class KerasFileError(ModelPathError):
    def __init__(self, model_file, reason):
        super().__init__(f"Cannot load {model_file!r} as a Keras model: {reason}")
        self.reason = reason


def open_model(path, *, trust_savedmodel=False):
    """Open a ``.keras`` file, a run dir or an exported SavedModel as a ``ModelBundle``.

    A SavedModel is refused unless ``trust_savedmodel`` is true: loading and calling it runs its graph.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"Model path {path!r} does not exist.")
    if os.path.isdir(path):
        if is_saved_model_dir(path):
            if not trust_savedmodel:
                raise UntrustedSavedModelError(f"Not opening the SavedModel {path!r}: {SAVEDMODEL_TRUST_MESSAGE}.")
            return _open_saved_model(path)
        if os.path.isfile(os.path.join(path, rundir.CONFIG)):
            return _open_run_dir(path)
        raise ModelPathError(
            f"{path!r} is neither a run dir (config.json + best.keras) nor a SavedModel (saved_model.pb)."
        )
    if path.endswith(".keras"):
        model = _load_keras(path)
        return _bundle(model, path, {**pretrained.saved_config(path), **read_preset(path)}, kind="keras", source=path)
    raise ModelPathError(f"{path!r} is not a .keras file, a run dir or a SavedModel dir.")


def is_saved_model_dir(path):
    return any(os.path.isfile(os.path.join(path, name)) for name in ("saved_model.pb", "saved_model.pbtxt"))


def _open_run_dir(path):
    config = read_json(os.path.join(path, rundir.CONFIG))
    present = [name for name in rundir.MODEL_FILES if os.path.isfile(os.path.join(path, name))]
    if not present:
        raise ModelPathError(f"Run dir {path!r} has no model file ({', '.join(rundir.MODEL_FILES)}).")
    broken = []  # "name (why)" for each file that exists but does not load
    for name in present:
        model_file = os.path.join(path, name)
        try:
            model, preset = _load_keras(model_file), read_preset(model_file)
        except KerasFileError as err:
            broken.append(f"{name} ({err.reason})")
            continue
        if broken:
            logger.warning("Run dir %r: cannot load %s; using %s instead.", path, ", ".join(broken), name)
        return _bundle(model, model_file, {**config, **preset}, kind="run", source=path)
    missing = [f"{name} (missing)" for name in rundir.MODEL_FILES if name not in present]
    raise ModelPathError(f"Run dir {path!r} has no loadable model file: {', '.join(broken + missing)}.")


def preset_entries(config):
    """The archive entry that carries the eval preset of ``config`` (the ``PRESET_KEYS`` it has), for
    ``atomic.save_model(..., entries=preset_entries(config))``."""
    preset = {key: config[key] for key in PRESET_KEYS if config.get(key) is not None}
    return {PRESET_ENTRY: json.dumps(preset, indent=2, default=float)}


def read_preset(model_file):
    """The eval preset inside a ``.keras`` archive (``preset_entries``), ``{}`` where it holds none."""
    try:
        with zipfile.ZipFile(model_file) as archive:
            if PRESET_ENTRY not in archive.namelist():
                return {}
            preset = json.loads(archive.read(PRESET_ENTRY))
    except (OSError, zipfile.BadZipFile, ValueError) as err:
        raise KerasFileError(os.fspath(model_file), f"its {PRESET_ENTRY} cannot be read: {first_line(err)}") from None
    if not isinstance(preset, dict):
        raise KerasFileError(os.fspath(model_file), f"its {PRESET_ENTRY} is not a JSON object")
    return {key: value for key, value in preset.items() if key in PRESET_KEYS}


def _load_keras(model_file):
    from keras_convmixer import load_model  # registers our layers before Keras reads the file

    # Keras says "File not found" for an empty or truncated archive: name what is wrong instead.
    if os.path.getsize(model_file) == 0:
        raise KerasFileError(model_file, "the file is empty")
    if not zipfile.is_zipfile(model_file):
        raise KerasFileError(model_file, "not a complete .keras zip archive: truncated, or not a Keras file")
    try:
        return load_model(model_file, compile=False)  # inference only: no optimizer needed
    except Exception as err:  # zip/h5/config errors all mean "not a usable .keras file"
        raise KerasFileError(model_file, first_line(err)) from None


def _bundle(model, model_file, config, kind, source):
    config = _complete_config(config, model)
    return ModelBundle(kind=kind, source=source, config=config, model=model, model_file=model_file)


def _complete_config(config, model):
    """Fill what a bare ``.keras`` file does not say with its own shapes and neutral defaults."""
    config = dict(config)
    if not structure.has_layer(model, structure.HEAD):
        raise ModelPathError(f"Model {model.name!r} is not a ConvMixer classifier (it has no 'head' layer).")
    num_classes = int(model.get_layer(structure.HEAD).units)
    if not config.get("image_size"):
        size = model.input_shape[1]
        config["image_size"] = int(size) if size else DEFAULT_IMAGE_SIZE
    if not config.get("class_names"):
        # A bare .keras file names no classes: a 1000-class ImageNet variant is taken to hold ImageNet's.
        names = presets.default_class_names(model.name, num_classes)
        config["class_names"] = names or [f"class_{i}" for i in range(num_classes)]
    if len(config["class_names"]) != num_classes:
        raise ModelPathError(
            f"config.json lists {len(config['class_names'])} class names but the model has {num_classes} outputs."
        )
    config.setdefault("num_classes", len(config["class_names"]))
    config.setdefault("model", model.name)
    # A model that records no eval transform gets its variant's, or the one for an unnamed shape.
    transform = presets.eval_transform(config["model"])
    for key in ("crop_pct", "interpolation"):
        config.setdefault(key, transform[key])
    return config


def _open_saved_model(path):
    import tensorflow as tf

    meta_file = os.path.join(path, "export.json")
    if not os.path.isfile(meta_file):
        raise ModelPathError(f"SavedModel {path!r} has no export.json (not exported by keras_convmixer).")
    meta = read_json(meta_file)
    absent = [key for key in ("run_config", "input", "class_names") if not isinstance(meta.get(key), (dict, list))]
    if absent:
        raise ModelPathError(f"{meta_file!r} lacks {absent[0]!r} (not written by keras_convmixer's export).")
    loaded = tf.saved_model.load(path)
    missing = [name for name in ("serve", "serve_preprocessed") if name not in loaded.signatures]
    if missing:
        raise ModelPathError(f"SavedModel {path!r} lacks the signature {missing[0]!r}.")
    config = dict(meta["run_config"], **meta["input"])
    config["class_names"] = meta["class_names"]
    return ModelBundle(kind="savedmodel", source=path, config=config, saved_model=loaded)


def logits_model(model):
    """``images -> (logits, pooled features)`` for a ConvMixer classifier.

    Logits are computed from the head's kernel so that models saved with a
    softmax head (the builders' default) and with logits (training runs) give
    the same thing.
    """
    import keras

    if not (structure.has_layer(model, structure.POOL) and structure.has_layer(model, structure.HEAD)):
        raise ModelPathError(f"Model {model.name!r} is not a ConvMixer classifier (no 'pool' and 'head' layers).")
    head = model.get_layer(structure.HEAD)
    features = model.get_layer(structure.POOL).output
    logits = keras.ops.add(keras.ops.matmul(features, head.kernel), head.bias)
    return keras.Model(model.inputs, [logits, features], name=f"{model.name}_logits")
