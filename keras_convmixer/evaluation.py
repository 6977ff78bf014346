"""Accuracy of a model on one split of a data source: top-1, top-5, loss, per class, and a confusion matrix."""

import logging
import math
import os

import numpy as np

from keras_convmixer.artifacts import open_model
from keras_convmixer.progress import Progress

logger = logging.getLogger(__name__)

# The splits ``evaluate`` takes: the run's training or validation images, or every image of the data.
SPLITS = ("train", "val", "all")

# Above this many classes the PNG drops the tick labels and the per-cell counts, which would not be legible.
_LABELLED_CLASSES = 30
_ANNOTATED_CLASSES = 15


def evaluate(
    model_path,
    data=None,
    *,
    split=None,
    val_split=None,
    val_source=None,
    seed=None,
    batch_size=64,
    data_dir=None,
    trust_savedmodel=False,
):
    """Top-1, top-5, cross-entropy, per-class top-1 and the confusion matrix of a model on one split.

    ``data``, ``val_split`` and ``seed`` default to the run's config, so ``split="val"`` is the run's own
    validation split. ``split="all"`` takes every image of ``data`` (no hold-out; for a TFDS source its whole
    train split). ``split=None`` (the default) is ``"all"`` for a ``data`` other than the run's given without
    ``val_split`` or ``val_source`` (a held-out test folder), else ``"val"``. Returns a JSON-able dict
    (``keras_convmixer.jsontext.json_text`` writes it strictly). ``confusion_matrix["counts"][t][p]`` counts the
    images of true class ``t`` predicted as ``p``, both in ``class_names`` order. A SavedModel needs
    ``trust_savedmodel=True`` (see ``artifacts.open_model``).
    """
    from keras_convmixer import data as data_lib

    if split not in (None, *SPLITS):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number of at least 1, got {batch_size!r}.")
    bundle = open_model(model_path, trust_savedmodel=trust_savedmodel)
    config = bundle.config
    split, data, val_split = _chosen_split(split, data, val_split, val_source, config)
    seed = config.get("seed", 0) if seed is None else seed
    source = data_lib.load_source(data, val_split=val_split, val_source=val_source, seed=seed, data_dir=data_dir)
    _check_classes(bundle, source.class_names)
    chosen = source.val if split == "val" else source.train
    if chosen is None or len(chosen) == 0:
        raise ValueError(f"{data} has no {split!r} split (val_split={val_split}).")
    dataset = data_lib.make_dataset(
        chosen,
        image_size=bundle.image_size,
        batch_size=batch_size,
        training=False,
        crop_pct=bundle.crop_pct,
        interpolation=bundle.interpolation,
        cache=False,
    )
    batches = math.ceil(len(chosen) / batch_size)
    logger.info("Evaluating the %s split of %s: %d batches.", split, data, batches)
    scores = _score(bundle, dataset, batch_size, batches)
    if scores["count"] == 0:
        raise ValueError(f"No readable images in the {split!r} split of {data}.")
    count, confusion = scores["count"], scores["confusion"]
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
        "top1": int(np.trace(confusion)) / count,
        "top5": scores["topk"] / count,
        "top5_k": scores["k"],
        "loss": scores["loss_sum"] / count,
        "image_size": bundle.image_size,
        "crop_pct": bundle.crop_pct,
        "interpolation": bundle.interpolation,
        "class_names": bundle.class_names,
        "per_class": per_class_accuracy(confusion, bundle.class_names),
        "confusion_matrix": {"rows": "true class", "columns": "predicted class", "counts": confusion.tolist()},
    }


def _chosen_split(split, data, val_split, val_source, config):
    """``(split, data, val_split)`` once the defaults are filled in from the run's config."""
    if split is None:
        # A folder given alone that is not the run's own is a held-out set: all of it is scored.
        held_out = data and not _same_source(data, config.get("data")) and val_split is None and val_source is None
        split = "all" if held_out else "val"
    data = data or config.get("data")
    if not data:
        raise ValueError("No data source: pass --data (the model's config names none).")
    if split == "all":
        if val_source is not None or val_split not in (None, 0):
            raise ValueError("split 'all' scores every image of the data: it takes no val_split or val_source.")
        return split, data, 0
    return split, data, config.get("val_split", 0.1) if val_split is None else val_split


def _score(bundle, dataset, batch_size, batches):
    """One pass over ``dataset``: the confusion matrix, top-k hits and summed cross-entropy, in float64."""
    num_classes = bundle.num_classes
    k = min(5, num_classes)
    confusion = np.zeros((num_classes, num_classes), "int64")
    count = topk = 0
    loss_sum = 0.0
    progress = Progress("Evaluated batches", batches, logger, quiet_s=0.0)
    for images, labels in dataset.as_numpy_iterator():
        logits = np.asarray(bundle.logits(images, batch_size=batch_size), "float64")
        labels = labels.astype(int)
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        loss_sum += float(-log_probs[np.arange(len(labels)), labels].sum())
        np.add.at(confusion, (labels, logits.argmax(-1)), 1)
        best_k = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
        topk += int((best_k == labels[:, None]).any(-1).sum())
        count += len(labels)
        progress.advance(1, items=len(labels))
    if count and progress.done < batches:  # unreadable files made the last batches smaller or fewer than planned
        logger.info(
            "Evaluated %d batches (%d images), not the %d planned: see unreadable_files.", progress.done, count, batches
        )
    return dict(confusion=confusion, count=count, topk=topk, k=k, loss_sum=loss_sum)


def _same_source(a, b):
    """Whether two ``--data`` strings name the same source (a folder by its real path)."""
    from keras_convmixer.data import parse_source

    if not a or not b:
        return a == b
    (kind_a, arg_a), (kind_b, arg_b) = parse_source(a), parse_source(b)
    if kind_a == kind_b == "folder":
        return os.path.realpath(os.path.expanduser(arg_a)) == os.path.realpath(os.path.expanduser(arg_b))
    return (kind_a, arg_a) == (kind_b, arg_b)


def per_class_accuracy(confusion, class_names):
    """One dict per class: its images in the split, how many were predicted right, and their share
    (None for a class with no image in the split, rather than a division by zero)."""
    confusion = np.asarray(confusion)
    rows = []
    for i, name in enumerate(class_names):
        images, correct = int(confusion[i].sum()), int(confusion[i, i])
        rows.append(
            {
                "class": name,
                "index": i,
                "images": images,
                "correct": correct,
                "top1": correct / images if images else None,
            }
        )
    return rows


def _check_classes(bundle, data_class_names):
    if len(data_class_names) != bundle.num_classes:
        raise ValueError(f"The data has {len(data_class_names)} classes but the model has {bundle.num_classes}.")
    generic = all(name == f"class_{i}" for i, name in enumerate(bundle.class_names))
    if not generic and list(data_class_names) != bundle.class_names:
        raise ValueError(
            f"The data's classes {list(data_class_names)[:5]} do not match the model's {bundle.class_names[:5]}."
        )


def plot_confusion(confusion, class_names, path, title=None):
    """Write the confusion matrix as a PNG: rows are true classes, columns predicted ones, each row coloured
    by its share of the class's images (so small classes show as clearly as large ones)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from keras_convmixer.atomic import atomic_path

    counts = np.asarray(confusion, "int64")
    n = len(class_names)
    if counts.shape != (n, n):
        raise ValueError(f"confusion has shape {counts.shape} but there are {n} class names.")
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape, "float64"), where=totals > 0)
    side = min(4.0 + 0.4 * n, 20.0)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= _LABELLED_CLASSES:
        ax.set_xticks(range(n), [str(name) for name in class_names], rotation=90)
        ax.set_yticks(range(n), [str(name) for name in class_names])
    if n <= _ANNOTATED_CLASSES:
        for t in range(n):
            for p in range(n):
                if counts[t, p]:
                    ax.text(
                        p,
                        t,
                        str(counts[t, p]),
                        ha="center",
                        va="center",
                        color="white" if shares[t, p] > 0.5 else "black",
                        fontsize=8,
                    )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or f"confusion matrix ({int(counts.sum())} images)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path
