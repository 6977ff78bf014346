"""Strict, readable JSON text for reports and run-directory files."""

import json
import math
import os


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
    and never a TypeError halfway through a report. Indented, except that a list of plain values (a row of a
    confusion matrix, a mean, the class names) stays on one line: a 1000-class report stays readable."""
    return _dump(_plain(obj), 0)


def _dump(value, depth):
    inner, outer = "  " * (depth + 1), "  " * depth
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {_dump(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{outer}}}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(f"{inner}{_dump(v, depth + 1)}" for v in value) + f"\n{outer}]"
    return json.dumps(value, allow_nan=False)
