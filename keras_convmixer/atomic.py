"""Crash-safe file writes and strict JSON reads, for the run directory, the weights cache and converted models.

Every file is written to a temporary name in the same directory, flushed, fsynced and renamed over the old
one, so a kill at any instant leaves either the old file or the new one, never a torn one. A full or
read-only disk is one line naming the path and the space left.
"""

import contextlib
import errno
import json
import os
import shutil
import zipfile

from keras_convmixer.jsontext import json_text

DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


class FileError(OSError):
    """A file that cannot be written or read as it is (disk full, empty, not JSON, ...)."""

    def __str__(self):  # the message alone, without OSError's "[Errno 28]" prefix
        return self.strerror or super().__str__()


def file_in_the_way(path):
    """The file (anything not a folder) at ``path`` or at one of its parents, which stops a folder being made
    there; None when there is none. Checked before any work, so the error names it rather than an errno."""
    path = os.path.abspath(os.fspath(path))
    while True:
        if os.path.lexists(path) and not os.path.isdir(path):
            return path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def _fsync_dir(directory):
    with contextlib.suppress(OSError):  # some filesystems cannot sync a directory; the rename is still atomic
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def disk_error(path, err):
    """One line for a full or read-only disk: the path and the space left."""
    try:
        free = f"{shutil.disk_usage(os.path.dirname(path) or '.').free / 2**20:.2f} MiB free"
    except OSError:
        free = "free space unknown"
    reason = "the filesystem is read-only" if err.errno == errno.EROFS else f"no space left ({free})"
    return FileError(
        err.errno,
        f"cannot write {path}: {reason}; nothing written so far is lost: "
        "free space and re-run the same command to resume",
    )


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path`` (same suffix, so Keras accepts it); when the block
    succeeds, fsync it and rename it over ``path``. On any failure the temporary file is removed."""
    directory, name = os.path.split(os.path.abspath(path))
    suffix = ".weights.h5" if name.endswith(".weights.h5") else os.path.splitext(name)[1]
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{name[: len(name) - len(suffix)]}{suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except OSError as err:
        remove_quietly(tmp)
        if err.errno in DISK_ERRORS and not isinstance(err, FileError):
            raise disk_error(path, err) from None
        raise
    except BaseException:
        remove_quietly(tmp)
        raise


def remove_quietly(path):
    with contextlib.suppress(OSError):
        os.remove(path)


def _disk_errors_as_oserror(path, fn):
    """Run a writer; h5py and zip report a full disk as RuntimeError/ValueError naming no path."""
    try:
        fn()
    except OSError:
        raise
    except (RuntimeError, ValueError) as err:
        text = str(err).lower()
        if "space" in text or "write failed" in text or "errno = 28" in text or "file write" in text:
            raise OSError(errno.ENOSPC, str(err)) from None
        raise


def write_bytes(path, data: bytes):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path, text: str):
    write_bytes(path, text.encode())


def write_json(path, obj):
    write_text(path, json_text(json.loads(json.dumps(obj, default=str))) + "\n")


def save_model(model, path, entries=None):
    """``model.save(path)``, crash-safe; ``entries`` (``{name: text}``) are added to the ``.keras`` archive in
    the same write (appended: no second copy of the weights), where Keras's loader leaves them alone."""

    def write(tmp):
        model.save(tmp)
        if entries:
            with zipfile.ZipFile(tmp, "a") as archive:
                for name, text in entries.items():
                    archive.writestr(name, text)

    with atomic_path(path) as tmp:
        _disk_errors_as_oserror(path, lambda: write(tmp))


def save_weights(model, path):
    with atomic_path(path) as tmp:
        _disk_errors_as_oserror(path, lambda: model.save_weights(tmp))


def read_json(path):
    """A JSON object from ``path``, or one line naming the file if it is empty, not JSON or not an object."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise FileError(err.errno, f"cannot read {path}: {err.strerror}") from None
    if not raw.strip():
        raise FileError(errno.EINVAL, f"{path} is empty (was its write interrupted?): delete or restore it")
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        where = f" (line {err.lineno}, column {err.colno})" if isinstance(err, json.JSONDecodeError) else ""
        raise FileError(errno.EINVAL, f"{path} is not valid JSON{where}: delete or restore it") from None
    if not isinstance(value, dict):
        raise FileError(errno.EINVAL, f"{path} holds a JSON {type(value).__name__}, not an object")
    return value
