"""ImageNet-1k class names and ``decode_predictions``, without importing Keras.

The names ship in ``imagenet_classes.txt`` beside this module (one ``wnid<TAB>name`` line per class, in the
index order of timm's and torchvision's ImageNet-1k heads), so decoding works offline.
"""

import functools
import os

import numpy as np

_CLASSES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_classes.txt")
NUM_CLASSES = 1000


@functools.lru_cache(maxsize=1)
def _table():
    with open(_CLASSES_FILE, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    if len(rows) != NUM_CLASSES or any(len(row) != 2 for row in rows):
        raise RuntimeError(f"{_CLASSES_FILE} is damaged: expected {NUM_CLASSES} 'wnid<TAB>name' lines.")
    return tuple(row[0] for row in rows), tuple(row[1] for row in rows)


def class_names():
    """The 1000 ImageNet-1k class names, index ``i`` being the class of logit ``i`` (``"tench"``, ...)."""
    return list(_table()[1])


def wordnet_ids():
    """The 1000 WordNet ids (``"n01440764"``, ...) in the same order as ``class_names()``."""
    return list(_table()[0])


def decode_predictions(preds, top=5):
    """Decode ImageNet-1k predictions as ``keras.applications`` does.

    Args:
        preds: array-like of shape ``(samples, 1000)``: probabilities or logits (the order is the same).
        top: how many classes to return per sample.

    Returns:
        One list per sample of ``(wnid, class_name, score)`` tuples, highest score first.
    """
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or not 1 <= top <= NUM_CLASSES:
        raise ValueError(f"top must be a whole number from 1 to {NUM_CLASSES}, got {top!r}.")
    try:
        preds = np.asarray(preds)
    except (TypeError, RuntimeError):  # e.g. a tensor on an accelerator: Keras knows how to copy it to the host
        import keras

        preds = keras.ops.convert_to_numpy(preds)
    if preds.ndim != 2 or preds.shape[1] != NUM_CLASSES:
        raise ValueError(
            f"preds must have shape (samples, {NUM_CLASSES}) (ImageNet-1k scores), got shape {tuple(preds.shape)}."
        )
    wnids, names = _table()
    results = []
    for row in preds:
        # A stable sort keeps the lower index first among equal scores.
        order = np.argsort(-row, kind="stable")[: int(top)]
        results.append([(wnids[i], names[i], float(row[i])) for i in order])
    return results
