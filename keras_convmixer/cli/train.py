"""Train a ConvMixer: a recipe (imagenet, cifar10, demo), then a YAML config file, then flags.

Examples:
  convmixer-train                                   # the demo recipe on sklearn digits
  convmixer-train --recipe cifar10 --data folder:/data/cifar10/train --val-split 5000
  convmixer-train --config my-run.yaml --epochs 5   # the file's settings, but 5 epochs
  KERAS_BACKEND=jax convmixer-train --recipe cifar10 --data folder:/data/c10 --in-memory --augment-on device
Choose the backend with KERAS_BACKEND. Re-running with the same --output-dir resumes after a kill.
The run directory gets config.json (the resolved settings: the record of the run), history.csv,
best.keras, last.keras, metrics.json, curves.png and TensorBoard logs.
"""

import argparse
import contextlib
import importlib.util
import math
import os
import re
import sys
import tempfile

from keras_convmixer import recipes
from keras_convmixer.cli.common import check_backend, import_or_fail, json_text, one_line_errors, setup_logging

# Settings only the command line has: they are not part of a run's config.
_NOT_SETTINGS = ("config", "print_config", "help")


class _UsageError(ValueError):
    """A flag argparse rejects: one line like every other mistake, not the usage text."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(f"{message} (--help lists the flags)")


def _pair(text):
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers like 0.08,1.0, got {text!r}") from None
    return [lo, hi]


def _split(text):
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1) or a whole number of images, got {text!r}")
    return int(value) if value >= 1 and value.is_integer() else value


def _shown(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(_shown(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return "none" if value is None else str(value)


def _recipe_default(dest):
    """``(default: X)``, or ``(default: recipe's: demo X, cifar10 Y, imagenet Z)`` where recipes differ."""
    order = [recipes.DEFAULT_RECIPE, *sorted(r for r in recipes.RECIPES if r != recipes.DEFAULT_RECIPE)]
    values = {r: _shown(recipes.recipe_value(r, dest)) for r in order}
    if len(set(values.values())) == 1:
        return f"(default: {values[order[0]]})"
    return "(default: recipe's: " + ", ".join(f"{r} {v}" for r, v in values.items()) + ")"


def _adder(group):
    def add(*names, help, dest=None, default=None, **kwargs):
        dest = dest or names[0][2:].replace("-", "_")
        shown = f"(default: {default})" if default else _recipe_default(dest)
        group.add_argument(*names, dest=dest, help=f"{help} {shown}".replace("%", "%%"), **kwargs)

    return add


def build_parser():
    """The parser; every setting defaults to None, so the config file and then the recipe decide."""
    p = _Parser(
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bool_flag = dict(action=argparse.BooleanOptionalAction)
    add = _adder(p)
    add(
        "--recipe",
        choices=sorted(recipes.RECIPES),
        default=recipes.DEFAULT_RECIPE,
        help="base settings, which the config file and the flags override",
    )
    p.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="YAML mapping of settings: keys are flag names with - or _ (e.g. 'batch-size: 256', "
        "'in_memory: true'); flags on the command line override it",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved settings as JSON and exit without training"
    )
    add("--output-dir", default="runs/<date-time>", help="run directory; re-run with the same one to resume")

    add = _adder(p.add_argument_group("model"))
    add("--model", help="registry name (e.g. convmixer_256_8) or 'custom', sized by --dim/--depth/...")
    add("--dim", type=int, help="channels of --model custom")
    add("--depth", type=int, help="number of ConvMixer blocks of --model custom")
    add("--kernel-size", type=int, help="depthwise kernel size of --model custom")
    add("--patch-size", type=int, help="patch size (stem stride) of --model custom")
    add("--activation", help="activation of --model custom, e.g. gelu or relu")
    add("--dropout", type=float, help="dropout before the classifier")
    add(
        "--initializer",
        choices=recipes.INITIALIZERS,
        help="torch: PyTorch's default init, as the paper's models; keras: Keras's defaults",
    )

    add = _adder(p.add_argument_group("fine-tuning"))
    add(
        "--weights",
        metavar="imagenet|hf://OWNER/REPO[@REV]|PATH",
        help="start a new run from pretrained weights (never reloaded on resume): imagenet (the released "
        "weights of --model), a timm-format Hub repo, or a local checkpoint (.safetensors/.pth/.pth.tar), "
        ".keras model or run directory; the head is loaded when its class count matches the data's, else "
        "new; mean/std, --crop-pct, --interpolation and --image-size follow the weights unless given "
        "(any --image-size that is a multiple of the patch size works: ConvMixer is fully convolutional)",
    )
    add(
        "--freeze-backbone",
        **bool_flag,
        help="linear probe: train only the head; the stem and blocks keep their weights and their "
        "BatchNorm layers run in inference mode",
    )
    add(
        "--backbone-lr-scale",
        type=float,
        help="the stem and blocks step with lr x this in (0, 1], Adam step and weight decay alike "
        "(a PyTorch parameter group with a lower lr); the head keeps --lr",
    )

    add = _adder(p.add_argument_group("data"))
    add("--data", help="digits | folder:<path> (a sub-folder per class) | tfds:<name>")
    add("--data-dir", help="TFDS data directory")
    add("--download", **bool_flag, help="let TFDS download the dataset")
    add("--val-split", type=_split, help="fraction (0.1) or image count (5000) held out, stratified; 0: none")
    add("--val-source", help="separate validation folder, or TFDS split name (instead of --val-split)")
    add(
        "--split-seed",
        type=int,
        help="seed of --val-split, independent of --seed, so runs with different seeds are scored on the same images",
    )
    add(
        "--in-memory",
        **bool_flag,
        help="decode once to uint8 arrays (cached .npy), no tf.data; needs --augment-on device",
    )
    add("--image-size", type=int, help="training and evaluation resolution")
    add("--crop-pct", type=float, help="eval transform: resize the shorter side to size/crop_pct, centre-crop")
    add("--interpolation", choices=recipes.INTERPOLATIONS, help="eval resize")

    add = _adder(p.add_argument_group("optimisation"))
    add("--epochs", type=int, help="training epochs")
    add("--batch-size", type=int, help="global batch, split across replicas")
    add("--lr", type=float, help="peak learning rate (AdamW)")
    add("--weight-decay", type=float, help="AdamW decoupled weight decay")
    add("--epsilon", type=float, help="AdamW epsilon")
    add("--clip-norm", type=float, help="clip gradients to this global norm (0 or none: off)")
    add(
        "--schedule",
        choices=recipes.SCHEDULES,
        help="onecycle: the paper's triangular schedule, per step; cosine: cosine decay after --warmup-epochs",
    )
    add("--warmup-epochs", type=float, help="linear warm-up of --schedule cosine")
    add("--wd-exclude-bias-bn", **bool_flag, help="no weight decay on biases and BatchNorm parameters")
    add("--precision", choices=recipes.PRECISIONS, help="auto: mixed_bfloat16 on a GPU/TPU, float32 on a CPU")
    add("--seed", type=int, help="seed of the initial weights, shuffling and augmentation")

    add = _adder(p.add_argument_group("augmentation"))
    add("--crop-scale", type=_pair, help="RandomResizedCrop area range, e.g. 0.08,1")
    add("--crop-ratio", type=_pair, help="RandomResizedCrop aspect-ratio range, e.g. 0.75,1.333")
    add("--train-interpolation", choices=recipes.TRAIN_INTERPOLATIONS, help="RandomResizedCrop resize")
    add("--hflip", type=float, help="horizontal flip probability")
    add("--randaug-n", type=int, help="RandAugment ops per image (0: off)")
    add("--randaug-m", type=float, help="RandAugment magnitude on --randaug-scale")
    add("--randaug-mstd", type=float, help="std of timm's per-op magnitude noise")
    add(
        "--randaug-scale",
        choices=sorted(recipes.RANDAUG_SCALES),
        help="timm: rand-m{m}-mstd{mstd}-inc1 (0-10, each op with p 0.5); torchvision: RandAugment(n, m), 0-30",
    )
    add("--color-jitter", type=float, help="colour jitter strength")
    add("--reprob", type=float, help="random erasing probability")
    add("--mixup", dest="mixup_alpha", type=float, help="MixUp alpha (0: off)")
    add("--cutmix", dest="cutmix_alpha", type=float, help="CutMix alpha (0: off)")
    add("--mix-prob", type=float, help="probability that a batch is mixed")
    add("--switch-prob", type=float, help="probability of CutMix rather than MixUp when both are on")
    add("--label-smoothing", "--smoothing", type=float, help="label smoothing")
    add(
        "--augment-impl",
        choices=recipes.AUGMENT_IMPLS,
        help="convmixer: torchvision's/timm's RandAugment and timm's erasing; keras_cv: keras-cv 0.9's",
    )
    add("--augment-on", choices=recipes.AUGMENT_ON, help="host: in the tf.data pipeline; device: inside the train step")

    add = _adder(p.add_argument_group("scale"))
    add(
        "--strategy",
        choices=recipes.STRATEGIES,
        help="auto: mirrored on several TensorFlow GPUs, data-parallel on several JAX devices, else none",
    )
    add("--logical-cpus", type=int, help="split the CPU into N logical devices (mirrored, for testing)")
    add("--coordinator", help="JAX multi-process: host:port of process 0")
    add("--num-processes", type=int, help="JAX multi-process: number of processes")
    add("--process-id", type=int, help="JAX multi-process: this process's index")

    add = _adder(p.add_argument_group("run length and output"))
    add("--steps-per-epoch", type=int, default="the whole training split", help="cap each epoch at N batches")
    add("--val-steps", type=int, default="the whole validation split", help="cap validation at N batches")
    add(
        "--verbose",
        type=int,
        choices=[0, 1, 2],
        default="1 on a terminal, else 2",
        help="0: silent, 1: a progress bar, 2: one line per epoch",
    )
    return p


def _option_names(parser):
    """Each accepted config-file key (flag names and setting names, with - or _) -> its action."""
    names = {}
    for action in parser._actions:
        if action.dest in _NOT_SETTINGS:
            continue
        for key in [*(s[2:] for s in action.option_strings if not s.startswith("--no-")), action.dest]:
            names[key.replace("-", "_")] = action
    return names


def _read_config_file(parser, path):
    """The settings of a YAML file, each checked by its flag's own type and choices."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            content = yaml.safe_load(f)
    except OSError as err:
        raise ValueError(f"--config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ValueError(f"--config {path} is not valid YAML{where}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ValueError(
            f"--config {path} must be a mapping of flag names to values, not a YAML {type(content).__name__}"
        )
    names, settings = _option_names(parser), {}
    for key, value in content.items():
        action = names.get(str(key).replace("-", "_"))
        if action is None:
            raise ValueError(f"--config {path}: {key!r} is not a setting (--help lists the flags)")
        if value is None:  # an empty entry leaves the recipe's value
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise ValueError(f"--config {path}: {key} must be true or false, got {value!r}")
            tokens = [flag if value else "--no-" + flag[2:]]
        else:
            text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
            tokens = [f"{flag}={text}"]
        try:
            settings[action.dest] = getattr(parser.parse_args(tokens), action.dest)
        except _UsageError as err:
            reason = str(err).split(" (--help")[0].split(": ", 1)[-1]  # without argparse's "argument --flag: "
            raise ValueError(f"--config {path}: {key}: {reason}") from None
    return settings


def settings_from(parser, argv=None, isatty=None):
    """``(recipe, settings, print_config)`` from the command line over the config file over the recipe."""
    args = vars(parser.parse_args(argv))
    from_file = _read_config_file(parser, args["config"]) if args["config"] else {}
    print_config = args.pop("print_config")
    given = {k: v for k, v in args.items() if v is not None and k not in _NOT_SETTINGS}
    settings = {**from_file, **given}
    recipe = settings.pop("recipe", recipes.DEFAULT_RECIPE)
    if settings.get("verbose") is None:
        # A progress bar redrawn with \r and ANSI codes is noise in a log file.
        settings["verbose"] = "auto" if (sys.stdout.isatty() if isatty is None else isatty) else 2
    return recipe, settings, print_config


# What TensorFlow's native code prints to stderr while it loads, before absl logging is set up (so
# TF_CPP_MIN_LOG_LEVEL does not reach it): INFO/WARNING lines about CUDA probing, oneDNN and CPU features.
_TF_LOAD_NOISE = re.compile(
    r"^([IW]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl::InitializeLog|"
    r"To enable the following instructions: )"
)


@contextlib.contextmanager
def _native_stderr_without(noise):
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


def _quiet_frameworks():
    if not os.environ.get("TF_CPP_MIN_LOG_LEVEL"):
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # TensorFlow's INFO and WARNING lines once it has loaded
    # A run imports TensorFlow wherever it is installed (tf.data, TensorBoard): load it here, quietly.
    if "tensorflow" not in sys.modules and importlib.util.find_spec("tensorflow") is not None:
        with _native_stderr_without(_TF_LOAD_NOISE):
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")  # where the CUDA probing prints


def _quiet_absl():
    try:
        from absl import logging as absl_logging
    except ImportError:
        return
    absl_logging.set_verbosity(absl_logging.ERROR)


def main(argv=None):
    parser = build_parser()
    check_backend(parser)
    with one_line_errors(parser):
        recipe, settings, print_config = settings_from(parser, argv)
        config = recipes.resolve_config(recipe, settings)
    if print_config:
        print(json_text(config))
        return 0
    _quiet_frameworks()
    setup_logging()
    training = import_or_fail(parser, "keras_convmixer.training")  # Keras and its backend load here
    diverged = import_or_fail(parser, "keras_convmixer.callbacks").TrainingDiverged
    _quiet_absl()
    with one_line_errors(parser):
        try:
            training.train(config)
        except diverged as err:  # not a usage error: exit 1, one line
            parser.exit(1, f"{parser.prog}: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
