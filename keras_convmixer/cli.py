"""What the scripts/ front ends share: a user mistake ends as one line, exit code 2."""

import json
import math

# Errors that come from what the user passed (a path, a file, a flag, a missing extra),
# as opposed to bugs, which keep their traceback.
USER_ERRORS = (ValueError, OSError, ImportError)


def first_line(err):
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def fail(parser, err):
    """Exit like argparse does on a bad flag, without repeating the usage text."""
    parser.exit(2, f"{parser.prog}: error: {first_line(err)}\n")


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def json_text(obj):
    """Strict JSON for reports: a non-finite number (a model that outputs NaN) becomes null,
    never the invalid ``NaN``/``Infinity`` tokens Python's json writes by default."""
    return json.dumps(_finite_or_none(obj), indent=2, allow_nan=False)
