"""Folders of class sub-folders: listing, the header scan, and the record of files that cannot be used.

Every image file that cannot be used is accounted for: a ``DecodeAudit`` names it with the
reason, whether the scan caught it (bad signature, too many pixels) or a decoder failed later
(a file damaged after a valid header). Images over ``max_pixels`` are never decoded.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from keras_convmixer.data.transforms import IMAGE_EXTENSIONS, image_header, over_limit, pil_decode, pil_size
from keras_convmixer.progress import Progress

logger = logging.getLogger(__name__)

CACHE_SUFFIX = ".convmixer-cache"  # <folder>.convmixer-cache/ beside a folder; never taken for a class


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
                    self.add(path, failure_reason(path, max_pixels))

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


def failure_reason(path: str, max_pixels) -> str:
    """Why the tf.data decoder dropped ``path``: found again on the host, once per failing file."""
    result = _check_file(path, "full", max_pixels)
    return result if isinstance(result, str) else "TensorFlow could not decode it (PIL can)"


# ----------------------------------------------------------------------------- listing


def _check_folder(root: Path, what: str) -> Path:
    if not root.exists():
        raise FileNotFoundError(f"{what} not found: {root}")
    if not root.is_dir():
        raise ValueError(f"{what} {root} is a file, not a directory of class folders")
    return root


def walk_images(top: str, seen_dirs: set, seen_files: set):
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


def list_folder(root: Path, class_names: list[str] | None = None, what: str = "data folder"):
    """Return ``(class_names, files, labels)`` for image files under ``root/<class>/``, sorted."""
    _check_folder(root, what)
    found = sorted(
        d.name
        for d in root.iterdir()
        if d.is_dir() and not d.name.startswith(".") and not d.name.endswith(CACHE_SUFFIX)
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
        class_files, class_repeats = walk_images(str(class_dir), seen_dirs, seen_files)
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


def warn_class_counts(root: Path, class_names: list[str], labels: np.ndarray) -> None:
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


def report_skipped(root, failures, total):
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


# ----------------------------------------------------------------------------- the scan


def _check_file(path: str, verify: str, max_pixels):
    """``(height, width)`` of a usable file, or the reason it cannot be used (a str).

    ``verify`` is ``"header"`` (signature and size from the first bytes) or ``"full"`` (a PIL decode too).
    """
    fmt, size = image_header(path)
    if fmt is None:
        return size
    reason = over_limit(size, max_pixels)
    if reason:
        return reason
    if verify == "full":
        image, reason = pil_decode(path, max_pixels)
        return reason or image.shape[:2]
    if size is None:  # no size where we looked (an unusual JPEG layout): PIL finds it or says what is wrong
        size, reason = pil_size(path, max_pixels)
        return reason or over_limit(size, max_pixels) or size
    return size


def scan_files(files: list[str], verify: str, max_pixels, root=None):
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
    check = functools.partial(_check_file, verify=verify, max_pixels=max_pixels)
    progress = Progress(f"checked image files in {root}" if root else "checked image files", n, logger)
    results = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(check, files, chunksize=64 if verify == "full" else 256):
            results.append(result)
            progress.advance()
    ok = np.array([not isinstance(r, str) for r in results], dtype=bool)
    failures = [(f, r) for f, r in zip(files, results, strict=True) if isinstance(r, str)]
    decoded = np.array([r[0] * r[1] * 3 if k else 0 for r, k in zip(results, ok, strict=True)], dtype=np.int64)
    return ok, decoded, failures


def folder_split(root: Path, class_names, verify: str, max_pixels, what: str = "data folder"):
    """``(class_names, paths, labels, decoded bytes or None, failures)`` of the usable files under ``root``."""
    training_folder = class_names is None
    class_names, files, labels = list_folder(root, class_names, what)
    ok, decoded, failures = scan_files(files, verify, max_pixels, root)
    report_skipped(root, failures, len(files))
    if not ok.any():
        raise ValueError(f"no decodable images in {root}: all {len(files)} image files failed to decode")
    if training_folder:
        warn_class_counts(root, class_names, labels[ok])
    paths = np.asarray([f for f, k in zip(files, ok, strict=True) if k])
    return class_names, paths, labels[ok], None if decoded is None else decoded[ok], failures
