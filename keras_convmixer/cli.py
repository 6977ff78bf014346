"""What the scripts/ front ends share: a user mistake ends as one line, exit code 2."""

import json
import math
import os

# Errors that come from what the user passed (a path, a file, a flag, a missing extra),
# as opposed to bugs, which keep their traceback.
USER_ERRORS = (ValueError, OSError, ImportError)


def first_line(err):
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def fail(parser, err):
    """Exit like argparse does on a bad flag, without repeating the usage text."""
    parser.exit(2, f"{parser.prog}: error: {first_line(err)}\n")


def _plain(value):
    """``value`` as plain JSON types: NumPy scalars and arrays (a float32 score, an int64 count) and paths,
    which ``json`` refuses with a TypeError, become numbers, lists and strings; a non-finite number
    (a model that outputs NaN) becomes None."""
    if isinstance(value, dict):
        return {_key(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and callable(value.tolist):  # NumPy scalars and arrays
        return _plain(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int)):
        return value
    return str(value)


def _key(key):
    if isinstance(key, str):
        return key
    plain = _plain(key)
    return plain if isinstance(plain, str) else json.dumps(plain)


def json_text(obj):
    """Strict JSON for reports: never the invalid ``NaN``/``Infinity`` tokens Python's json writes by default,
    and never a TypeError halfway through a report."""
    return json.dumps(_plain(obj), indent=2, allow_nan=False)
