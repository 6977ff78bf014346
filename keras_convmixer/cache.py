"""The pretrained-weights cache: timm-named tensors on disk, keyed by where they came from, never a Keras model.

Each entry is one ``.safetensors`` file of a source's weights in timm's names and layouts (what
``convert.load_state_dict`` reads), and a row of ``index.json``: the source's sha256, its architecture and
its evaluation metadata. The cache lives in ``<KERAS_HOME or ~/.keras>/models/convmixer/``. Reading a hit
needs neither the network nor torch nor Keras. This module imports no Keras.
"""

import hashlib
import logging
import os
import re

from keras_convmixer.atomic import atomic_path, read_json, write_json
from keras_convmixer.errors import first_line

logger = logging.getLogger(__name__)

INDEX = "index.json"
# Entries written before the cache held tensors (they named .weights.h5 files) lack this and are converted anew.
FORMAT = "timm-safetensors"
ENTRY_KEYS = ("sha256", "arch", "variant", "meta")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def keras_home():
    """``$KERAS_HOME``, or ``~/.keras`` without it: where Keras keeps its config and downloads."""
    return os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")


def cache_dir():
    """Where converted weights are cached: ``<keras_home()>/models/convmixer``."""
    return os.path.join(keras_home(), "models", "convmixer")


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_sha256(value):
    return isinstance(value, str) and bool(_SHA256.match(value))


def _read_index():
    path = os.path.join(cache_dir(), INDEX)
    if not os.path.isfile(path):
        return {}
    try:
        entries = read_json(path).get("entries")
    except OSError as err:  # a damaged index only costs a new conversion
        logger.warning("Ignoring the weights cache index: %s", first_line(err))
        return {}
    return entries if isinstance(entries, dict) else {}


def lookup(key):
    """The entry stored under ``key`` with ``path`` (its tensor file) added, or None where there is none that
    is whole: a missing file or a damaged entry only costs a new conversion."""
    entry = _read_index().get(key)
    if not isinstance(entry, dict) or entry.get("format") != FORMAT:
        return None
    path = os.path.join(cache_dir(), str(entry.get("file")))
    if not os.path.isfile(path) or not is_sha256(entry.get("sha256")):
        return None
    if not all(k in entry for k in ENTRY_KEYS) or not isinstance(entry["arch"], dict):
        return None
    return dict(entry, path=path)


def store(key, name, state, **entry):
    """Write the timm-named ``state`` (``{name: np.ndarray}``) and index it under ``key`` with ``entry`` (the
    ``ENTRY_KEYS``); returns what ``lookup(key)`` then gives."""
    from safetensors.numpy import save_file

    directory = cache_dir()
    os.makedirs(directory, exist_ok=True)
    file = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-{entry['sha256'][:16]}.safetensors"
    with atomic_path(os.path.join(directory, file)) as tmp:
        save_file(state, tmp)
    entries = _read_index()
    entries[key] = dict(entry, file=file, format=FORMAT)
    write_json(os.path.join(directory, INDEX), {"entries": entries})
    logger.info("Cached the weights of %s as %s.", key, os.path.join(directory, file))
    return lookup(key)
