"""Resume reconciliation: what a run directory's earlier start fixes for this invocation, and the checks that
refuse to continue it with other settings.

A run started from pretrained weights took some settings from them (``from_weights``); a resume takes those
values from the run's config.json rather than reading the weights again, and continues from the run's own
checkpoint, so it loads no weights. Keras-free.
"""

from keras_convmixer import rundir
from keras_convmixer.config import weights_spec

# Settings that may change between a run and its resumption. ``from_weights`` says which settings were left to
# the weights, not what they are: a config file that states their values is the same run.
RESUME_MAY_CHANGE = ("output_dir", "verbose", "from_weights")


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
    recorded = dict(saved, weights=weights_spec(saved.get("weights")))
    rundir.check_resumable(recorded, dict(config.as_dict(), backend=backend), RESUME_MAY_CHANGE, run_dir)
    return config, record


def check_data(saved, class_names, data, run_dir):
    """Refuse to resume on data whose classes changed since the run began."""
    if saved is not None:
        rundir.check_resumable(saved, {"class_names": list(class_names), "data": data}, (), run_dir)
