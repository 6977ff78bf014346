"""Top-1 / top-5 accuracy, loss, per-class accuracy and a confusion matrix of a model on a data split, as JSON.

MODEL is a run dir, a .keras file or an exported SavedModel. The data source, val_split and seed default to the
run's config (so --split val is the run's own validation split). The JSON report goes to stdout (and to --output);
progress goes to stderr. A SavedModel runs its own TensorFlow graph (which can read and write files), so it is
only opened with --trust-savedmodel.

    convmixer-evaluate runs/digits --split val --output runs/digits/eval.json   # + runs/digits/eval_confusion.png
    convmixer-evaluate runs/digits --data folder:/data/test        # a held-out folder: every image in it
"""

import argparse
import os
import sys

from keras_convmixer.cli.common import add_trust_savedmodel, emit_json, one_line_errors, positive_int, start


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="run dir, .keras file or exported SavedModel dir")
    parser.add_argument("--data", help="digits | folder:<path> | tfds:<name> (default: the run's)")
    parser.add_argument(
        "--split",
        choices=("val", "train", "all"),
        help="val: the run's validation images; train: its training images; all: every image of --data, none "
        "held out (default: all for a --data other than the run's given without --val-split/--val-source, "
        "e.g. a held-out test folder; else val)",
    )
    parser.add_argument("--val-split", type=float, help="validation fraction (default: the run's)")
    parser.add_argument("--val-source", help="separate validation folder / TFDS split name")
    parser.add_argument("--seed", type=int, help="split seed (default: the run's)")
    parser.add_argument("--data-dir", help="TFDS data dir")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="(default: 64)")
    parser.add_argument("--output", "--report", dest="output", help="write the JSON report here too")
    parser.add_argument(
        "--confusion-png",
        help="draw the confusion matrix here (default: beside --output, "
        "as <output name>_confusion.png; none without --output)",
    )
    add_trust_savedmodel(parser)
    return parser


def confusion_png_path(output, confusion_png):
    """``--confusion-png``, else ``<output without extension>_confusion.png``, else None."""
    if confusion_png:
        return confusion_png
    return f"{os.path.splitext(output)[0]}_confusion.png" if output else None


def main(argv=None):
    parser = build_parser()
    args, evaluation = start(parser, argv, "keras_convmixer.evaluation")
    png = confusion_png_path(args.output, args.confusion_png)
    with one_line_errors(parser):
        report = evaluation.evaluate(
            args.model,
            args.data,
            split=args.split,
            val_split=args.val_split,
            val_source=args.val_source,
            seed=args.seed,
            batch_size=args.batch_size,
            data_dir=args.data_dir,
            trust_savedmodel=args.trust_savedmodel,
        )
        if png:
            evaluation.plot_confusion(
                report["confusion_matrix"]["counts"],
                report["class_names"],
                png,
                title=f"{os.path.basename(report['model'])} on the {report['split']} split: top-1 {report['top1']:.2%}",
            )
            report["confusion_png"] = os.path.abspath(png)
        emit_json(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
