"""What the command-line front ends share: a user mistake ends as one line with exit code 2, reports are strict
JSON, and progress goes to stderr so stdout stays machine-readable."""

import argparse
import contextlib
import glob
import importlib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile

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
    "quiet_frameworks",
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
    quiet_frameworks()
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


# ----------------------------------------------------------------------------- framework noise on stderr

# What TensorFlow's native code prints to stderr while it loads, before absl logging is set up (so
# TF_CPP_MIN_LOG_LEVEL does not reach it): INFO/WARNING lines about CUDA probing, oneDNN and CPU features.
_TF_LOAD_NOISE = (
    r"[IW]\d{4} \d\d:\d\d:\d\d",
    r"WARNING: All log messages before absl::InitializeLog",
    r"To enable the following instructions: ",
)
# TensorFlow's CUDA probe logs an ERROR on every machine without a GPU; it is only news where a GPU is.
_NO_GPU_NOISE = r"E\d{4} [^\n]*failed call to cuInit"


def _noise():
    patterns = list(_TF_LOAD_NOISE)
    if not glob.glob("/dev/nvidia[0-9]*"):
        patterns.append(_NO_GPU_NOISE)
    return re.compile("^(" + "|".join(patterns) + ")")


@contextlib.contextmanager
def native_stderr_without(noise):
    """Run the block with file descriptor 2 captured (native libraries write there, not to sys.stderr),
    then pass on every line that ``noise`` does not match: errors and anything unexpected still show."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not noise.match(line)))
            sys.stderr.flush()


class _QuietLoader(importlib.abc.Loader):
    """TensorFlow's own loader, run with its load-time noise filtered; the CUDA probe, which logs too, is made
    here under the same filter (listing devices leaves ``tf.config.set_visible_devices`` free to run later)."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with native_stderr_without(_noise()):
            self.loader.exec_module(module)
            with contextlib.suppress(Exception):
                module.config.list_physical_devices("GPU")
        _quiet_absl()

    def __getattr__(self, name):
        return getattr(self.loader, name)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` as the other finders do and hands it ``_QuietLoader``: whatever imports TensorFlow
    first (tf.data, a SavedModel, TensorBoard, Keras itself), and whenever, it loads without the noise, and a
    command that never needs it never pays for loading it."""

    _finding = False

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow" or self._finding:
            return None
        self._finding = True  # the other finders' answer, asked through the import system (and its hooks)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._finding = False
        if spec is not None and spec.loader is not None and not isinstance(spec.loader, _QuietLoader):
            spec.loader = _QuietLoader(spec.loader)
        return spec


def _quiet_absl():
    try:
        from absl import logging as absl_logging
    except ImportError:
        return
    absl_logging.set_verbosity(absl_logging.ERROR)


def quiet_frameworks(load_tensorflow=False):
    """Keep the frameworks' start-up noise off stderr, so a command's first lines are its own: TensorFlow's
    INFO and WARNING lines (``TF_CPP_MIN_LOG_LEVEL=2`` unless the user set it), the native lines it prints while
    it loads, its no-GPU ``cuInit`` error where there is no GPU, and absl's below ERROR. Errors and anything
    unexpected still show. ``load_tensorflow`` loads it now where it is installed (a command that will)."""
    if not os.environ.get("TF_CPP_MIN_LOG_LEVEL"):
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    _quiet_absl()
    if "tensorflow" in sys.modules:
        return
    if not any(isinstance(finder, _QuietTensorFlowFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowFinder())
    if load_tensorflow and importlib.util.find_spec("tensorflow") is not None:
        importlib.import_module("tensorflow")
