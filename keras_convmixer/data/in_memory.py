"""A TensorFlow-free loader: decode a source once into uint8 arrays with PIL and NumPy, cached as ``.npy``.

It never imports TensorFlow, so it runs where only JAX (or torch) is installed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from keras_convmixer.data.folders import CACHE_SUFFIX, list_folder, report_skipped, warn_class_counts
from keras_convmixer.data.sources import digits_arrays, folder_arg, parse_source, stratified_split
from keras_convmixer.data.transforms import (
    MAX_PIXELS,
    check_interpolation,
    check_max_pixels,
    pil_decode,
    resize_crop_uint8,
)
from keras_convmixer.progress import Progress

logger = logging.getLogger(__name__)

_IN_MEMORY_CACHE_VERSION = 2  # 2: failures are stored with their reasons
_PROCESS_POOL_MIN_FILES = 2048  # below this, starting worker processes costs more than it saves


@dataclasses.dataclass(frozen=True, eq=False)
class InMemoryData:
    """Decoded uint8 NHWC arrays and int32 labels; ``x_val``/``y_val`` are empty when there is no val split.

    ``failures`` maps each image file that could not be decoded to the reason.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    class_names: list[str]
    failures: dict[str, str] = dataclasses.field(default_factory=dict)
    cache_path: str | None = None

    @property
    def skipped(self) -> int:
        return len(self.failures)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _folder_fingerprint(root: Path, image_size: int, interpolation: str, max_pixels, what: str = "data folder"):
    class_names, files, labels = list_folder(root, what=what)
    h = hashlib.sha256()
    h.update(json.dumps([_IN_MEMORY_CACHE_VERSION, image_size, interpolation, max_pixels, class_names]).encode())
    for f, y in zip(files, labels, strict=True):
        st = os.stat(f)
        h.update(f"{os.path.relpath(f, root)}\0{y}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return class_names, files, labels, h.hexdigest()[:16]


def _cache_location(root: Path, cache_dir, key: str, image_size: int) -> Path:
    leaf = f"{image_size}px-{key}"
    if cache_dir is not None:
        tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
        return Path(cache_dir).expanduser() / f"{root.name}-{tag}" / leaf
    beside = root.resolve().parent / f"{root.name}{CACHE_SUFFIX}"
    if os.access(beside if beside.exists() else beside.parent, os.W_OK):
        return beside / leaf
    fallback = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "keras_convmixer"
    logger.warning("%s is read-only; caching decoded images in %s (pass cache_dir to choose)", beside.parent, fallback)
    return _cache_location(root, fallback, key, image_size)


def _decode_chunk(files, image_size: int, interpolation: str, max_pixels=MAX_PIXELS):
    """Decode files with PIL; return (uint8 images of the good ones, [(file, reason)] for the bad)."""
    images, failures = [], []
    for path in files:
        image, reason = pil_decode(path, max_pixels)
        if reason:
            failures.append((path, reason))
            continue
        try:
            images.append(resize_crop_uint8(image, image_size, 1.0, interpolation))
        except (ValueError, OSError) as e:
            failures.append((path, str(e) or type(e).__name__))
    stacked = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
    return stacked, failures


def _decode_folder(files, labels, image_size: int, interpolation: str, workers: int, max_pixels=MAX_PIXELS, root=None):
    # Small images spend most of their time in PIL's Python code, under the GIL: threads were
    # slower than one (measured). Processes avoid the GIL but each imports keras and its backend;
    # "spawn" because forking a process that runs JAX or torch threads can deadlock.
    what = f"decoded image files in {root}" if root else "decoded image files"
    # Chunks of at most 2000 files also keep the progress lines coming (serial: at least 8 chunks).
    chunk = max(1, min(2000, math.ceil(len(files) / (8 * max(workers, 1)))))
    chunks = [files[i : i + chunk] for i in range(0, len(files), chunk)]
    results = None
    if workers > 1 and len(files) >= _PROCESS_POOL_MIN_FILES:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from itertools import repeat

        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                progress = Progress(what, len(files), logger)
                results = []
                decoded = pool.map(_decode_chunk, chunks, repeat(image_size), repeat(interpolation), repeat(max_pixels))
                for result in decoded:
                    results.append(result)
                    progress.advance(len(result[0]) + len(result[1]))
        except Exception as e:  # a broken pool (e.g. an unguarded __main__) must not lose the data
            logger.warning("decoding in %d processes failed (%s); decoding in this process", workers, e)
            results = None
    if results is None:
        progress = Progress(what, len(files), logger)
        results = []
        for c in chunks:
            results.append(_decode_chunk(c, image_size, interpolation, max_pixels))
            progress.advance(len(c))
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


def _load_folder_cached(
    root: Path, image_size: int, interpolation: str, cache_dir, workers: int, max_pixels, what: str = "data folder"
):
    """Decoded images, labels, class names, ``{path: reason}`` failures and cache dir of a whole folder."""
    class_names, files, labels, key = _folder_fingerprint(root, image_size, interpolation, max_pixels, what)
    where = _cache_location(root, cache_dir, key, image_size)
    if (where / "meta.json").is_file():
        meta = json.loads((where / "meta.json").read_text())
        images, labels = np.load(where / "images.npy"), np.load(where / "labels.npy")
        logger.info("read %d decoded images from cache %s", len(labels), where)
        failures = dict(meta["failures"])
        if failures:
            path, reason = next(iter(failures.items()))
            logger.warning(
                "skipped %d image files in %s that could not be read (cached; first: %s: %s)",
                len(failures),
                root,
                path,
                reason,
            )
        if what == "data folder":
            warn_class_counts(root, meta["class_names"], labels)
        return images, labels, meta["class_names"], failures, where
    images, labels, failures = _decode_folder(files, labels, image_size, interpolation, workers, max_pixels, root)
    report_skipped(root, failures, len(files))
    if images is None:
        raise ValueError(f"no decodable images in {root}: all {len(files)} image files failed to decode")
    if what == "data folder":
        warn_class_counts(root, class_names, labels)
    meta = {"class_names": class_names, "skipped": len(failures), "failures": [list(f) for f in failures]}
    try:
        _write_cache(where, images, labels, meta)
    except OSError as e:  # an unwritable cache must not cost the decoded data
        logger.warning("could not cache decoded images in %s (%s); pass a writable cache_dir", where, e)
        return images, labels, class_names, dict(failures), None
    logger.info("cached %d decoded images in %s", len(labels), where)
    return images, labels, class_names, dict(failures), where


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
    max_pixels: int | None = MAX_PIXELS,
) -> InMemoryData:
    """Decode ``digits`` or ``folder:<path>`` once into uint8 arrays of ``image_size``; never imports TensorFlow.

    Each image is resized (shorter side) and centre-cropped to ``image_size`` with PIL. Folder
    results are cached as ``.npy`` files in ``<folder>.convmixer-cache/`` beside the folder, or
    in ``cache_dir`` when given (use it when the data directory is read-only; without it a
    read-only folder falls back to ``~/.cache/keras_convmixer``); the same call later reads the
    cache. The train/val split is the one ``load_source`` makes with the same seed and files.
    Files that cannot be decoded, or have more than ``max_pixels`` pixels (read from the header:
    never decoded; None: no limit), are left out and named in ``InMemoryData.failures``, cache
    hits included.
    ``workers=N`` (N > 1) decodes folders of 2048 files or more in N spawned processes (call it
    under ``if __name__ == "__main__":`` in scripts). The default decodes in this process: on the
    2-core dev box the processes' start-up (each imports keras and its backend) made it slower.
    """
    kind, arg = parse_source(source)
    workers = 1 if workers is None else int(workers)
    check_interpolation(interpolation)
    max_pixels = check_max_pixels(max_pixels)
    if kind == "tfds":
        raise ValueError("load_in_memory reads 'digits' and 'folder:<path>' sources; tfds: needs make_dataset")
    if kind == "digits":
        if val_source is not None:
            raise ValueError("the digits source has no separate validation source; use val_split (--val-split)")
        images, labels = digits_arrays()
        images = np.stack([resize_crop_uint8(im, image_size, 1.0, interpolation) for im in images])
        class_names, failures, where = [str(i) for i in range(10)], {}, None
    else:
        root = Path(arg).expanduser()
        images, labels, class_names, failures, where = _load_folder_cached(
            root, image_size, interpolation, cache_dir, workers, max_pixels
        )
    if val_source is not None:
        vimages, vlabels, vclasses, vfailures, _ = _load_folder_cached(
            folder_arg(val_source), image_size, interpolation, cache_dir, workers, max_pixels, "val_source data folder"
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
            {**failures, **vfailures},
            None if where is None else str(where),
        )
    train_idx, val_idx = stratified_split(labels, val_split, seed)
    return InMemoryData(
        images[train_idx],
        labels[train_idx].astype(np.int32),
        images[val_idx],
        labels[val_idx].astype(np.int32),
        class_names,
        failures,
        None if where is None else str(where),
    )


# ----------------------------------------------------------------------------- the training stream

# Above this, the uint8 training images stay on the host and each batch is gathered there: the
# device keeps the images plus about two chunks of gathered batches, three times this at most.
DEVICE_RESIDENT_MAX_BYTES = 2 * 1024**3
STREAM_PLACEMENTS = ("auto", "host", "device")


def index_batches(n, batch_size, seed):
    """Endless batches of indices into ``n`` examples: seeded permutations chained and cut into
    ``batch_size`` pieces, so a batch that ends one pass continues in the next (as the tf.data path's
    repeated shuffle), and a short epoch still draws from every example."""
    rng = np.random.default_rng(seed)
    pending = np.zeros(0, dtype=np.int64)
    while True:
        while len(pending) < batch_size:
            pending = np.concatenate([pending, rng.permutation(n)])
        index, pending = pending[:batch_size], pending[batch_size:]
        yield index


def stream_placement(images, placement="auto", max_device_bytes=DEVICE_RESIDENT_MAX_BYTES):
    """``"device"`` or ``"host"``: where ``batch_stream`` gathers batches.

    ``"auto"`` is ``"device"`` on the JAX backend with no ``keras.distribution`` set (a distribution
    shards each host batch itself) and images of at most ``max_device_bytes``; ``"host"`` otherwise.
    """
    if placement not in STREAM_PLACEMENTS:
        raise ValueError(f"placement must be one of {STREAM_PLACEMENTS}, got {placement!r}.")
    import keras

    on_jax = keras.backend.backend() == "jax"
    if placement == "device" and not on_jax:
        raise ValueError(f"placement='device' needs the JAX backend, not {keras.backend.backend()}.")
    if placement != "auto":
        return placement
    if not on_jax or keras.distribution.distribution() is not None:
        return "host"
    return "device" if images.nbytes <= max_device_bytes else "host"


def batch_stream(images, labels, batch_size, seed, placement="auto", chunk_steps=None):
    """Endless seeded stream of ``({"images", "labels"}, labels)`` training batches over in-memory arrays,
    for ``model.fit(stream, steps_per_epoch=...)``. Batches follow ``index_batches`` on every placement.

    ``placement="host"``: each batch is gathered with NumPy (a copy of the batch per step), and Keras
    copies it to the device. ``"device"`` (JAX): the images and labels are copied to the device once;
    then every ``chunk_steps`` steps (default: one pass over the data) one jitted call gathers the next
    batches there from one small host array of indices, and each step only hands over an array the
    device already holds: no per-step copy and no host sync. ``"auto"``: see ``stream_placement``.
    """
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels.")
    if not 1 <= int(batch_size) <= len(labels):
        raise ValueError(f"batch_size must be in [1, {len(labels)}] (the number of examples), got {batch_size!r}.")
    batches = index_batches(len(labels), int(batch_size), seed)
    if stream_placement(images, placement) == "host":
        for index in batches:
            y = labels[index]
            yield {"images": images[index], "labels": y}, y
        return
    yield from _device_batches(images, labels, batches, chunk_steps or max(1, len(labels) // int(batch_size)))


def _device_batches(images, labels, batches, chunk_steps):
    import jax
    import jax.numpy as jnp

    @jax.jit
    def gather(x, y, index):
        # One output per step: each step's batch is its own buffer, handed over as it is.
        xs, ys = jnp.take(x, index, axis=0), jnp.take(y, index, axis=0)
        return tuple(xs[k] for k in range(index.shape[0])), tuple(ys[k] for k in range(index.shape[0]))

    x, y = jax.device_put(images), jax.device_put(labels)
    while True:
        index = np.stack([next(batches) for _ in range(chunk_steps)]).astype(np.int32)
        xs, ys = gather(x, y, jax.device_put(index))
        for xb, yb in zip(xs, ys, strict=True):
            yield {"images": xb, "labels": yb}, yb
