"""Input pipelines: image sources, tf.data datasets and a TensorFlow-free in-memory loader.

Sources (strings, as on the command line):

* ``digits``: scikit-learn's bundled 8x8 handwritten digits, as RGB uint8. The embedded
  default: real data that needs no network.
* ``folder:<path>``: one sub-folder per class. Validation comes from ``val_source`` (another
  such folder) or from a stratified, seeded ``val_split`` of the folder.
* ``tfds:<name>``: a TensorFlow Datasets builder, read from ``data_dir``; downloads only when
  ``download=True``.

``load_source`` describes a source (class names, splits, skipped files) without decoding pixels.
``make_dataset`` turns a split into a batched ``tf.data.Dataset`` that ``model.fit`` accepts on
every backend. ``load_in_memory`` decodes a source once into uint8 arrays with PIL and NumPy and
caches them as ``.npy``; it never imports TensorFlow, so it runs where only JAX is installed.
TensorFlow is imported lazily, inside the functions that build tf.data pipelines.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# What TensorFlow's decode_image reads; PIL names the format of each file we scan.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_TF_DECODABLE_FORMATS = {"JPEG", "PNG", "BMP", "GIF", "WEBP"}
_SIGNATURES = (
    ("JPEG", b"\xff\xd8\xff"),
    ("PNG", b"\x89PNG\r\n\x1a\n"),
    ("GIF", b"GIF87a"),
    ("GIF", b"GIF89a"),
    ("BMP", b"BM"),
)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area")
_PIL_RESAMPLE = {"bilinear": 2, "bicubic": 3, "nearest": 0, "area": 4}  # Image.Resampling values
# Decoded splits up to this size are cached in RAM by tf.data (CIFAR-10 needs 150 MB).
CACHE_BUDGET_BYTES = 4 * 1024**3
_IN_MEMORY_CACHE_VERSION = 1
_CACHE_SUFFIX = ".convmixer-cache"  # <folder>.convmixer-cache/ beside a folder; never taken for a class
_PROCESS_POOL_MIN_FILES = 2048  # below this, starting worker processes costs more than it saves


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split of a source, as ``make_dataset`` consumes it.

    ``kind`` is ``"files"`` (``paths`` + ``labels``), ``"arrays"`` (uint8 ``images`` + ``labels``)
    or ``"tfds"`` (``tfds_name``, ``tfds_split``, ``data_dir``). ``pixels`` is the decoded size
    in bytes when known, which decides whether tf.data caches it in RAM.
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

    def __len__(self):
        return self.size


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
    """A loaded data source: class names, a train split and an optional val split."""

    name: str
    class_names: list[str]
    train: Split
    val: Split | None
    skipped: int = 0
    skipped_files: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_val(self) -> int:
        return 0 if self.val is None else len(self.val)


@dataclasses.dataclass(frozen=True, eq=False)
class InMemoryData:
    """Decoded uint8 NHWC arrays and int32 labels; ``x_val``/``y_val`` are empty when there is no val split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    class_names: list[str]
    skipped: int = 0
    cache_path: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


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


# ----------------------------------------------------------------------------- decoding with PIL


def _pil_to_rgb_array(im) -> np.ndarray:
    # 16/32-bit grayscale would be clipped by convert("RGB"); scale it down the way TF does (>> 8).
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        gray = np.asarray(im, dtype=np.int64)
        if im.mode == "I" and gray.max(initial=0) < 256:
            gray8 = gray.astype(np.uint8)
        else:
            gray8 = np.clip(gray >> 8, 0, 255).astype(np.uint8)
        return np.repeat(gray8[..., None], 3, axis=-1)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # PIL warns on P+transparency -> RGB; the alpha is dropped either way
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def read_image(path) -> np.ndarray:
    """Decode one image file with PIL into uint8 HWC RGB (gray, RGBA, palette, CMYK converted).

    Alpha is dropped, not composited (as ``tf.io.decode_image(channels=3)`` does). Raises
    ``ValueError`` naming the file if it cannot be decoded, ``FileNotFoundError`` if absent.
    """
    from PIL import Image

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            return _pil_to_rgb_array(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image {path}: {e}") from None


def _pil_resize_crop(image: np.ndarray, image_size: int, crop_pct: float, interpolation: str) -> np.ndarray:
    """PIL version of ``eval_transform``, for the TensorFlow-free in-memory path."""
    from PIL import Image

    scale = _scale_size(image_size, crop_pct)
    h, w = image.shape[:2]
    if h == w == scale == image_size:
        return image
    if w <= h:
        new_w, new_h = scale, scale * h // w
    else:
        new_h, new_w = scale, scale * w // h
    im = Image.fromarray(image)
    if (new_h, new_w) != (h, w):
        im = im.resize((new_w, new_h), resample=_PIL_RESAMPLE[interpolation])
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    return np.asarray(im.crop((left, top, left + image_size, top + image_size)), dtype=np.uint8)


def _scale_size(image_size: int, crop_pct: float) -> int:
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    # The epsilon keeps e.g. 224/0.875 at 256 despite float error; the rule is int(size / crop_pct).
    return int(math.floor(image_size / crop_pct + 1e-6))


def _check_interpolation(interpolation: str) -> str:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}: use one of {', '.join(INTERPOLATIONS)}")
    return interpolation


# ----------------------------------------------------------------------------- folders


def _list_folder(root: Path, class_names: list[str] | None = None):
    """Return ``(class_names, files, labels)`` for image files under ``root/<class>/``, sorted."""
    if not root.exists():
        raise FileNotFoundError(f"data folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"data folder is not a directory: {root}")
    found = sorted(
        d.name
        for d in root.iterdir()
        if d.is_dir() and not d.name.startswith(".") and not d.name.endswith(_CACHE_SUFFIX)
    )
    if not found:
        raise ValueError(f"data folder {root} has no class sub-folders (expected {root}/<class>/<image>)")
    if class_names is None:
        class_names = found
    else:
        extra = sorted(set(found) - set(class_names))
        if extra:
            raise ValueError(f"validation folder {root} has classes missing from training: {', '.join(extra[:5])}")
    files, labels = [], []
    for label, name in enumerate(class_names):
        class_dir = root / name
        if not class_dir.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in sorted(filenames):
                if not fname.startswith(".") and fname.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(dirpath, fname))
                    labels.append(label)
    if not files:
        raise ValueError(f"data folder {root} has no image files ({' '.join(IMAGE_EXTENSIONS)}) in its class folders")
    return class_names, files, np.asarray(labels, dtype=np.int32)


def _sniff(path: str):
    """The file's format from its first bytes (as tf.io.decode_image dispatches), or why it is none."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return None, str(e)
    for fmt, magic in _SIGNATURES:
        if head.startswith(magic):
            return fmt, None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP", None
    return None, "not a JPEG, PNG, GIF, BMP or WebP file"


def _probe(path: str, full: bool):
    """Return ``(height, width)`` of a file TF can decode, or the reason it cannot."""
    from PIL import Image

    fmt, reason = _sniff(path)
    if reason:
        return reason
    try:
        with Image.open(path, formats=[fmt]) as im:
            if full:
                im.load()
            return im.size[1], im.size[0]
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return str(e) or type(e).__name__


def _scan(files: list[str], verify: str):
    """Check the files; return ``(ok mask, decoded bytes or None, [(file, reason)])``.

    ``"header"`` checks every file's signature (25 us a file; PIL's header parser costs ten times
    that) and opens a fixed sample of 256 with PIL to estimate the decoded size. ``"full"`` decodes
    every file with PIL, in threads (its decoders release the GIL).
    """
    n = len(files)
    if verify == "none":
        return np.ones(n, bool), None, []
    workers = min(16, 4 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        if verify == "full":
            results = list(pool.map(lambda f: _probe(f, True), files, chunksize=64))
        else:
            results = [reason or fmt for fmt, reason in pool.map(_sniff, files, chunksize=256)]
            results = [r if r not in _TF_DECODABLE_FORMATS else None for r in results]
            candidates = [i for i, r in enumerate(results) if r is None]
            sample = np.random.default_rng(0).permutation(candidates)[:256]
            for i, r in zip(sample, pool.map(lambda i: _probe(files[i], False), sample), strict=True):
                results[i] = r
    ok = np.array([not isinstance(r, str) for r in results], dtype=bool)
    failures = [(f, r) for f, r in zip(files, results, strict=True) if isinstance(r, str)]
    sizes = [r[0] * r[1] * 3 for r in results if isinstance(r, tuple)]
    decoded = int(np.mean(sizes) * ok.sum()) if sizes else None
    return ok, decoded, failures


def _report_skipped(root, failures, total):
    if failures:
        path, reason = failures[0]
        logger.warning(
            "skipped %d of %d image files in %s that failed to decode (first: %s: %s)",
            len(failures),
            total,
            root,
            path,
            reason,
        )


def _folder_split(root: Path, class_names, verify: str):
    class_names, files, labels = _list_folder(root, class_names)
    ok, pixels, failures = _scan(files, verify)
    _report_skipped(root, failures, len(files))
    if not ok.any():
        raise ValueError(f"no decodable images in {root}: all {len(files)} image files failed to decode")
    paths = [f for f, k in zip(files, ok, strict=True) if k]
    return class_names, np.asarray(paths), labels[ok], pixels, failures


def _folder_arg(val_source: str) -> Path:
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
        raise ValueError(f"val_split must be a fraction in [0, 1) or a count, got {val_split!r}")
    if 0 <= val_split < 1:
        target = int(round(float(val_split) * n))
    elif float(val_split).is_integer() and 1 <= val_split < n:
        target = int(val_split)
    else:
        raise ValueError(f"val_split must be a fraction in [0, 1) or a count below {n} images, got {val_split!r}")
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


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
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
) -> Source:
    """Describe ``source`` without decoding pixels: class names, train/val splits, skipped files.

    ``val_split`` is a fraction in [0, 1) or a whole number of images; the split is stratified
    per class and depends only on ``seed`` (folders, digits). ``val_source`` is a second folder
    (``folder:<path>`` or a bare path) for folders, or a split name (``validation``, ``test``) for TFDS.
    Folder files that fail to decode are skipped, counted in ``Source.skipped`` and logged.
    ``verify="header"`` checks each file's signature bytes (fast: 50k files in about a second;
    a file that is damaged after a valid header, e.g. a truncated JPEG, slips through and is then
    dropped by tf.data with a logged warning, uncounted); ``"full"`` decodes every file with PIL
    first (counts those too, costs a full decode); ``"none"`` trusts every file.
    """
    kind, arg = parse_source(source)
    if verify not in ("header", "full", "none"):
        raise ValueError(f"verify must be 'header', 'full' or 'none', got {verify!r}")
    if kind == "tfds":
        return _load_tfds(arg, val_split=val_split, val_source=val_source, data_dir=data_dir, download=download)
    if kind == "digits":
        images, labels = _digits_arrays()
        if val_source is not None:
            raise ValueError("the digits source has no separate validation source; use val_split")
        train_idx, val_idx = stratified_split(labels, val_split, seed)
        val = _array_split(images[val_idx], labels[val_idx]) if len(val_idx) else None
        return Source("digits", [str(i) for i in range(10)], _array_split(images[train_idx], labels[train_idx]), val)

    root = Path(arg).expanduser()
    class_names, paths, labels, pixels, failures = _folder_split(root, None, verify)
    if val_source is not None:
        _, vpaths, vlabels, vpixels, vfailures = _folder_split(_folder_arg(val_source), class_names, verify)
        train = Split("files", labels=labels, paths=tuple(paths), size=len(paths), pixels=pixels)
        val = Split("files", labels=vlabels, paths=tuple(vpaths), size=len(vpaths), pixels=vpixels)
        failures = failures + vfailures
    else:
        train_idx, val_idx = stratified_split(labels, val_split, seed)
        per_file = None if pixels is None else pixels / len(paths)

        def split(idx):
            px = None if per_file is None else int(per_file * len(idx))
            return Split("files", labels=labels[idx], paths=tuple(paths[idx]), size=len(idx), pixels=px)

        train, val = split(train_idx), (split(val_idx) if len(val_idx) else None)
    return Source(
        f"folder:{root}", class_names, train, val, skipped=len(failures), skipped_files=tuple(f for f, _ in failures)
    )


# ----------------------------------------------------------------------------- tf.data


_tf_ready = False


def _tf():
    global _tf_ready
    import tensorflow as tf

    if not _tf_ready:
        import keras

        _tf_ready = True
        # TF must not take the accelerator from JAX/torch when it only feeds data.
        if keras.backend.backend() != "tensorflow":
            try:
                tf.config.set_visible_devices([], "GPU")
            except RuntimeError:
                pass  # TF's runtime is already up; too late to change, and not ours to break
    return tf


def eval_transform(image, image_size: int, crop_pct: float = 1.0, interpolation: str = "bilinear"):
    """Resize the shorter side to ``int(image_size / crop_pct)``, then centre-crop ``image_size``.

    ``image`` is a uint8 (or float) HWC tensor; returns float32 ``[image_size, image_size, 3]`` in
    [0, 255], rounded like a uint8 PIL pipeline. TensorFlow ops (usable inside tf.data). The sizes
    and crop offsets follow torchvision's Resize(int) + CenterCrop, as timm evaluates.
    """
    tf = _tf()
    _check_interpolation(interpolation)
    scale = _scale_size(image_size, crop_pct)
    image = tf.convert_to_tensor(image)
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    new_long = (scale * long) // short
    new_h = tf.where(w <= h, new_long, scale)
    new_w = tf.where(w <= h, scale, new_long)
    resized = _resize(image, new_h, new_w, interpolation)
    top = tf.cast(tf.round(tf.cast(new_h - image_size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - image_size, tf.float32) / 2.0), tf.int32)
    crop = resized[top : top + image_size, left : left + image_size, :]
    crop = tf.round(tf.clip_by_value(crop, 0.0, 255.0))
    return tf.ensure_shape(crop, [image_size, image_size, 3])


def _resize(image, new_h, new_w, method):
    """float32 resize; antialiased only when shrinking (ScaleAndTranslate is several times slower and
    gives the same result when enlarging), and no work at all when the size already matches."""
    tf = _tf()
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    size = tf.stack([new_h, new_w])

    def resize(antialias):
        return lambda: tf.cast(tf.image.resize(image, size, method=method, antialias=antialias), tf.float32)

    same = tf.logical_and(tf.equal(h, new_h), tf.equal(w, new_w))
    shrink = tf.logical_or(tf.less(new_h, h), tf.less(new_w, w))
    return tf.cond(same, lambda: tf.cast(image, tf.float32), lambda: tf.cond(shrink, resize(True), resize(False)))


def _decode_file(path):
    tf = _tf()
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False, dtype=tf.uint8)
    return tf.ensure_shape(image, [None, None, 3])


def _to_rgb(image):
    tf = _tf()
    channels = image.shape[-1]
    if channels == 1:
        return tf.image.grayscale_to_rgb(image)
    if channels == 4:
        return image[..., :3]
    return image


def _base_dataset(split: Split, training: bool, seed: int):
    """Return ``(dataset of (image, label), decode_fn or None)``: files still need decoding."""
    tf = _tf()
    if split.kind == "files":
        ds = tf.data.Dataset.from_tensor_slices((list(split.paths), split.labels.astype(np.int32)))
        return ds, lambda p, y: (_decode_file(p), y)
    if split.kind == "arrays":
        return tf.data.Dataset.from_tensor_slices((split.images, split.labels.astype(np.int32))), None
    if split.kind == "tfds":
        import tensorflow_datasets as tfds

        builder = tfds.builder(split.tfds_name, data_dir=split.data_dir)
        ds = builder.as_dataset(
            split=split.tfds_split,
            as_supervised=True,
            shuffle_files=training and not builder.info.disable_shuffling,  # TFDS refuses it on ordered data
            read_config=tfds.ReadConfig(shuffle_seed=seed),
        )
        return ds.map(lambda x, y: (_to_rgb(x), tf.cast(y, tf.int32))), None
    raise ValueError(f"unknown split kind {split.kind!r}")


def make_dataset(
    split: Split,
    *,
    image_size: int,
    batch_size: int,
    training: bool,
    seed: int = 0,
    crop_pct: float = 1.0,
    interpolation: str = "bilinear",
    image_map=None,
    batch_map=None,
    shuffle_buffer: int | None = None,
    cache: bool | str = "auto",
    drop_remainder: bool | None = None,
    repeat: bool = False,
):
    """Build the batched ``tf.data.Dataset`` of ``(images float32 [B,H,W,3] in [0,255], labels int32 [B])``.

    training=True: seeded shuffle -> parallel decode -> ``image_map(uint8 HWC)`` per image (default:
    plain resize to ``image_size``) -> batch (drop_remainder defaults to True) -> ``batch_map`` ->
    prefetch. training=False: decode -> ``eval_transform`` -> batch -> ``batch_map`` -> prefetch.
    ``cache="auto"`` caches decoded images in RAM when the split is known to fit
    (``CACHE_BUDGET_BYTES``); True/False force it. ``shuffle_buffer=None`` shuffles the whole split
    (uncached TFDS splits: 10,000 decoded images).
    With a cache, shuffling follows it (a cache before the shuffle would freeze the first order).
    ``repeat=True`` (training only) makes the stream endless, reshuffled on every pass: give
    ``model.fit`` ``steps_per_epoch``. A dataset that skips undecodable files has no known length,
    and Keras counts an extra optimizer step at the end of each epoch of unknown length.
    """
    tf = _tf()
    _check_interpolation(interpolation)
    if split is None or not isinstance(split, Split):
        raise ValueError(f"make_dataset needs a Split from load_source, got {type(split).__name__}")
    if batch_size < 1 or image_size < 1:
        raise ValueError(f"batch_size and image_size must be positive, got {batch_size} and {image_size}")
    if drop_remainder is None:
        drop_remainder = training
    if cache == "auto":
        cache = split.kind != "arrays" and split.pixels is not None and split.pixels <= CACHE_BUDGET_BYTES
    autotune = tf.data.AUTOTUNE
    buffer = shuffle_buffer or max(len(split), 1)
    if shuffle_buffer is None and split.kind == "tfds" and not cache:
        buffer = min(buffer, 10_000)  # these elements are decoded images (file paths cost nothing to hold)

    if repeat and not training:
        raise ValueError("make_dataset(repeat=True) is for training streams only")
    ds, decode = _base_dataset(split, training, seed)
    if training and not cache:
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()
    if decode is not None:
        ds = ds.map(decode, num_parallel_calls=autotune).ignore_errors(log_warning=True)
    if training:
        if cache:
            ds = ds.cache().shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
            if repeat:
                ds = ds.repeat()
        if image_map is None:

            def image_map(image):
                return _resize(image, image_size, image_size, interpolation)

        def per_image(image, label):
            out = tf.cast(image_map(image), tf.float32)
            return tf.ensure_shape(out, [image_size, image_size, 3]), label

        ds = ds.map(per_image, num_parallel_calls=autotune)
    else:
        ds = ds.map(
            lambda x, y: (eval_transform(x, image_size, crop_pct, interpolation), y), num_parallel_calls=autotune
        )
        if cache:
            ds = ds.cache()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=autotune)
    if batch_map is not None:
        ds = ds.map(batch_map, num_parallel_calls=autotune)
    options = tf.data.Options()
    # File lists cannot be sharded by file; shard by element under tf.distribute.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options).prefetch(autotune)


# ----------------------------------------------------------------------------- in memory (no TensorFlow)


def _folder_fingerprint(root: Path, image_size: int, interpolation: str):
    class_names, files, labels = _list_folder(root)
    h = hashlib.sha256()
    h.update(json.dumps([_IN_MEMORY_CACHE_VERSION, image_size, interpolation, class_names]).encode())
    for f, y in zip(files, labels, strict=True):
        st = os.stat(f)
        h.update(f"{os.path.relpath(f, root)}\0{y}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return class_names, files, labels, h.hexdigest()[:16]


def _cache_location(root: Path, cache_dir, key: str, image_size: int) -> Path:
    leaf = f"{image_size}px-{key}"
    if cache_dir is not None:
        tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
        return Path(cache_dir).expanduser() / f"{root.name}-{tag}" / leaf
    beside = root.resolve().parent / f"{root.name}{_CACHE_SUFFIX}"
    if os.access(beside if beside.exists() else beside.parent, os.W_OK):
        return beside / leaf
    fallback = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "keras_convmixer"
    logger.warning("%s is read-only; caching decoded images in %s (pass cache_dir to choose)", beside.parent, fallback)
    return _cache_location(root, fallback, key, image_size)


def _decode_chunk(files, image_size: int, interpolation: str):
    """Decode files with PIL; return (uint8 images of the good ones, [(file, reason)] for the bad)."""
    images, failures = [], []
    for path in files:
        try:
            images.append(_pil_resize_crop(read_image(path), image_size, 1.0, interpolation))
        except (ValueError, OSError) as e:
            failures.append((path, str(e)))
    stacked = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
    return stacked, failures


def _decode_folder(files, labels, image_size: int, interpolation: str, workers: int):
    # Small images spend most of their time in PIL's Python code, under the GIL: threads were
    # slower than one (measured). Processes avoid the GIL but each imports keras and its backend;
    # "spawn" because forking a process that runs JAX or torch threads can deadlock.
    chunk = max(1, min(2000, math.ceil(len(files) / (8 * max(workers, 1)))))
    chunks = [files[i : i + chunk] for i in range(0, len(files), chunk)]
    results = None
    if workers > 1 and len(files) >= _PROCESS_POOL_MIN_FILES:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from itertools import repeat

        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                results = list(pool.map(_decode_chunk, chunks, repeat(image_size), repeat(interpolation)))
        except Exception as e:  # a broken pool (e.g. an unguarded __main__) must not lose the data
            logger.warning("decoding in %d processes failed (%s); decoding in this process", workers, e)
    if results is None:
        results = [_decode_chunk(c, image_size, interpolation) for c in chunks]
    failures = [f for _, fails in results for f in fails]
    bad = {f for f, _ in failures}
    ok = np.array([f not in bad for f in files], dtype=bool)
    images = np.concatenate([r for r, _ in results]) if ok.any() else None
    return images, labels[ok], failures


def _write_cache(where: Path, images, labels, meta):
    where.parent.mkdir(parents=True, exist_ok=True)
    # Written to a temporary directory and renamed, so a killed run never leaves half a cache.
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=where.parent))
    try:
        np.save(tmp / "images.npy", images)
        np.save(tmp / "labels.npy", labels)
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, where)
    except OSError:
        if (where / "meta.json").is_file():  # another process wrote the same entry first
            return
        raise
    finally:
        if tmp.exists():
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()


def _load_folder_cached(root: Path, image_size: int, interpolation: str, cache_dir, workers: int):
    """Decoded images, labels, class names, skipped count and cache dir of a whole folder."""
    class_names, files, labels, key = _folder_fingerprint(root, image_size, interpolation)
    where = _cache_location(root, cache_dir, key, image_size)
    if (where / "meta.json").is_file():
        meta = json.loads((where / "meta.json").read_text())
        images, labels = np.load(where / "images.npy"), np.load(where / "labels.npy")
        logger.info("read %d decoded images from cache %s", len(labels), where)
        if meta["skipped"]:
            logger.warning("skipped %d image files in %s that failed to decode (cached)", meta["skipped"], root)
        return images, labels, meta["class_names"], meta["skipped"], where
    images, labels, failures = _decode_folder(files, labels, image_size, interpolation, workers)
    _report_skipped(root, failures, len(files))
    if images is None:
        raise ValueError(f"no decodable images in {root}: all {len(files)} image files failed to decode")
    meta = {"class_names": class_names, "skipped": len(failures), "skipped_files": [f for f, _ in failures]}
    try:
        _write_cache(where, images, labels, meta)
    except OSError as e:  # an unwritable cache must not cost the decoded data
        logger.warning("could not cache decoded images in %s (%s); pass a writable cache_dir", where, e)
        return images, labels, class_names, len(failures), None
    logger.info("cached %d decoded images in %s", len(labels), where)
    return images, labels, class_names, len(failures), where


def load_in_memory(
    source: str,
    *,
    image_size: int,
    val_split: float = 0.1,
    seed: int = 0,
    cache_dir: str | None = None,
    val_source: str | None = None,
    interpolation: str = "bilinear",
    workers: int | None = None,
) -> InMemoryData:
    """Decode ``digits`` or ``folder:<path>`` once into uint8 arrays of ``image_size``; never imports TensorFlow.

    Each image is resized (shorter side) and centre-cropped to ``image_size`` with PIL. Folder
    results are cached as ``.npy`` files in ``<folder>.convmixer-cache/`` beside the folder, or
    in ``cache_dir`` when given (use it when the data directory is read-only; without it a
    read-only folder falls back to ``~/.cache/keras_convmixer``); the same call later reads the
    cache. The train/val split is the one ``load_source`` makes with the same seed and files.
    ``workers=N`` (N > 1) decodes folders of 2048 files or more in N spawned processes (call it
    under ``if __name__ == "__main__":`` in scripts). The default decodes in this process: on the
    2-core dev box the processes' start-up (each imports keras and its backend) made it slower.
    """
    kind, arg = parse_source(source)
    workers = 1 if workers is None else int(workers)
    _check_interpolation(interpolation)
    if kind == "tfds":
        raise ValueError("load_in_memory reads 'digits' and 'folder:<path>' sources; tfds: needs make_dataset")
    if kind == "digits":
        if val_source is not None:
            raise ValueError("the digits source has no separate validation source; use val_split")
        images, labels = _digits_arrays()
        images = np.stack([_pil_resize_crop(im, image_size, 1.0, interpolation) for im in images])
        class_names, skipped, where = [str(i) for i in range(10)], 0, None
    else:
        root = Path(arg).expanduser()
        images, labels, class_names, skipped, where = _load_folder_cached(
            root, image_size, interpolation, cache_dir, workers
        )
    if val_source is not None:
        vimages, vlabels, vclasses, vskipped, _ = _load_folder_cached(
            _folder_arg(val_source), image_size, interpolation, cache_dir, workers
        )
        extra = sorted(set(vclasses) - set(class_names))
        if extra:
            raise ValueError(f"validation folder has classes missing from training: {', '.join(extra[:5])}")
        remap = np.array([class_names.index(c) for c in vclasses], dtype=np.int32)
        return InMemoryData(
            images,
            labels.astype(np.int32),
            vimages,
            remap[vlabels],
            class_names,
            skipped + vskipped,
            None if where is None else str(where),
        )
    train_idx, val_idx = stratified_split(labels, val_split, seed)
    return InMemoryData(
        images[train_idx],
        labels[train_idx].astype(np.int32),
        images[val_idx],
        labels[val_idx].astype(np.int32),
        class_names,
        skipped,
        None if where is None else str(where),
    )


# ----------------------------------------------------------------------------- measuring


def benchmark_dataset(dataset, *, max_batches: int | None = None, warmup_batches: int = 2) -> dict:
    """Iterate ``dataset`` with the model left out and time it.

    Returns ``images`` and ``seconds`` over all batches read, and ``images_per_s`` over the batches
    after ``warmup_batches`` (which pay for thread start-up and autotuning).
    """
    import time

    images = steady_images = 0
    start = time.perf_counter()
    steady_start = start
    for i, batch in enumerate(dataset):
        n = int(batch[0].shape[0])
        images += n
        if i == warmup_batches - 1:
            steady_start = time.perf_counter()
        elif i >= warmup_batches:
            steady_images += n
        if max_batches is not None and i + 1 >= max_batches:
            break
    end = time.perf_counter()
    steady_seconds = end - steady_start
    return {
        "images": images,
        "seconds": end - start,
        "images_per_s": (steady_images / steady_seconds) if steady_images else images / max(end - start, 1e-9),
    }
