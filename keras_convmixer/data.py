"""Input pipelines: image sources, tf.data datasets and a TensorFlow-free in-memory loader.

Sources (strings, as on the command line):

* ``digits``: scikit-learn's bundled 8x8 handwritten digits, as RGB uint8. The embedded
  default: real data that needs no network.
* ``folder:<path>``: one sub-folder per class. Validation comes from ``val_source`` (another
  such folder) or from a stratified, seeded ``val_split`` of the folder.
* ``tfds:<name>``: a TensorFlow Datasets builder, read from ``data_dir``; downloads only when
  ``download=True``.

``load_source`` describes a source (class names, splits, unreadable files) without decoding pixels.
``make_dataset`` turns a split into a batched ``tf.data.Dataset`` that ``model.fit`` accepts on
every backend. ``load_in_memory`` decodes a source once into uint8 arrays with PIL and NumPy and
caches them as ``.npy``; it never imports TensorFlow, so it runs where only JAX is installed.
TensorFlow is imported lazily, inside the functions that build tf.data pipelines.

Every image file that cannot be used is accounted for: a ``DecodeAudit`` names it with the
reason, whether the scan caught it (bad signature, too many pixels) or a decoder failed later
(a file damaged after a valid header). Images over ``max_pixels`` are never decoded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# What TensorFlow's decode_image reads; the first bytes of each file name its format.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_SIGNATURES = (
    ("JPEG", b"\xff\xd8\xff"),
    ("PNG", b"\x89PNG\r\n\x1a\n"),
    ("GIF", b"GIF87a"),
    ("GIF", b"GIF89a"),
    ("BMP", b"BM"),
)
# JPEG start-of-frame markers (they carry the size); C4, C8 and CC are other segments.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# The default of PIL's Image.MAX_IMAGE_PIXELS (PIL is imported lazily, so it is not read from there).
MAX_PIXELS = 89_478_485
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area")
_PIL_RESAMPLE = {"bilinear": 2, "bicubic": 3, "nearest": 0, "area": 4}  # Image.Resampling values
# Decoded splits up to this size are cached in RAM by tf.data (CIFAR-10 needs 150 MB).
CACHE_BUDGET_BYTES = 4 * 1024**3
_IN_MEMORY_CACHE_VERSION = 2  # 2: failures are stored with their reasons
_CACHE_SUFFIX = ".convmixer-cache"  # <folder>.convmixer-cache/ beside a folder; never taken for a class
_PROCESS_POOL_MIN_FILES = 2048  # below this, starting worker processes costs more than it saves


class DecodeAudit:
    """Image files that could not be used, each with the reason; thread-safe.

    A file is recorded once (the first reason wins), however often a repeating stream meets it.
    ``make_dataset`` records decode failures lazily, read from its pipeline when this is asked:
    a failure shows once the batches have moved past it (evaluation: the next batch; training,
    whose passes are shuffled: once the next pass has begun, or the stream has ended).
    """

    def __init__(self):
        self._lock = threading.RLock()
        self._failures: dict[str, str] = {}
        self._watchers = []  # callables returning [(path, max_pixels)] for failures a pipeline saw

    def add(self, path, reason: str) -> None:
        with self._lock:
            self._failures.setdefault(os.fspath(path), str(reason))

    def _watch(self, watcher) -> None:
        with self._lock:
            self._watchers.append(watcher)

    def _collect(self) -> None:
        with self._lock:
            watchers = list(self._watchers)
        for watcher in watchers:
            for path, max_pixels in watcher():
                with self._lock:
                    known = path in self._failures
                if not known:  # the reason costs a PIL decode: only once per file
                    self.add(path, _failure_reason(path, max_pixels))

    @property
    def failures(self) -> dict[str, str]:
        """``{path: reason}`` in the order the files were found (a copy)."""
        self._collect()
        with self._lock:
            return dict(self._failures)

    def __len__(self) -> int:
        return len(self.failures)

    def summary(self, limit: int = 5) -> str:
        """One line: how many files could not be read and why, naming the first ``limit``."""
        failures = self.failures
        n = len(failures)
        if not n:
            return "all image files could be read"
        shown = "; ".join(f"{path}: {reason}" for path, reason in list(failures.items())[:limit])
        more = f"; and {n - limit} more" if n > limit else ""
        return f"{n} file{'s' if n != 1 else ''} could not be read ({shown}{more})"

    def __repr__(self):
        return f"DecodeAudit({len(self)} failures)"


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


def _check_max_pixels(max_pixels):
    if max_pixels is None:
        return None
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive whole number of pixels or None, got {max_pixels!r}")
    return int(max_pixels)


# ----------------------------------------------------------------------------- image headers


def _signature(head: bytes):
    for fmt, magic in _SIGNATURES:
        if head.startswith(magic):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _small_header_size(fmt: str, head: bytes):
    """``(height, width)`` from the first 32 bytes of a PNG, GIF, BMP or WebP file; None if absent."""
    be = int.from_bytes
    if fmt == "PNG" and head[12:16] == b"IHDR" and len(head) >= 24:
        return be(head[20:24], "big"), be(head[16:20], "big")
    if fmt == "GIF" and len(head) >= 10:
        return be(head[8:10], "little"), be(head[6:8], "little")  # the logical screen, which TF decodes to
    if fmt == "BMP" and len(head) >= 26:
        if be(head[14:18], "little") == 12:  # OS/2 core header: 16-bit sizes
            return be(head[20:22], "little"), be(head[18:20], "little")
        width = be(head[18:22], "little", signed=True)
        height = be(head[22:26], "little", signed=True)  # negative: stored top-down
        return abs(height), abs(width)
    if fmt == "WEBP" and len(head) >= 30:
        chunk = head[12:16]
        if chunk == b"VP8 ":
            return be(head[28:30], "little") & 0x3FFF, be(head[26:28], "little") & 0x3FFF
        if chunk == b"VP8L":
            bits = be(head[21:25], "little")
            return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
        if chunk == b"VP8X":
            return be(head[27:30], "little") + 1, be(head[24:27], "little") + 1
    return None


def _jpeg_size(f):
    """``(height, width)`` from a JPEG's frame header, walking the segments before it; None if not found."""
    pos = 2
    for _ in range(10_000):
        f.seek(pos)
        marker = f.read(2)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        while marker[1] == 0xFF:  # fill bytes before a marker
            pos += 1
            marker = marker[1:] + f.read(1)
            if len(marker) < 2:
                return None
        code = marker[1]
        if code == 0x01 or 0xD0 <= code <= 0xD8:  # markers without a length
            pos += 2
            continue
        if code in (0xD9, 0xDA):  # end of image / start of scan: no frame header came first
            return None
        segment = f.read(7)
        if len(segment) < 2:
            return None
        if code in _JPEG_SOF:
            if len(segment) < 7:
                return None
            return int.from_bytes(segment[3:5], "big"), int.from_bytes(segment[5:7], "big")
        pos += 2 + int.from_bytes(segment[:2], "big")
    return None


def _image_header(path: str):
    """``(format, (height, width) or None)`` from the file's first bytes, or ``(None, reason)``.

    The format is what ``tf.io.decode_image`` dispatches on: the signature, not the extension.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(32)
            fmt = _signature(head)
            if fmt is None:
                return None, "not a JPEG, PNG, GIF, BMP or WebP file"
            return fmt, (_jpeg_size(f) if fmt == "JPEG" else _small_header_size(fmt, head))
    except OSError as e:
        return None, str(e) or type(e).__name__


def _over_limit(size, max_pixels) -> str | None:
    """The reason an image of ``size`` = (height, width) may not be decoded, or None."""
    if max_pixels is None or size is None:
        return None
    height, width = size
    if height * width <= max_pixels:
        return None
    return f"{width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} (max_pixels)"


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


def _pil_decode(path: str, max_pixels):
    """``(uint8 HWC RGB, None)`` or ``(None, reason)``; the size is checked before any pixel is decoded."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            reason = _over_limit((im.size[1], im.size[0]), max_pixels)
            if reason:
                return None, reason
            im.load()
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            return _pil_to_rgb_array(im), None
    except Image.DecompressionBombError as e:
        # PIL refuses sizes over twice its own Image.MAX_IMAGE_PIXELS before telling them.
        fmt, size = _image_header(path)
        reason = _over_limit(size, max_pixels) if fmt else None
        return None, reason or f"{e} (PIL's Image.MAX_IMAGE_PIXELS applies too)"
    except (OSError, SyntaxError, ValueError) as e:
        return None, str(e) or type(e).__name__


def read_image(path, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Decode one image file with PIL into uint8 HWC RGB (gray, RGBA, palette, CMYK converted).

    Alpha is dropped, not composited (as ``tf.io.decode_image(channels=3)`` does). Raises
    ``ValueError`` naming the file if it cannot be decoded or has more than ``max_pixels`` pixels
    (None: no limit of ours; PIL's ``Image.MAX_IMAGE_PIXELS`` still applies), which is read
    from the header so such a file is never decoded. ``FileNotFoundError`` if absent.
    """
    path = os.fspath(path)
    max_pixels = _check_max_pixels(max_pixels)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    image, reason = _pil_decode(path, max_pixels)
    if reason:
        raise ValueError(f"cannot decode image {path}: {reason}")
    return image


def _failure_reason(path: str, max_pixels) -> str:
    """Why the tf.data decoder dropped ``path``: found again on the host, once per failing file."""
    fmt, size = _image_header(path)
    if fmt is None:
        return size
    reason = _over_limit(size, max_pixels)
    if reason:
        return reason
    _, reason = _pil_decode(path, max_pixels)
    return reason or "TensorFlow could not decode it (PIL can)"


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


def _check_folder(root: Path, what: str) -> Path:
    if not root.exists():
        raise FileNotFoundError(f"{what} not found: {root}")
    if not root.is_dir():
        raise ValueError(f"{what} {root} is a file, not a directory of class folders")
    return root


def _walk_images(top: str, seen_dirs: set, seen_files: set):
    """Image files under ``top`` in sorted depth-first order, and how many were reached twice.

    Links are followed once: a directory or file whose real path was already seen (a link loop,
    or two links to one place) is skipped, so no image counts twice or leaks across a split.
    """
    found, repeats = [], 0
    stack = [top]
    while stack:
        path = stack.pop()
        real = os.path.realpath(path)
        if real in seen_dirs:
            repeats += 1
            continue
        seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            continue  # an unreadable directory holds nothing we can use (os.walk skips it too)
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()  # follows links
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append(entry.path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                real_file = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
                if real_file in seen_files:
                    repeats += 1
                    continue
                seen_files.add(real_file)
                found.append(entry.path)
        stack.extend(reversed(subdirs))
    return found, repeats


def _list_folder(root: Path, class_names: list[str] | None = None, what: str = "data folder"):
    """Return ``(class_names, files, labels)`` for image files under ``root/<class>/``, sorted."""
    _check_folder(root, what)
    found = sorted(
        d.name
        for d in root.iterdir()
        if d.is_dir() and not d.name.startswith(".") and not d.name.endswith(_CACHE_SUFFIX)
    )
    if not found:
        raise ValueError(f"{what} {root} has no class sub-folders (expected {root}/<class>/<image>)")
    if class_names is None:
        class_names = found
    else:
        extra = sorted(set(found) - set(class_names))
        if extra:
            raise ValueError(f"validation folder {root} has classes missing from training: {', '.join(extra[:5])}")
    files, labels, repeats = [], [], 0
    seen_dirs, seen_files = set(), set()
    for label, name in enumerate(class_names):
        class_dir = root / name
        if not class_dir.is_dir():
            continue
        class_files, class_repeats = _walk_images(str(class_dir), seen_dirs, seen_files)
        files += class_files
        labels += [label] * len(class_files)
        repeats += class_repeats
    if repeats:
        logger.warning(
            "%s %s: %d files or folders were reached again through links and were counted once", what, root, repeats
        )
    if not files:
        raise ValueError(f"{what} {root} has no image files ({' '.join(IMAGE_EXTENSIONS)}) in its class folders")
    return class_names, files, np.asarray(labels, dtype=np.int32)


def _warn_class_counts(root: Path, class_names: list[str], labels: np.ndarray) -> None:
    """A training folder with one class, or classes left with no usable image, is almost surely a mistake."""
    counts = np.bincount(labels, minlength=len(class_names))
    empty = [name for name, n in zip(class_names, counts, strict=True) if n == 0]
    if len(class_names) == 1:
        logger.warning(
            "data folder %s has a single class folder (%r): a classifier needs two or more", root, class_names[0]
        )
    elif empty:
        logger.warning(
            "data folder %s: class folder%s %s ha%s no usable image files; kept as classes (the model keeps %d outputs)"
            ", but nothing trains %s",
            root,
            "s" if len(empty) > 1 else "",
            ", ".join(repr(n) for n in empty),
            "ve" if len(empty) > 1 else "s",
            len(class_names),
            "them" if len(empty) > 1 else "it",
        )


def _scan(files: list[str], verify: str, max_pixels):
    """Check the files; return ``(ok mask, decoded bytes per file or None, [(file, reason)])``.

    ``"header"`` reads each file's signature and size from its first bytes (for a JPEG, the
    segments before its frame header); a file over ``max_pixels`` is refused unread. ``"full"``
    also decodes every file with PIL, in threads (its decoders release the GIL). ``"none"``
    trusts every file: the pipeline then reads sizes itself.
    """
    n = len(files)
    if verify == "none":
        return np.ones(n, bool), None, []
    workers = min(16, 4 * (os.cpu_count() or 1))

    def check(path):
        fmt, size = _image_header(path)
        if fmt is None:
            return size
        reason = _over_limit(size, max_pixels)
        if reason:
            return reason
        if verify == "full":
            image, reason = _pil_decode(path, max_pixels)
            return reason or image.shape[:2]
        if size is None:  # no size where we looked (an unusual JPEG layout): PIL finds it or says what is wrong
            size, reason = _pil_size(path, max_pixels)
            return reason or _over_limit(size, max_pixels) or size
        return size

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(check, files, chunksize=64 if verify == "full" else 256))
    ok = np.array([not isinstance(r, str) for r in results], dtype=bool)
    failures = [(f, r) for f, r in zip(files, results, strict=True) if isinstance(r, str)]
    decoded = np.array([r[0] * r[1] * 3 if k else 0 for r, k in zip(results, ok, strict=True)], dtype=np.int64)
    return ok, decoded, failures


def _pil_size(path: str, max_pixels):
    """``((height, width), None)`` from PIL's header parser, or ``(None, reason)``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return (im.size[1], im.size[0]), None
    except Image.DecompressionBombError:
        return None, _pil_decode(path, max_pixels)[1]
    except (OSError, SyntaxError, ValueError) as e:
        return None, str(e) or type(e).__name__


def _report_skipped(root, failures, total):
    if failures:
        path, reason = failures[0]
        logger.warning(
            "skipped %d of %d image files in %s that could not be read (first: %s: %s)",
            len(failures),
            total,
            root,
            path,
            reason,
        )


def _folder_split(root: Path, class_names, verify: str, max_pixels, what: str = "data folder"):
    training_folder = class_names is None
    class_names, files, labels = _list_folder(root, class_names, what)
    ok, decoded, failures = _scan(files, verify, max_pixels)
    _report_skipped(root, failures, len(files))
    if not ok.any():
        raise ValueError(f"no decodable images in {root}: all {len(files)} image files failed to decode")
    if training_folder:
        _warn_class_counts(root, class_names, labels[ok])
    paths = np.asarray([f for f, k in zip(files, ok, strict=True) if k])
    return class_names, paths, labels[ok], None if decoded is None else decoded[ok], failures


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
    max_pixels = _check_max_pixels(max_pixels)
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
    audit = DecodeAudit()
    class_names, paths, labels, decoded, failures = _folder_split(root, None, verify, max_pixels)

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
        val_root = _folder_arg(val_source)
        _, vpaths, vlabels, vdecoded, vfailures = _folder_split(
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


def _encoded_size(contents):
    """``(height, width)`` as int64 from the encoded bytes, read as ``_image_header`` reads them; 0 if unknown.

    For splits whose sizes the scan did not read (``verify="none"``, hand-made splits). Only the
    branch of the file's format runs.
    """
    tf = _tf()
    head = tf.strings.substr(tf.strings.join([tf.strings.substr(contents, 0, 32), b"\0" * 32]), 0, 32)

    def number(start, n, big_endian=False):
        digits = tf.cast(tf.io.decode_raw(tf.strings.substr(head, start, n), tf.uint8), tf.int64)
        return tf.reduce_sum(
            digits * tf.constant([256 ** (n - 1 - k if big_endian else k) for k in range(n)], tf.int64)
        )

    def is_(prefix, start=0):
        return tf.equal(tf.strings.substr(head, start, len(prefix)), prefix)

    def signed32(v):
        return tf.abs(tf.where(v >= 2**31, v - 2**32, v))

    def jpeg():
        shape = tf.io.extract_jpeg_shape(contents, output_type=tf.int64)
        return shape[0], shape[1]

    def bmp():
        core = tf.equal(number(14, 4), 12)  # OS/2 header: 16-bit sizes
        height = tf.where(core, number(20, 2), signed32(number(22, 4)))
        return height, tf.where(core, number(18, 2), signed32(number(18, 4)))

    def vp8l():
        bits = number(21, 4)
        return (bits // 2**14) % 2**14 + 1, bits % 2**14 + 1

    branches = [  # (signature, size)
        (is_(b"\xff\xd8\xff"), jpeg),
        (is_(b"\x89PNG"), lambda: (number(20, 4, True), number(16, 4, True))),
        (is_(b"GIF8"), lambda: (number(8, 2), number(6, 2))),  # the logical screen, which TF decodes to
        (is_(b"BM"), bmp),
        (is_(b"WEBPVP8 ", 8), lambda: (number(28, 2) % 2**14, number(26, 2) % 2**14)),
        (is_(b"WEBPVP8L", 8), vp8l),
        (is_(b"WEBPVP8X", 8), lambda: (number(27, 3) + 1, number(24, 3) + 1)),
        (tf.constant(True), lambda: (tf.constant(0, tf.int64), tf.constant(0, tf.int64))),
    ]
    kind = tf.argmax(tf.cast(tf.stack([match for match, _ in branches]), tf.int32), output_type=tf.int32)
    return tf.switch_case(kind, [size for _, size in branches])


def _file_stream(split: Split, audit: DecodeAudit, *, training, cache, repeat, buffer, seed):
    """The decoded stream of a files split, as ``(uint8 image, tag)``, and ``finish``, which batches it.

    A file that fails to decode (or, when the scan did not read sizes, has more than
    ``split.max_pixels`` pixels: refused from its header) is dropped by ``ignore_errors``, but
    not silently. The label carries the file's index (``tag = index * classes + label``), so the
    stream carries nothing more than before and no Python or table work runs per image. Each
    batch notes, in a table, the last pass in which each of its files came out; the batches
    come in decode order, so a file missing from a finished pass (or, unshuffled, from the part
    before the furthest file batched) failed. A shuffled pass holds each file once, so a batch
    tells the passes apart: a file already seen in the current pass opens the next one.
    ``audit`` reads the tables lazily, on the host; a file is one entry however often a
    repeating stream retries it.
    """
    tf = _tf()
    n = len(split.paths)
    classes = int(split.labels.max()) + 1
    max_pixels = _check_max_pixels(split.max_pixels)
    check_sizes = not split.sizes_checked and max_pixels is not None
    finite = not (training and repeat)
    seen = tf.lookup.experimental.MutableHashTable(tf.int64, tf.int64, default_value=-1)  # index -> last pass
    marks = tf.lookup.experimental.MutableHashTable(tf.int64, tf.int64, default_value=-1)
    # Training: the current pass, and the first pass of this iteration; evaluation: the furthest index batched;
    # both: 1 once a finite stream ended.
    current, first, furthest, ended = (tf.constant(k, tf.int64) for k in (0, 1, 2, 3))

    tags = np.arange(n, dtype=np.int64) * classes + split.labels.astype(np.int64)
    ds = tf.data.Dataset.from_tensor_slices((list(split.paths), tags))
    if training and not cache:
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()

    def decode(path, tag):
        contents = tf.io.read_file(path)
        checks = []
        if check_sizes:
            height, width = _encoded_size(contents)
            checks = [tf.debugging.assert_less_equal(height * width, tf.constant(max_pixels, tf.int64))]
        with tf.control_dependencies(checks):
            image = tf.io.decode_image(contents, channels=3, expand_animations=False, dtype=tf.uint8)
        return tf.ensure_shape(image, [None, None, 3]), tag

    def nothing_but(effect, like):
        """A dataset shaped like ``like`` that yields nothing; ``effect`` runs when it is reached."""

        def run(*_):
            with tf.control_dependencies(effect()):
                return tf.constant(False)

        dummy = tf.nest.map_structure(lambda s: tf.zeros([d or 0 for d in s.shape], s.dtype), like.element_spec)
        return tf.data.Dataset.from_tensors(dummy).filter(run)

    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    if training and cache:
        ds = ds.cache().shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()
    if training:  # each iteration numbers its passes above all earlier ones

        def restart():
            k = tf.reshape(marks.lookup(current), []) + 1  # a table's lookup has no static shape
            return [marks.insert(current, k), marks.insert(first, k)]

        ds = nothing_but(restart, ds).concatenate(ds)

    def note(images, batch_tags):
        indices = batch_tags // classes
        if training:
            now = tf.reshape(marks.lookup(current), [])
            earlier = tf.linalg.band_part(tf.ones([tf.size(indices)] * 2, tf.bool), -1, 0)  # j <= i
            repeats = tf.logical_and(tf.equal(indices[:, None], indices[None, :]), earlier)
            # A file's k-th appearance in this batch is in the k-th pass from now, one more if it was seen in this one.
            passes = now + tf.reduce_sum(tf.cast(repeats, tf.int64), axis=1) - 1
            passes += tf.cast(tf.equal(seen.lookup(indices), now), tf.int64)
            with tf.control_dependencies([seen.insert(indices, passes)]):
                moved = marks.insert(current, tf.reduce_max(passes))
        else:
            with tf.control_dependencies([seen.insert(indices, tf.zeros_like(indices))]):
                moved = marks.insert(furthest, tf.maximum(marks.lookup(furthest), tf.reduce_max(indices)))
        with tf.control_dependencies([moved]):
            return tf.identity(images), tf.cast(batch_tags % classes, tf.int32)

    def finish(images, batch_size, drop_remainder):
        """Batch, note each batch in order, and only then drop a last partial batch (it must be noted)."""
        drop_later = drop_remainder and finite
        batched = images.batch(
            batch_size,
            drop_remainder=drop_remainder and not drop_later,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        batched = batched.map(note)  # one batch at a time
        if finite:
            batched = batched.concatenate(nothing_but(lambda: [marks.insert(ended, tf.constant(1, tf.int64))], batched))
        if drop_later:
            batched = batched.filter(lambda x, y: tf.equal(tf.size(y), batch_size))
            batched = batched.map(
                lambda x, y: (tf.ensure_shape(x, [batch_size, *x.shape[1:]]), tf.ensure_shape(y, [batch_size]))
            )
        return batched

    def watcher():
        # The marks first: every image before them has been noted by the time they are read.
        mark_keys, mark_values = (t.numpy().tolist() for t in marks.export())
        mark = dict(zip(mark_keys, mark_values, strict=True))
        indices, passes = (t.numpy() for t in seen.export())
        last = np.full(n, -1, np.int64)
        last[indices] = passes
        failed = (last < 0) if mark.get(3) == 1 else np.zeros(n, bool)
        if not training:
            failed |= (np.arange(n) <= mark.get(2, -1)) & (last < 0)
        elif mark.get(0, -1) - 1 >= mark.get(1, 0):  # a pass of this iteration has ended
            failed |= last < mark[0] - 1
        return [(split.paths[i], max_pixels) for i in np.flatnonzero(failed)]

    audit._watch(watcher)
    return ds, finish


def _to_rgb(image):
    tf = _tf()
    channels = image.shape[-1]
    if channels == 1:
        return tf.image.grayscale_to_rgb(image)
    if channels == 4:
        return image[..., :3]
    return image


def _base_dataset(split: Split, training: bool, seed: int):
    """Return the dataset of ``(image, label)`` of an arrays or TFDS split."""
    tf = _tf()
    if split.kind == "arrays":
        return tf.data.Dataset.from_tensor_slices((split.images, split.labels.astype(np.int32)))
    if split.kind == "tfds":
        import tensorflow_datasets as tfds

        builder = tfds.builder(split.tfds_name, data_dir=split.data_dir)
        ds = builder.as_dataset(
            split=split.tfds_split,
            as_supervised=True,
            shuffle_files=training and not builder.info.disable_shuffling,  # TFDS refuses it on ordered data
            read_config=tfds.ReadConfig(shuffle_seed=seed),
        )
        return ds.map(lambda x, y: (_to_rgb(x), tf.cast(y, tf.int32)))
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
    audit: DecodeAudit | None = None,
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
    ``model.fit`` ``steps_per_epoch``. Files that fail to decode, or have more than
    ``split.max_pixels`` pixels, are left out and recorded, with the reason, in ``audit``
    (default: ``split.audit``); the record shows them once the stream has moved past them.
    Such a dataset has no known length, and Keras counts an extra optimizer step at the end of
    each epoch of unknown length.
    """
    tf = _tf()
    _check_interpolation(interpolation)
    if split is None or not isinstance(split, Split):
        raise ValueError(f"make_dataset needs a Split from load_source, got {type(split).__name__}")
    if batch_size < 1 or image_size < 1:
        raise ValueError(f"batch_size and image_size must be positive, got {batch_size} and {image_size}")
    if audit is not None and not isinstance(audit, DecodeAudit):
        raise ValueError(f"audit must be a DecodeAudit, got {type(audit).__name__}")
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
    finish = None
    keep_order = None  # the options decide, except where a files stream's record relies on the decode order
    if split.kind == "files":
        keep_order = True
        if audit is None:
            audit = split.audit if split.audit is not None else DecodeAudit()
        ds, finish = _file_stream(split, audit, training=training, cache=cache, repeat=repeat, buffer=buffer, seed=seed)
    else:
        ds = _base_dataset(split, training, seed)
        if training and not cache:
            ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
            if repeat:
                ds = ds.repeat()
    if training:
        if cache and finish is None:  # files streams cache their decoded images themselves
            ds = ds.cache().shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
            if repeat:
                ds = ds.repeat()
        if image_map is None:

            def image_map(image):
                return _resize(image, image_size, image_size, interpolation)

        def per_image(image, label):
            out = tf.cast(image_map(image), tf.float32)
            return tf.ensure_shape(out, [image_size, image_size, 3]), label

        ds = ds.map(per_image, num_parallel_calls=autotune, deterministic=keep_order)
    else:

        def per_image(image, label):
            return eval_transform(image, image_size, crop_pct, interpolation), label

        ds = ds.map(per_image, num_parallel_calls=autotune, deterministic=keep_order)
        if cache:
            ds = ds.cache()
    if finish is None:
        ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=autotune)
    else:
        ds = finish(ds, batch_size, drop_remainder)
    if batch_map is not None:
        ds = ds.map(batch_map, num_parallel_calls=autotune)
    options = tf.data.Options()
    # File lists cannot be sharded by file; shard by element under tf.distribute.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options).prefetch(autotune)


# ----------------------------------------------------------------------------- in memory (no TensorFlow)


def _folder_fingerprint(root: Path, image_size: int, interpolation: str, max_pixels, what: str = "data folder"):
    class_names, files, labels = _list_folder(root, what=what)
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
    beside = root.resolve().parent / f"{root.name}{_CACHE_SUFFIX}"
    if os.access(beside if beside.exists() else beside.parent, os.W_OK):
        return beside / leaf
    fallback = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "keras_convmixer"
    logger.warning("%s is read-only; caching decoded images in %s (pass cache_dir to choose)", beside.parent, fallback)
    return _cache_location(root, fallback, key, image_size)


def _decode_chunk(files, image_size: int, interpolation: str, max_pixels=MAX_PIXELS):
    """Decode files with PIL; return (uint8 images of the good ones, [(file, reason)] for the bad)."""
    images, failures = [], []
    for path in files:
        image, reason = _pil_decode(path, max_pixels)
        if reason:
            failures.append((path, reason))
            continue
        try:
            images.append(_pil_resize_crop(image, image_size, 1.0, interpolation))
        except (ValueError, OSError) as e:
            failures.append((path, str(e) or type(e).__name__))
    stacked = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
    return stacked, failures


def _decode_folder(files, labels, image_size: int, interpolation: str, workers: int, max_pixels=MAX_PIXELS):
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
                results = list(
                    pool.map(_decode_chunk, chunks, repeat(image_size), repeat(interpolation), repeat(max_pixels))
                )
        except Exception as e:  # a broken pool (e.g. an unguarded __main__) must not lose the data
            logger.warning("decoding in %d processes failed (%s); decoding in this process", workers, e)
    if results is None:
        results = [_decode_chunk(c, image_size, interpolation, max_pixels) for c in chunks]
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
            _warn_class_counts(root, meta["class_names"], labels)
        return images, labels, meta["class_names"], failures, where
    images, labels, failures = _decode_folder(files, labels, image_size, interpolation, workers, max_pixels)
    _report_skipped(root, failures, len(files))
    if images is None:
        raise ValueError(f"no decodable images in {root}: all {len(files)} image files failed to decode")
    if what == "data folder":
        _warn_class_counts(root, class_names, labels)
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
    _check_interpolation(interpolation)
    max_pixels = _check_max_pixels(max_pixels)
    if kind == "tfds":
        raise ValueError("load_in_memory reads 'digits' and 'folder:<path>' sources; tfds: needs make_dataset")
    if kind == "digits":
        if val_source is not None:
            raise ValueError("the digits source has no separate validation source; use val_split")
        images, labels = _digits_arrays()
        images = np.stack([_pil_resize_crop(im, image_size, 1.0, interpolation) for im in images])
        class_names, failures, where = [str(i) for i in range(10)], {}, None
    else:
        root = Path(arg).expanduser()
        images, labels, class_names, failures, where = _load_folder_cached(
            root, image_size, interpolation, cache_dir, workers, max_pixels
        )
    if val_source is not None:
        vimages, vlabels, vclasses, vfailures, _ = _load_folder_cached(
            _folder_arg(val_source), image_size, interpolation, cache_dir, workers, max_pixels, "val_source data folder"
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
