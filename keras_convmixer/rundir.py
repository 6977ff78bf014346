"""The run directory: its file names, the one-run lock, its history and resuming.

Every file is written through ``atomic`` (a kill at any instant leaves the old file or the new
one, never a torn one). ``history.csv`` is the commit record: an epoch's row is written only after its backup
checkpoint (``backup/epoch-NNNN.weights.h5``), so the history and the backup always agree and a
resume continues after the last row. The two newest checkpoints are kept; a resume that cannot
read the newest falls back to the one before and drops the rows after it.

Layout::

    config.json      settings, class names, backend (checked on resume)
    history.csv      one row per finished epoch (CSVLogger's columns)
    best.json        the best epoch so far and its monitored value (derived from history.csv)
    last.keras       the classifier after the last finished epoch
    best.keras       the classifier at its best epoch
    metrics.json     summary written when the run ends
    curves.png       loss, top-1, learning-rate (per step) and images/s curves
    backup/          optimizer + model checkpoints for resuming (and, for a streamed input, where the
                     stream stood at each: epoch-NNNN.stream.json)
    .lock            held (fcntl) by the process training into the directory
"""

import contextlib
import csv
import errno
import fcntl
import io
import json
import math
import os
import re
import shutil
import socket
import time

from keras_convmixer.atomic import (
    DISK_ERRORS,
    FileError,
    disk_error,
    read_json,
    remove_quietly,
    save_weights,
    write_json,
    write_text,
)
from keras_convmixer.errors import first_line
from keras_convmixer.settings import BY_NAME

CONFIG, HISTORY, BEST, METRICS, CURVES = "config.json", "history.csv", "best.json", "metrics.json", "curves.png"
LAST_MODEL, BEST_MODEL, BACKUP, LOCK = "last.keras", "best.keras", "backup", ".lock"
MODEL_FILES = (BEST_MODEL, "model.keras", LAST_MODEL)  # the order predict/evaluate try them in
_CHECKPOINT = re.compile(r"^epoch-(\d{4,})\.weights\.h5$")
_KEEP_CHECKPOINTS = 2
TENSORBOARD = "tensorboard"
_FILES = (CONFIG, HISTORY, BEST, METRICS, CURVES, LAST_MODEL, BEST_MODEL, LOCK)
# Every entry a run writes into its directory: what a run that never finished an epoch takes away again.
_ENTRIES = (*_FILES, BACKUP, TENSORBOARD)


class RunDirError(FileError):
    """A run directory that cannot be used as it is (locked, unreadable file, disk full, ...)."""


class RunDirBusy(RunDirError):
    """Another live process holds the run directory's lock."""


# ----------------------------------------------------------------------------- history


def read_history(path):
    """history.csv rows as dicts of strings (empty when the file does not exist yet)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def history_value(row, key):
    """A history.csv cell as a float, or None where the epoch has no such value (``NA`` or empty,
    e.g. the val_ columns of a run without validation)."""
    value = row.get(key)
    return None if value in (None, "", "NA") else float(value)


def history_csv(rows):
    """CSV text with CSVLogger's layout: ``epoch`` first, then the other keys sorted, ``NA`` for gaps."""
    keys = sorted({k for r in rows for k in r} - {"epoch"})
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["epoch", *keys], restval="NA", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def best_of(rows, monitor):
    """``{"monitor", "value", "epoch"}`` of the best row (highest ``monitor``), or None."""
    best = None
    for row in rows:
        value = history_value(row, monitor)
        if value is not None and math.isfinite(value) and (best is None or value > best["value"]):
            best = {
                "monitor": monitor,
                "value": value,
                "epoch": int(row["epoch"]),
            }  # history.csv's 0-based index, as Keras numbers epochs
    return best


# ----------------------------------------------------------------------------- the run directory


class RunDir:
    """Paths and crash-safe state of one run directory."""

    def __init__(self, path):
        self.path = os.path.abspath(os.fspath(path))
        self._lock_file = None
        self._made = None  # (folders made, deepest first; entries there before) once ``create`` has run

    def __truediv__(self, name):
        return os.path.join(self.path, name)

    @property
    def backup_dir(self):
        return self / BACKUP

    def check(self):
        """Refuse, before anything is written, a path that cannot hold a run: a file, a path through a file, or a
        folder where the run keeps a file (and a file where it keeps backup/), which the first write would meet
        as a raw OS error. Reads only."""
        head = self.path
        while not os.path.lexists(head):
            head = os.path.dirname(head)
        if not os.path.isdir(head):
            where = "is a file" if head == self.path else f"lies under {head}, which is a file"
            raise RunDirError(errno.ENOTDIR, f"--output-dir {self.path} {where}, not a directory")
        for name in _FILES:
            if os.path.isdir(self / name):
                raise RunDirError(
                    errno.EISDIR,
                    f"{self / name} is a folder where a run keeps its {name} file: move it away, "
                    "or pass another --output-dir",
                )
        if os.path.lexists(self.backup_dir) and not os.path.isdir(self.backup_dir):
            raise RunDirError(
                errno.ENOTDIR,
                f"{self.backup_dir} is a file where a run keeps its checkpoints: move it away, "
                "or pass another --output-dir",
            )
        return self

    def create(self):
        """Make the directory (and backup/). What this call made is remembered, so that ``discard`` can take a run
        that never finished an epoch away again without touching anything that was there before."""
        self.check()
        missing, head = [], self.path
        while not os.path.lexists(head):
            missing.append(head)
            head = os.path.dirname(head)
        before = set() if missing else set(os.listdir(self.path))
        try:
            os.makedirs(self.backup_dir, exist_ok=True)
        except OSError as err:
            if err.errno in DISK_ERRORS:
                raise disk_error(self.backup_dir, err) from None
            raise RunDirError(err.errno, f"cannot create run dir {self.path}: {err.strerror}") from None
        self._made = (missing, before)
        return self

    def discard(self):
        """Take away what ``create`` made, while this process holds the lock and no epoch is recorded (no
        history.csv): a run that fails before its first epoch leaves no run directory behind. A directory that
        existed before keeps everything it held (only the run's own entries that this start added go), and the
        parent folders made with it go only while empty. Returns whether anything was removed."""
        made = self._made
        if made is None or self._lock_file is None or os.path.lexists(self / HISTORY):
            return False
        missing, before = made
        if missing:
            shutil.rmtree(self.path, ignore_errors=True)
            for parent in missing[1:]:  # deepest first; another run may have put something there since
                try:
                    os.rmdir(parent)
                except OSError:
                    break
        else:
            for name in set(_ENTRIES) - before:
                path = self / name
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    remove_quietly(path)
        self._made = None
        return True

    @contextlib.contextmanager
    def claimed(self):
        """Create and lock the directory for the block; when the block fails before an epoch is recorded, what
        this start created is taken away (``discard``) before the lock is let go."""
        self.create()
        try:
            self.lock()
            yield self
        except BaseException:
            self.discard()
            raise
        finally:
            self.unlock()

    def _remove_temporaries(self):
        """Remove what a killed writer left behind (only while holding the lock: a live run's are its own)."""
        for directory in (self.path, self.backup_dir):
            for name in os.listdir(directory) if os.path.isdir(directory) else ():
                if name.startswith(".tmp-"):
                    remove_quietly(os.path.join(directory, name))

    # -- the lock

    def _busy(self, err, f):
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        if err.errno in (errno.EAGAIN, errno.EACCES):
            raise RunDirBusy(
                err.errno,
                f"run dir {self.path} is in use by {holder}: wait for that run to end, or pass another --output-dir",
            ) from None
        raise err

    def check_free(self):
        """Raise ``RunDirBusy`` when a live process holds the lock, without taking it or writing anything: a run
        into a busy directory stops before it loads its data."""
        path = self / LOCK
        if not os.path.isfile(path):
            return self
        with open(path) as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                self._busy(err, f)
        return self

    def lock(self):
        """Take the run directory's lock, or raise ``RunDirBusy`` naming the process that holds it.

        The lock is an ``fcntl`` lock, which the kernel drops when its holder dies, so a lock
        file left by a killed run is simply taken over."""
        path = self / LOCK
        try:
            f = open(path, "a+")
        except OSError as err:
            if err.errno in DISK_ERRORS:
                raise disk_error(path, err) from None
            raise RunDirError(err.errno, f"cannot open {path}: {err.strerror}") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            self._busy(err, f)
        f.seek(0)
        f.truncate()
        f.write(f"PID {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._lock_file = f
        self._remove_temporaries()
        return self

    def unlock(self):
        if self._lock_file is not None:
            self._lock_file.close()  # closing drops the flock
            self._lock_file = None

    # -- config

    def read_config(self):
        path = self / CONFIG
        if not os.path.exists(path):
            return None
        try:
            return read_json(path)
        except FileError as err:
            raise RunDirError(err.errno, str(err)) from None

    def write_config(self, cfg):
        write_json(self / CONFIG, cfg)

    # -- history and checkpoints

    def history(self):
        return read_history(self / HISTORY)

    def checkpoint(self, epochs_done):
        return os.path.join(self.backup_dir, f"epoch-{epochs_done:04d}.weights.h5")

    def checkpoints(self):
        """``{epochs_done: path}`` of the backup checkpoints on disk."""
        found = {}
        if os.path.isdir(self.backup_dir):
            for name in os.listdir(self.backup_dir):
                m = _CHECKPOINT.match(name)
                if m:
                    found[int(m.group(1))] = os.path.join(self.backup_dir, name)
        return found

    def stream_state_path(self, epochs_done):
        return os.path.join(self.backup_dir, f"epoch-{epochs_done:04d}.stream.json")

    def stream_state(self, epochs_done):
        """The input stream's state saved with the backup of ``epochs_done`` epochs (a dict), or None."""
        path = self.stream_state_path(epochs_done)
        return read_json(path) if os.path.exists(path) else None

    def commit_epoch(self, model, rows, monitor, stream_state=None):
        """Write the backup for ``len(rows)`` finished epochs (with ``stream_state``, a dict, beside it), then
        the history that names it."""
        done = len(rows)
        save_weights(model, self.checkpoint(done))
        if stream_state is not None:
            write_json(self.stream_state_path(done), stream_state)
        write_text(self / HISTORY, history_csv(rows))  # the commit point
        best = best_of(rows, monitor)
        if best is not None:
            write_json(self / BEST, best)
        for epochs, path in self.checkpoints().items():
            if epochs <= done - _KEEP_CHECKPOINTS or epochs > done:
                remove_quietly(path)
                remove_quietly(self.stream_state_path(epochs))

    def restore(self, model, log=print):
        """Load the newest readable checkpoint that ``history.csv`` covers into ``model`` (compiled,
        optimizer built); truncate the history to it. Returns the number of finished epochs."""
        rows = self.history()
        if not rows:
            return 0
        available = self.checkpoints()
        epochs = len(rows)
        while epochs > 0:
            path = available.get(epochs)
            if path is not None:
                try:
                    model.load_weights(path)
                    break
                except Exception as err:  # h5py/Keras raise many types for a damaged file
                    log(f"Backup {path} is unreadable ({first_line(err)}); falling back to the previous checkpoint.")
            epochs -= 1
        if epochs < len(rows):
            log(
                f"Resuming after {epochs} of the {len(rows)} recorded epochs: the history after them is dropped "
                "and those epochs are trained again."
            )
            write_text(self / HISTORY, history_csv(rows[:epochs]))
        return epochs


def check_resumable(saved, current, may_change, run_dir):
    """Refuse to continue a run with other settings, another backend or another class list."""
    current = json.loads(json.dumps(current, default=str))
    if saved.get("backend") and current.get("backend") and saved["backend"] != current["backend"]:
        raise ValueError(
            f"{run_dir} was trained with KERAS_BACKEND={saved['backend']}, not {current['backend']}: "
            "its optimizer state resumes only on the same backend; set KERAS_BACKEND="
            f"{saved['backend']} to resume it, or pass a new --output-dir"
        )
    old, new = saved.get("class_names"), current.get("class_names")
    if old is not None and new is not None and list(old) != list(new):
        added, removed = [c for c in new if c not in old], [c for c in old if c not in new]
        diff = "; ".join(
            part
            for part in (
                f"added {', '.join(added[:5])}" if added else "",
                f"removed {', '.join(removed[:5])}" if removed else "",
            )
            if part
        )
        raise ValueError(
            f"the classes of {current.get('data')} changed since {run_dir} began "
            f"({diff or 'same names, new order'}): pass a new --output-dir"
        )
    skip = set(may_change) | {"class_names", "num_classes", "backend"}
    # The settings first (named as their flags), then what is derived from them (model_kwargs, ...).
    changed = sorted(
        (k for k in current if k not in skip and k in saved and saved[k] != current[k]),
        key=lambda k: (k not in BY_NAME, k),
    )
    if changed:
        k = changed[0]
        name = BY_NAME[k].flag if k in BY_NAME else k
        raise ValueError(
            f"{run_dir} holds a run started with other settings ({name} {saved[k]!r} there, {current[k]!r} now"
            f"{f', and {len(changed) - 1} more' if len(changed) > 1 else ''}): re-run its command to resume, "
            "or pass a new --output-dir."
        )
