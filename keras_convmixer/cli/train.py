"""Train a ConvMixer: a recipe (imagenet, cifar10, demo), then a YAML config file, then flags.

Examples:
  convmixer-train                                   # the demo recipe on sklearn digits
  convmixer-train --recipe cifar10 --data folder:/data/cifar10/train --val-split 5000
  convmixer-train --config my-run.yaml --epochs 5   # the file's settings, but 5 epochs
  KERAS_BACKEND=jax convmixer-train --recipe cifar10 --data folder:/data/c10 --in-memory --augment-on device
Choose the backend with KERAS_BACKEND. Re-running with the same --output-dir resumes after a kill (a finished
run says it is complete).
The run directory gets config.json (the resolved settings: the record of the run), history.csv,
best.keras, last.keras, metrics.json, curves.png and TensorBoard logs.
"""

import argparse
import os
import sys

from keras_convmixer import config, recipes, resume, settings
from keras_convmixer.cli.common import (
    check_backend,
    import_or_fail,
    json_text,
    one_line_errors,
    quiet_frameworks,
    setup_logging,
)

# Settings only the command line has: they are not part of a run's config.
_NOT_SETTINGS = ("config", "print_config", "help")


class _UsageError(ValueError):
    """A flag argparse rejects: one line like every other mistake, not the usage text."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(f"{message} (--help lists the flags)")


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


def _add_setting(group, setting):
    """The flag of one row of ``settings.SETTINGS``; it defaults to None, so the config file and then the
    recipe decide."""
    shown = f"(default: {setting.shown})" if setting.shown else _recipe_default(setting.name)
    kwargs = dict(dest=setting.name, help=f"{setting.help} {shown}".replace("%", "%%"))
    if setting.type == "bool":
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = settings.PARSERS[setting.type]
    if setting.choices is not None:
        kwargs["choices"] = list(setting.choices)
    if setting.metavar:
        kwargs["metavar"] = setting.metavar
    group.add_argument(*setting.spellings, **kwargs)


def build_parser():
    """The parser: the command line's own flags, then one flag per setting, grouped as the table groups them."""
    p = _Parser(
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--recipe",
        choices=sorted(recipes.RECIPES),
        help=f"base settings, which the config file and the flags override (default: {recipes.DEFAULT_RECIPE})",
    )
    p.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="YAML (or JSON) mapping of settings: keys are flag names with - or _ (e.g. 'batch-size: 256', "
        "'in_memory: true'); --print-config output and a run's config.json are accepted too; flags on the "
        "command line override it",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved settings as JSON (a file --config accepts) and exit without training",
    )
    groups = {group: p if not group else p.add_argument_group(group) for group in settings.GROUPS}
    for setting in settings.SETTINGS:
        _add_setting(groups[setting.group], setting)
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


def _load_mapping(path):
    """The mapping a YAML (or JSON, a subset of YAML) file holds; {} for an empty file."""
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
    return content


# Keys of a printed config or a run's config.json that are read back without being settings: what is
# derived from the settings (recomputed from them) and what a run recorded (found again by the next run).
_READ_BACK = {*config.DERIVED_KEYS, *config.RECORD_KEYS} - {"recipe"}


def _parse_entry(parser, action, key, value):
    """One config-file value, checked by its flag's own type and choices."""
    flag = action.option_strings[0]
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        tokens = [flag if value else "--no-" + flag[2:]]
    else:
        text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
        tokens = [f"{flag}={text}"]
    try:
        return getattr(parser.parse_args(tokens), action.dest)
    except _UsageError as err:
        reason = str(err).split(" (--help")[0].split(": ", 1)[-1]  # without argparse's "argument --flag: "
        raise ValueError(f"{key}: {reason}") from None


def _read_config_file(parser, path):
    """The settings of a YAML file, a ``--print-config`` output or a run's config.json."""
    names, values = _option_names(parser), {}
    for key, value in _load_mapping(path).items():
        name = str(key).replace("-", "_")
        action = names.get(name)
        if action is None and name in _READ_BACK:
            continue
        if action is None:
            raise ValueError(f"--config {path}: {key!r} is not a setting (--help lists the flags)")
        if name == "weights" and isinstance(value, dict):
            value = config.weights_spec(value)  # config.json's record of the weights a run loaded
        if value is None or (name == "verbose" and value == "auto"):
            continue  # an empty entry leaves the recipe's value; "auto" is the terminal's choice
        try:
            values[action.dest] = _parse_entry(parser, action, key, value)
        except ValueError as err:
            raise ValueError(f"--config {path}: {err}") from None
    return values


def settings_from(parser, argv=None, isatty=None):
    """``(recipe, settings, print_config)`` from the command line over the config file over the recipe."""
    args = vars(parser.parse_args(argv))
    from_file = _read_config_file(parser, args["config"]) if args["config"] else {}
    print_config = args.pop("print_config")
    given = {k: v for k, v in args.items() if v is not None and k not in _NOT_SETTINGS}
    values = {**from_file, **given}
    recipe = values.pop("recipe", recipes.DEFAULT_RECIPE)
    if values.get("verbose") is None:
        # A progress bar redrawn with \r and ANSI codes is noise in a log file.
        values["verbose"] = "auto" if (sys.stdout.isatty() if isatty is None else isatty) else 2
    return recipe, values, print_config


def main(argv=None):
    parser = build_parser()
    check_backend(parser)
    with one_line_errors(parser):
        recipe, settings, print_config = settings_from(parser, argv)
        resolved = recipes.resolve_config(recipe, settings)
    if print_config:
        print(json_text(resolved))
        return 0
    with one_line_errors(parser):
        # A finished run (or a finished run asked for more epochs) is told before any framework loads.
        run = config.Config(resolved)
        done = resume.finished(run)
    if done is not None:
        print(resume.complete_line(done, resume.run_path(run)))
        return 0
    # A run imports TensorFlow wherever it is installed (tf.data, TensorBoard): loaded here, quietly.
    quiet_frameworks(load_tensorflow=True)
    setup_logging()
    training = import_or_fail(parser, "keras_convmixer.training")  # Keras and its backend load here
    diverged = import_or_fail(parser, "keras_convmixer.callbacks").TrainingDiverged
    peer_lost = import_or_fail(parser, "keras_convmixer.distribute").PeerLost
    with one_line_errors(parser):
        try:
            training.train(resolved)
        except diverged as err:  # not a usage error: exit 1, one line
            parser.exit(1, f"{parser.prog}: {err}\n")
        except peer_lost as err:
            # At a normal exit JAX's shutdown barrier waits for the lost process (about 100 s) and then aborts
            # with a native stack trace; the run's files are already written, so leave at once.
            sys.stderr.write(f"{parser.prog}: {err}\n")
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
