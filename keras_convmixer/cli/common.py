"""What the command-line front ends share: a user mistake ends as one line with exit code 2, reports are strict
JSON, and progress goes to stderr so stdout stays machine-readable."""

import argparse
import contextlib
import importlib
import logging
import os
import sys

from keras_convmixer.errors import check_keras_backend, first_line
from keras_convmixer.jsontext import json_text

__all__ = [
    "USER_ERRORS",
    "add_trust_savedmodel",
    "check_backend",
    "emit_json",
    "fail",
    "first_line",
    "import_or_fail",
    "json_text",
    "load_main",
    "one_line_errors",
    "positive_int",
    "setup_logging",
    "start",
]

# Errors that come from what the user passed (a path, a file, a flag, a missing extra),
# as opposed to bugs, which keep their traceback.
USER_ERRORS = (ValueError, OSError, ImportError)


def fail(parser, err):
    """Exit like argparse does on a bad flag, without repeating the usage text."""
    parser.exit(2, f"{parser.prog}: error: {first_line(err)}\n")


def add_trust_savedmodel(parser):
    """The opt-in that commands which open a model need before they run a SavedModel's own graph."""
    parser.add_argument(
        "--trust-savedmodel",
        action="store_true",
        help="allow MODEL to be a SavedModel: it runs its own TensorFlow graph, which can read and "
        "write files, so pass this only for SavedModels you exported yourself or trust",
    )


def check_backend(parser):
    """An unknown ``KERAS_BACKEND`` ends like a bad flag. Checked before the flags are parsed, so a console script
    and its ``scripts/`` file (which checks before it loads the command) answer it alike, ``--help`` included."""
    try:
        check_keras_backend()
    except ImportError as err:
        fail(parser, err)


def import_or_fail(parser, module):
    """Import ``module`` (one that loads Keras and its backend); a package that is missing ends as one line."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        fail(parser, err)


def start(parser, argv, module):
    """``(args, module)`` for a command that runs one library module: the backend is checked and the flags parsed
    before anything heavy loads (so ``--help`` and a bad flag answer at once), progress goes to stderr, then
    ``module`` is imported."""
    check_backend(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    setup_logging()
    return args, import_or_fail(parser, module)


@contextlib.contextmanager
def one_line_errors(parser, *more):
    """Inside the block, an error from what the user passed (``USER_ERRORS`` and the types in ``more``) ends as one
    line and exit 2; any other exception is a bug and keeps its traceback."""
    try:
        yield
    except (*USER_ERRORS, *more) as err:
        fail(parser, err)


def emit_json(obj, output=None):
    """Print ``obj`` as a strict JSON report, after writing it to ``output`` when one is given (so a path that cannot
    be written fails before anything reaches stdout)."""
    text = json_text(obj)
    if output:
        with open(output, "w") as f:
            f.write(text + "\n")
    print(text)


def load_main(module, script):
    """``module.main`` for the ``scripts/`` front end ``script`` (its ``__file__``). An unknown ``KERAS_BACKEND`` or
    a missing package ends as one line and exit 2 before the module loads: not every ``main`` behind a script
    checks the backend itself."""
    try:
        check_keras_backend()
        return importlib.import_module(module).main
    except ImportError as err:
        sys.stderr.write(f"{os.path.basename(script)}: error: {first_line(err)}\n")
        sys.exit(2)


def positive_int(text):
    """argparse type for counts (a batch size, top-k): the flag's error names the value, not a traceback."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes, not the stream of the moment it was made
    (a test harness or a caller may swap ``sys.stderr`` between runs of ``main``)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level=logging.INFO):
    """Send ``keras_convmixer`` log records (progress, cache locations, skipped files) to stderr as
    ``LEVEL message`` lines, so stdout keeps only the command's result (JSON that can be piped).

    Only the package's logger gets the handler, so other libraries' records keep their own settings; records
    still propagate (to a handler the caller installed on the root logger, or to a test's log capture).
    Calling it again adds no second handler.
    """
    logger = logging.getLogger("keras_convmixer")
    logger.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        logger.addHandler(handler)
    return logger
