"""Resume reconciliation: what a run directory's earlier start fixes for this invocation, and the checks that
refuse to continue it with other settings.

A run started from pretrained weights took some settings from them (``from_weights``); a resume takes those
values from the run's config.json rather than reading the weights again, and continues from the run's own
checkpoint, so it loads no weights. A run that has trained all its epochs is told apart here too, so that the
command line can say so before any framework loads. Keras-free.
"""

import os

from keras_convmixer import rundir
from keras_convmixer.atomic import read_json
from keras_convmixer.config import weights_spec

# Settings that may change between a run and its resumption. ``from_weights`` says which settings were left to
# the weights, not what they are: a config file that states their values is the same run.
# A resumed multi-process run may meet on another coordinator address (a restarted job gets new hosts or ports).
RESUME_MAY_CHANGE = ("output_dir", "verbose", "from_weights", "coordinator")


def reconcile(config, saved, run_dir, backend, starting):
    """``(config, weights record)`` for a run whose directory holds ``saved`` (its config.json, or None).

    ``starting`` says whether this invocation starts the run (no epoch committed yet): only then are the
    weights loaded, and the record of them is made anew; otherwise the record is the run's own. Raises a
    one-line ValueError when ``config`` is not the run ``saved`` began."""
    if saved is None:
        return config, None
    # Another --weights is another run, named first (the settings that follow the weights differ too).
    rundir.check_resumable({"weights": weights_spec(saved.get("weights"))}, {"weights": config.weights}, (), run_dir)
    record = None
    if config.weights:
        # What the weights' metadata set when the run began (no need to read the weights again).
        followed = set(config.from_weights) & set(saved.get("from_weights") or ())
        if followed:
            config = config.replace(**{key: saved[key] for key in followed})
        if not starting and isinstance(saved.get("weights"), dict):
            record = dict(saved["weights"])
    if "lr_breakpoints" not in saved:
        # Begun before the setting existed, on the official whole-epoch breakpoints: it continues on them.
        config = config.replace(lr_breakpoints="official")
    recorded = dict(saved, weights=weights_spec(saved.get("weights")))
    rundir.check_resumable(recorded, dict(config.as_dict(), backend=backend), RESUME_MAY_CHANGE, run_dir)
    return config, record


def check_data(saved, class_names, data, run_dir):
    """Refuse to resume on data whose classes changed since the run began."""
    if saved is not None:
        rundir.check_resumable(saved, {"class_names": list(class_names), "data": data}, (), run_dir)


def count(n, noun, plural=None):
    """``1 epoch``, ``2 epochs``; ``plural`` where it is not ``noun + "s"`` (``classes``)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def run_path(config):
    """The directory this process trains into: process 0 owns ``output_dir``; process *i* of a multi-process run
    writes under ``process_<i>`` (on a shared filesystem they would overwrite each other's checkpoints)."""
    if config.process_id:
        return os.path.join(config.output_dir, f"process_{config.process_id}")
    return config.output_dir


def _new_dir(path):
    """``<path>-finetune``, or the first ``-finetune-N`` that does not exist yet."""
    candidate, n = f"{path}-finetune", 1
    while os.path.lexists(candidate):
        n += 1
        candidate = f"{path}-finetune-{n}"
    return candidate


def finished(config):
    """The metrics.json of the run in ``config``'s run directory when that run has trained all its epochs (re-running
    it has nothing left to do), else None. Raises a one-line ValueError when ``config`` asks that run for more
    epochs (its learning-rate schedule has ended: the message says how to fine-tune from it) or has other
    settings. Reads only; a directory that does not exist yet is no finished run."""
    run = rundir.RunDir(run_path(config)).check()
    saved = run.read_config()
    if saved is None or not os.path.isfile(run / rundir.METRICS):
        return None
    done = len(run.history())
    if done < int(saved.get("epochs") or 0):
        return None
    if int(config.epochs) > done:
        raise ValueError(
            f"{run.path} is complete after {count(done, 'epoch')} and its learning-rate schedule has ended, so it "
            f"cannot go on to {config.epochs}: fine-tune from it in a new run instead, by adding "
            f"--weights {run.path} --output-dir {_new_dir(run.path)} to this command"
        )
    reconcile(config, saved, run.path, None, starting=False)
    return read_json(run / rundir.METRICS)


def complete_line(metrics, run_dir):
    """What re-running a finished run says instead of training: that it is complete, its score and where it is."""
    run_dir = os.path.abspath(run_dir)
    if metrics.get("val_top1") is not None:
        score = f"val top-1 {metrics['val_top1']:.2%}"
    elif metrics.get("train_top1") is not None:
        score = f"train top-1 {metrics['train_top1']:.2%} (no validation)"
    else:
        score = "no score recorded"
    return (
        f"Run {run_dir} is complete: {count(int(metrics.get('epochs') or 0), 'epoch')} trained, {score}; nothing "
        "left to train (its best.keras, metrics.json and curves.png are there; pass a new --output-dir to train "
        "another run)."
    )
