"""Open a trained model in any of its shipped forms and run it on images.

Accepted: a ``.keras`` file, a run directory (``config.json`` + ``best.keras``,
``model.keras`` or ``last.keras``), or an exported SavedModel directory (with
its ``export.json``). All three give a ``ModelBundle`` with one interface:
``logits(images)`` on eval-transformed float32 ``[N, S, S, 3]`` pixels in
[0, 255], plus the class names and eval transform from the run's config.

``.keras`` files are loaded in Keras's safe mode (no code from the file runs).
A SavedModel cannot be opened that way: it is a TensorFlow graph, and running
it runs whatever ops it holds, file reads and writes included. So it is only
opened with ``trust_savedmodel=True`` (``--trust-savedmodel`` in the scripts).
"""

import dataclasses
import logging
import os
import zipfile

import numpy as np

from keras_convmixer import rundir

DEFAULT_IMAGE_SIZE = 224
SAVEDMODEL_TRUST_MESSAGE = (
    "a SavedModel runs its own TensorFlow graph, which can read and write files: pass --trust-savedmodel "
    "(trust_savedmodel=True) only for SavedModels you exported yourself or trust"
)

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
        return float(self.config.get("crop_pct") or 1.0)

    @property
    def interpolation(self):
        return self.config.get("interpolation") or "bilinear"

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
        if os.path.isfile(os.path.join(path, "config.json")):
            return _open_run_dir(path)
        raise ModelPathError(
            f"{path!r} is neither a run dir (config.json + best.keras) nor a SavedModel (saved_model.pb)."
        )
    if path.endswith(".keras"):
        config_file = os.path.join(os.path.dirname(path), "config.json")
        config = rundir.read_json(config_file) if os.path.isfile(config_file) else {}
        return _bundle(_load_keras(path), path, config, kind="keras", source=path)
    raise ModelPathError(f"{path!r} is not a .keras file, a run dir or a SavedModel dir.")


def is_saved_model_dir(path):
    return any(os.path.isfile(os.path.join(path, name)) for name in ("saved_model.pb", "saved_model.pbtxt"))


def _open_run_dir(path):
    config = rundir.read_json(os.path.join(path, "config.json"))
    present = [name for name in rundir.MODEL_FILES if os.path.isfile(os.path.join(path, name))]
    if not present:
        raise ModelPathError(f"Run dir {path!r} has no model file ({', '.join(rundir.MODEL_FILES)}).")
    broken = []  # "name (why)" for each file that exists but does not load
    for name in present:
        model_file = os.path.join(path, name)
        try:
            model = _load_keras(model_file)
        except KerasFileError as err:
            broken.append(f"{name} ({err.reason})")
            continue
        if broken:
            logger.warning("Run dir %r: cannot load %s; using %s instead.", path, ", ".join(broken), name)
        return _bundle(model, model_file, config, kind="run", source=path)
    missing = [f"{name} (missing)" for name in rundir.MODEL_FILES if name not in present]
    raise ModelPathError(f"Run dir {path!r} has no loadable model file: {', '.join(broken + missing)}.")


class KerasFileError(ModelPathError):
    def __init__(self, model_file, reason):
        super().__init__(f"Cannot load {model_file!r} as a Keras model: {reason}")
        self.reason = reason


def _load_keras(model_file):
    import keras

    import keras_convmixer  # noqa: F401  (registers our layers for deserialization)

    # Keras says "File not found" for an empty or truncated archive: name what is wrong instead.
    if os.path.getsize(model_file) == 0:
        raise KerasFileError(model_file, "the file is empty")
    if not zipfile.is_zipfile(model_file):
        raise KerasFileError(model_file, "not a complete .keras zip archive: truncated, or not a Keras file")
    try:
        return keras.saving.load_model(model_file, compile=False)  # inference only: no optimizer needed
    except Exception as err:  # zip/h5/config errors all mean "not a usable .keras file"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KerasFileError(model_file, first) from None


def _bundle(model, model_file, config, kind, source):
    config = _complete_config(config, model)
    return ModelBundle(kind=kind, source=source, config=config, model=model, model_file=model_file)


def _complete_config(config, model):
    """Fill what a bare ``.keras`` file does not say with its own shapes and neutral defaults."""
    config = dict(config)
    num_classes = int(model.get_layer("head").units) if _has_layer(model, "head") else None
    if not config.get("image_size"):
        size = model.input_shape[1]
        config["image_size"] = int(size) if size else DEFAULT_IMAGE_SIZE
    if num_classes is None:
        raise ModelPathError(f"Model {model.name!r} is not a ConvMixer classifier (it has no 'head' layer).")
    if not config.get("class_names"):
        config["class_names"] = [f"class_{i}" for i in range(num_classes)]
    if len(config["class_names"]) != num_classes:
        raise ModelPathError(
            f"config.json lists {len(config['class_names'])} class names but the model has {num_classes} outputs."
        )
    config.setdefault("num_classes", len(config["class_names"]))
    config.setdefault("crop_pct", 1.0)
    config.setdefault("interpolation", "bilinear")
    config.setdefault("model", model.name)
    return config


def _open_saved_model(path):
    import tensorflow as tf

    meta_file = os.path.join(path, "export.json")
    if not os.path.isfile(meta_file):
        raise ModelPathError(f"SavedModel {path!r} has no export.json (not exported by keras_convmixer).")
    meta = rundir.read_json(meta_file)
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


def _has_layer(model, name):
    return any(layer.name == name for layer in model.layers)


def logits_model(model):
    """``images -> (logits, pooled features)`` for a ConvMixer classifier.

    Logits are computed from the head's kernel so that models saved with a
    softmax head (the builders' default) and with logits (training runs) give
    the same thing.
    """
    import keras

    if not (_has_layer(model, "pool") and _has_layer(model, "head")):
        raise ModelPathError(f"Model {model.name!r} is not a ConvMixer classifier (no 'pool' and 'head' layers).")
    head = model.get_layer("head")
    features = model.get_layer("pool").output
    logits = keras.ops.add(keras.ops.matmul(features, head.kernel), head.bias)
    return keras.Model(model.inputs, [logits, features], name=f"{model.name}_logits")


def preprocess(images_uint8, image_size, crop_pct=1.0, interpolation="bilinear"):
    """The eval transform on a list of uint8 HWC images of any sizes -> float32 ``[N, S, S, 3]``."""
    from keras_convmixer.data import eval_transform

    out = [np.asarray(eval_transform(im, image_size, crop_pct, interpolation)) for im in images_uint8]
    return np.stack(out) if out else np.zeros((0, image_size, image_size, 3), "float32")


def softmax(logits):
    logits = np.asarray(logits, dtype="float64")
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)).astype("float32")


# --------------------------------------------------------------------------- evaluate


def evaluate(model_path, data=None, *, split="val", val_split=None, val_source=None, seed=None, batch_size=64,
             data_dir=None, trust_savedmodel=False):
    """Top-1, top-5 and cross-entropy of a model on one split of a data source.

    ``data``, ``val_split`` and ``seed`` default to the run's config, so
    ``split="val"`` is the run's own validation split. Returns a JSON-able dict.
    A SavedModel needs ``trust_savedmodel=True`` (see ``open_model``).
    """
    from keras_convmixer import data as data_lib

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}.")
    bundle = open_model(model_path, trust_savedmodel=trust_savedmodel)
    config = bundle.config
    data = data or config.get("data")
    if not data:
        raise ValueError("No data source: pass --data (the model's config names none).")
    val_split = config.get("val_split", 0.1) if val_split is None else val_split
    seed = config.get("seed", 0) if seed is None else seed
    source = data_lib.load_source(data, val_split=val_split, val_source=val_source, seed=seed, data_dir=data_dir)
    _check_classes(bundle, source.class_names)
    chosen = source.train if split == "train" else source.val
    if chosen is None or len(chosen) == 0:
        raise ValueError(f"{data} has no {split!r} split (val_split={val_split}).")
    dataset = data_lib.make_dataset(
        chosen, image_size=bundle.image_size, batch_size=batch_size, training=False,
        crop_pct=bundle.crop_pct, interpolation=bundle.interpolation, cache=False,
    )
    k = min(5, bundle.num_classes)
    count = top1 = topk = 0
    loss_sum = 0.0
    for images, labels in dataset.as_numpy_iterator():
        logits = np.asarray(bundle.logits(images, batch_size=batch_size), "float64")
        labels = labels.astype(int)
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        loss_sum += float(-log_probs[np.arange(len(labels)), labels].sum())
        top1 += int((logits.argmax(-1) == labels).sum())
        best_k = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
        topk += int((best_k == labels[:, None]).any(-1).sum())
        count += len(labels)
    if count == 0:
        raise ValueError(f"No readable images in the {split!r} split of {data}.")
    return {
        "model": bundle.source,
        "model_kind": bundle.kind,
        "data": data,
        "split": split,
        "val_split": val_split,
        "seed": seed,
        "num_images": count,
        "num_classes": bundle.num_classes,
        # Counted after the pass: the decode step records the files it could not use as it meets them.
        "skipped_files": source.skipped,
        "unreadable_files": source.audit.failures,
        "top1": top1 / count,
        "top5": topk / count,
        "top5_k": k,
        "loss": loss_sum / count,
        "image_size": bundle.image_size,
        "crop_pct": bundle.crop_pct,
        "interpolation": bundle.interpolation,
    }


def _check_classes(bundle, data_class_names):
    if len(data_class_names) != bundle.num_classes:
        raise ValueError(
            f"The data has {len(data_class_names)} classes but the model has {bundle.num_classes}."
        )
    generic = all(name == f"class_{i}" for i, name in enumerate(bundle.class_names))
    if not generic and list(data_class_names) != bundle.class_names:
        raise ValueError(
            f"The data's classes {list(data_class_names)[:5]} do not match the model's {bundle.class_names[:5]}."
        )


# --------------------------------------------------------------------------- predict


def list_images(paths):
    """Expand files and folders (their image files, sorted, not recursive) into a list of files."""
    from keras_convmixer.data import IMAGE_EXTENSIONS

    files = []
    for path in paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            found = sorted(
                os.path.join(path, name) for name in os.listdir(path) if name.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not found:
                raise FileNotFoundError(f"Folder {path!r} has no image files ({', '.join(IMAGE_EXTENSIONS)}).")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"Image path {path!r} does not exist.")
    return files


def predict(model_path, images, top_k=5, *, trust_savedmodel=False):
    """Top-k class names and scores for image files and folders: a list of dicts, one per file.

    A SavedModel needs ``trust_savedmodel=True`` (see ``open_model``).
    """
    from keras_convmixer.data import read_image

    if int(top_k) < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}.")
    files = list_images(images)
    decoded = [read_image(f) for f in files]  # bad images fail before the (slow) model load
    bundle = open_model(model_path, trust_savedmodel=trust_savedmodel)
    k = min(int(top_k), bundle.num_classes)
    if bundle.saved_model is not None:
        import tensorflow as tf

        serve = bundle.saved_model.signatures["serve"]
        probabilities = np.concatenate(
            [serve(images=tf.constant(im[None]))["probabilities"].numpy() for im in decoded]
        )
    else:
        x = preprocess(decoded, bundle.image_size, bundle.crop_pct, bundle.interpolation)
        probabilities = softmax(bundle.logits(x))
    names = bundle.class_names
    results = []
    for path, probs in zip(files, probabilities, strict=True):
        order = np.argsort(-probs, kind="stable")[:k]
        results.append(
            {"file": path, "top_k": [{"class": names[i], "index": int(i), "score": float(probs[i])} for i in order]}
        )
    return results
