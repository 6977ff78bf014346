"""Top-1 / top-5 accuracy and loss of a model on a data split, as a JSON report.

MODEL is a run dir, a .keras file or an exported SavedModel. The data source,
val_split and seed default to the run's config (so --split val is the run's
own validation split). A SavedModel runs its own TensorFlow graph (which can
read and write files), so it is only opened with --trust-savedmodel.

    python scripts/evaluate.py runs/digits --split val --report runs/digits/eval.json
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="run dir, .keras file or exported SavedModel dir")
    parser.add_argument("--data", help="digits | folder:<path> | tfds:<name> (default: the run's)")
    parser.add_argument("--split", choices=("val", "train"), default="val")
    parser.add_argument("--val-split", type=float, help="validation fraction (default: the run's)")
    parser.add_argument("--val-source", help="separate validation folder / TFDS split name")
    parser.add_argument("--seed", type=int, help="split seed (default: the run's)")
    parser.add_argument("--data-dir", help="TFDS data dir")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--report", help="write the JSON report here too")
    parser.add_argument("--trust-savedmodel", action="store_true",
                        help="allow MODEL to be a SavedModel: it runs its own TensorFlow graph, which can read and "
                        "write files, so pass this only for SavedModels you exported yourself or trust")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from keras_convmixer.cli import USER_ERRORS, fail, json_text
    except ImportError as err:  # an unknown KERAS_BACKEND, a missing package: one line, not a traceback
        parser.exit(2, f"{parser.prog}: error: {(str(err).splitlines() or [type(err).__name__])[0]}\n")

    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    from keras_convmixer.inference import evaluate

    try:
        report = evaluate(
            args.model, args.data, split=args.split, val_split=args.val_split, val_source=args.val_source,
            seed=args.seed, batch_size=args.batch_size, data_dir=args.data_dir,
            trust_savedmodel=args.trust_savedmodel,
        )
        text = json_text(report)
        if args.report:
            with open(args.report, "w") as f:
                f.write(text + "\n")
    except USER_ERRORS as err:
        fail(parser, err)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
