"""Top-k class names and scores for image files and folders.

A ``.keras`` file or run dir is preprocessed with PIL and NumPy (the eval
transform of ``keras_convmixer.data.transforms``), so predicting needs no
TensorFlow under the JAX or torch backend. An exported SavedModel applies its
own in-graph transform through its ``serve`` signature.
"""

import os

import numpy as np

from keras_convmixer.artifacts import open_model


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


def preprocess(images_uint8, image_size, crop_pct=1.0, interpolation="bilinear"):
    """The eval transform on a list of uint8 HWC images of any sizes -> float32 ``[N, S, S, 3]``."""
    from keras_convmixer.data.transforms import eval_transform

    out = [eval_transform(im, image_size, crop_pct, interpolation) for im in images_uint8]
    return np.stack(out).astype("float32") if out else np.zeros((0, image_size, image_size, 3), "float32")


def softmax(logits):
    logits = np.asarray(logits, dtype="float64")
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)).astype("float32")


def predict(model_path, images, top_k=5, *, trust_savedmodel=False):
    """Top-k class names and scores for image files and folders: a list of dicts, one per file.

    A SavedModel needs ``trust_savedmodel=True`` (see ``keras_convmixer.artifacts.open_model``).
    """
    from keras_convmixer.data import read_image

    if isinstance(top_k, bool) or int(top_k) < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}.")
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    files = list_images(images)
    if not files:
        raise ValueError("images is empty: pass at least one image file or folder.")
    decoded = [read_image(f) for f in files]  # bad images fail before the (slow) model load
    bundle = open_model(model_path, trust_savedmodel=trust_savedmodel)
    k = min(int(top_k), bundle.num_classes)
    if bundle.saved_model is not None:
        import tensorflow as tf

        serve = bundle.saved_model.signatures["serve"]
        probabilities = np.concatenate([serve(images=tf.constant(im[None]))["probabilities"].numpy() for im in decoded])
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
