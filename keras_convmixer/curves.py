"""The training curves of a run: loss, top-1, the learning rate per step and images/s, as a PNG.

matplotlib is imported only when a figure is drawn, and through ``Figure`` rather than pyplot: no global
figure state and no GUI backend.
"""

from keras_convmixer.atomic import atomic_path
from keras_convmixer.rundir import history_value


def curves_figure(history_rows, lr_curve=None, title=None, note=None):
    """A matplotlib figure of a run: loss, top-1, the learning rate and training images/s against the epoch
    index, 0-based as history.csv, best.json and Keras's ``initial_epoch`` number epochs.

    ``lr_curve`` is ``(t, lr)`` with ``t`` on that axis (the epoch index plus the fraction of it done), one
    point per optimizer step or a sample of them (``schedules.learning_rate_curve``): drawn per step, a
    one-cycle shows its peak, which the once-an-epoch ``lr`` column of the history misses. Without it that
    column is drawn."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(12, 7.5))
    axes = fig.subplots(2, 2)
    panels = (
        ("loss", ("loss", "val_loss")),
        ("top-1 accuracy", ("top1", "val_top1")),
        ("learning rate", ("lr",)),
        ("training images/s", ("images_per_sec",)),
    )
    for ax, (name, keys) in zip(axes.flat, panels, strict=True):
        for key in keys:
            if key == "lr" and lr_curve is not None:
                ax.plot(*lr_curve, label="lr per step")
                continue
            points = [(int(r["epoch"]), history_value(r, key)) for r in history_rows]
            points = [(e, v) for e, v in points if v is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=key)
        ax.set_title(name)
        ax.set_xlabel("epoch (from 0, as history.csv)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend()
    if title:
        fig.suptitle(title)
    if note:
        fig.text(0.5, 0.01, note, ha="center", va="bottom", fontsize=8, wrap=True)
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    return fig


def plot_curves(history_rows, path, lr_curve=None, title=None, note=None):
    """Write ``curves_figure(...)`` to ``path`` as a PNG."""
    with atomic_path(path) as tmp:
        curves_figure(history_rows, lr_curve, title, note).savefig(tmp, dpi=100, format="png")
