"""Data sources, described without decoding pixels.

Sources (strings, as on the command line):

* ``digits``: scikit-learn's bundled 8x8 handwritten digits, as RGB uint8. The embedded
  default: real data that needs no network.
* ``folder:<path>``: one sub-folder per class. Validation comes from ``val_source`` (another
  such folder) or from a stratified, seeded ``val_split`` of the folder.
* ``tfds:<name>``: a TensorFlow Datasets builder, read from ``data_dir``; downloads only when
  ``download=True``.

``load_source`` describes a source (class names, splits, unreadable files); ``make_dataset``
(``tf_pipeline``) decodes a split.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from keras_convmixer.data.folders import DecodeAudit, folder_split
from keras_convmixer.data.transforms import MAX_PIXELS, check_max_pixels


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split of a source, as ``make_dataset`` consumes it.

    ``kind`` is ``"files"`` (``paths`` + ``labels``), ``"arrays"`` (uint8 ``images`` + ``labels``)
    or ``"tfds"`` (``tfds_name``, ``tfds_split``, ``data_dir``). ``pixels`` is the decoded size
    in bytes when known, which decides whether tf.data caches it in RAM. Files that fail to decode
    are recorded in ``audit``; files over ``max_pixels`` (None: no limit) are recorded, never decoded.
    ``sizes_checked`` says the scan already read every file's size against ``max_pixels``, so the
    pipeline need not read it again.
    """

    kind: str
    labels: np.ndarray | None = None
    paths: tuple[str, ...] | None = None
    images: np.ndarray | None = None
    tfds_name: str | None = None
    tfds_split: str | None = None
    data_dir: str | None = None
    size: int = 0
    pixels: int | None = None
    audit: DecodeAudit | None = None
    max_pixels: int | None = MAX_PIXELS
    sizes_checked: bool = False

    def __len__(self):
        return self.size


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
    """A loaded data source: class names, a train split, an optional val split and the unreadable files.

    ``audit`` is shared with the splits, so files that fail later, in ``make_dataset``, join the
    ones the scan found; ``skipped`` and ``skipped_files`` read it.
    """

    name: str
    class_names: list[str]
    train: Split
    val: Split | None
    audit: DecodeAudit = dataclasses.field(default_factory=DecodeAudit)

    @property
    def skipped(self) -> int:
        return len(self.audit)

    @property
    def skipped_files(self) -> tuple[str, ...]:
        return tuple(self.audit.failures)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_val(self) -> int:
        return 0 if self.val is None else len(self.val)


# ----------------------------------------------------------------------------- source strings


def parse_source(source: str) -> tuple[str, str]:
    """Split a source string into ``(kind, argument)``; raise a one-line ``ValueError`` if malformed."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"empty data source {source!r}: use 'digits', 'folder:<path>' or 'tfds:<name>'")
    source = source.strip()
    if source == "digits":
        return "digits", ""
    kind, sep, arg = source.partition(":")
    if sep and kind in ("folder", "tfds"):
        if not arg.strip():
            raise ValueError(f"data source {source!r} names no {'path' if kind == 'folder' else 'dataset'}")
        return kind, arg.strip()
    raise ValueError(f"unknown data source {source!r}: use 'digits', 'folder:<path>' or 'tfds:<name>'")


def folder_arg(val_source: str) -> Path:
    kind, arg = parse_source(val_source) if ":" in val_source or val_source == "digits" else ("folder", val_source)
    if kind != "folder":
        raise ValueError(f"val_source for a folder source must be a folder, got {val_source!r}")
    return Path(arg).expanduser()


# ----------------------------------------------------------------------------- splitting


def stratified_split(labels, val_split, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: ``(train_indices, val_indices)``, both sorted.

    ``val_split`` is a fraction in [0, 1) or a whole count. Per-class quotas use largest remainders,
    so the total is exactly ``round(fraction * n)`` (or the count).
    """
    labels = np.asarray(labels)
    n = len(labels)
    if isinstance(val_split, bool) or not isinstance(val_split, (int, float, np.integer, np.floating)):
        raise ValueError(f"val_split (--val-split) must be a fraction in [0, 1) or a count, got {val_split!r}")
    if 0 <= val_split < 1:
        target = int(round(float(val_split) * n))
    elif float(val_split).is_integer() and 1 <= val_split < n:
        target = int(val_split)
    else:
        raise ValueError(
            f"val_split (--val-split) must be a fraction in [0, 1) or a count below {n} images, got {val_split!r}"
        )
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (target / n)
    take = np.floor(quota).astype(int)
    remainder_order = np.argsort(-(quota - take), kind="stable")
    take[remainder_order[: target - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    val = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)]
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, int)
    mask = np.ones(n, bool)
    mask[val_idx] = False
    return np.flatnonzero(mask), val_idx


# ----------------------------------------------------------------------------- sources


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # values are 0..16
    return np.repeat(gray[..., None], 3, axis=-1), digits.target.astype(np.int32)


def _array_split(images, labels) -> Split:
    return Split("arrays", labels=labels, images=images, size=len(labels), pixels=int(images.nbytes))


def _load_tfds(name: str, *, val_split, val_source, data_dir, download) -> Source:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ValueError("tfds: sources need tensorflow-datasets (pip install tensorflow-datasets)") from None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"unknown TFDS dataset {name!r} (see tfds.list_builders())") from None
    if not builder.is_prepared():
        where = data_dir or "the default TFDS data dir (~/tensorflow_datasets)"
        if not download:
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in {where}: pass download=True (--download) "
                "or a --data-dir that holds it"
            )
        builder.download_and_prepare()
    info = builder.info
    if not info.supervised_keys:
        raise ValueError(f"TFDS dataset {name!r} has no (image, label) supervised keys")
    image_key, label_key = info.supervised_keys[:2]
    class_names = list(info.features[label_key].names)
    splits = info.splits
    if "train" not in splits:
        raise ValueError(f"TFDS dataset {name!r} has no 'train' split (has: {', '.join(splits.keys())})")
    n_train = splits["train"].num_examples
    train_name, val_name = "train", None
    if val_source is not None:
        if val_source not in splits:
            raise ValueError(f"TFDS dataset {name!r} has no split {val_source!r} (has: {', '.join(splits.keys())})")
        val_name = val_source
    elif "validation" in splits:
        val_name = "validation"
    elif val_split:
        # TFDS slices are contiguous, so this hold-out is deterministic but not stratified.
        n_val = int(round(val_split * n_train)) if val_split < 1 else int(val_split)
        train_name, val_name = f"train[:{n_train - n_val}]", f"train[{n_train - n_val}:]"
    shape = info.features[image_key].shape
    per_image = int(np.prod(shape[:2])) * 3 if all(d is not None for d in shape) else None

    def split(s):
        n = splits[s].num_examples
        return Split(
            "tfds",
            tfds_name=name,
            tfds_split=s,
            data_dir=data_dir,
            size=n,
            pixels=None if per_image is None else per_image * n,
        )

    return Source(f"tfds:{name}", class_names, split(train_name), split(val_name) if val_name else None)


def load_source(
    source: str,
    *,
    val_split: float = 0.1,
    val_source: str | None = None,
    seed: int = 0,
    data_dir: str | None = None,
    download: bool = False,
    verify: str = "header",
    max_pixels: int | None = MAX_PIXELS,
) -> Source:
    """Describe ``source`` without decoding pixels: class names, train/val splits, unreadable files.

    ``val_split`` is a fraction in [0, 1) or a whole number of images; the split is stratified
    per class and depends only on ``seed`` (folders, digits). ``val_source`` is a second folder
    (``folder:<path>`` or a bare path) for folders, or a split name (``validation``, ``test``) for TFDS.
    Folder files that cannot be used are left out of the splits and named in ``Source.audit``
    (``skipped``, ``skipped_files``), with the reason. ``verify="header"`` reads each file's
    signature and size (fast: the first bytes of each file); a file damaged after a valid header,
    e.g. a truncated JPEG, passes it and is recorded in the same audit when ``make_dataset``
    fails to decode it. ``"full"`` decodes every file with PIL first (a full decode of the data);
    ``"none"`` trusts every file. Images with more than ``max_pixels`` pixels (None: no limit)
    are refused from their headers, never decoded; the splits carry the limit to ``make_dataset``.
    """
    kind, arg = parse_source(source)
    if verify not in ("header", "full", "none"):
        raise ValueError(f"verify must be 'header', 'full' or 'none', got {verify!r}")
    max_pixels = check_max_pixels(max_pixels)
    if kind == "tfds":
        return _load_tfds(arg, val_split=val_split, val_source=val_source, data_dir=data_dir, download=download)
    if kind == "digits":
        images, labels = digits_arrays()
        if val_source is not None:
            raise ValueError("the digits source has no separate validation source; use val_split (--val-split)")
        train_idx, val_idx = stratified_split(labels, val_split, seed)
        val = _array_split(images[val_idx], labels[val_idx]) if len(val_idx) else None
        return Source("digits", [str(i) for i in range(10)], _array_split(images[train_idx], labels[train_idx]), val)

    root = Path(arg).expanduser()
    audit = DecodeAudit()
    class_names, paths, labels, decoded, failures = folder_split(root, None, verify, max_pixels)

    def split(paths, labels, decoded):
        return Split(
            "files",
            labels=labels,
            paths=tuple(paths),
            size=len(paths),
            pixels=None if decoded is None else int(decoded.sum()),
            audit=audit,
            max_pixels=max_pixels,
            sizes_checked=verify != "none",
        )

    if val_source is not None:
        val_root = folder_arg(val_source)
        _, vpaths, vlabels, vdecoded, vfailures = folder_split(
            val_root, class_names, verify, max_pixels, what="val_source data folder"
        )
        train, val = split(paths, labels, decoded), split(vpaths, vlabels, vdecoded)
        failures = failures + vfailures
    else:
        train_idx, val_idx = stratified_split(labels, val_split, seed)

        def part(idx):
            return split(paths[idx], labels[idx], None if decoded is None else decoded[idx])

        train, val = part(train_idx), (part(val_idx) if len(val_idx) else None)
    for path, reason in failures:
        audit.add(path, reason)
    return Source(f"folder:{root}", class_names, train, val, audit)
