"""Top-k class names and scores for image files or folders, as JSON.

MODEL is a run dir, a .keras file or an exported SavedModel; class names come from the .keras file's own preset
or the run's config.json (or the export's export.json). A .keras file or run dir needs no TensorFlow. A SavedModel
runs its own TensorFlow graph (which can read and write files), so it is only opened with --trust-savedmodel.

Folders are searched recursively (a folder of class sub-folders works). Images are decoded and predicted
--batch-size at a time, so memory does not grow with the folder. A file that cannot be read is left out and named
on stderr with the reason; the others are still predicted.

    convmixer-predict runs/digits photo.png more_photos/
    convmixer-predict exported/digits photo.png --trust-savedmodel
"""

import argparse
import sys

from keras_convmixer.cli.common import add_trust_savedmodel, emit_json, one_line_errors, positive_int, start

DEFAULT_BATCH_SIZE = 32  # keras_convmixer.prediction.DEFAULT_BATCH_SIZE (not imported: --help loads no Keras)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="run dir, .keras file or exported SavedModel dir")
    parser.add_argument("images", nargs="+", help="image files and/or folders of images (searched recursively)")
    parser.add_argument("--top-k", type=positive_int, default=5, help="(default: 5)")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=DEFAULT_BATCH_SIZE,
        help=f"images decoded and predicted at a time (default: {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument("--output", help="write the JSON here too")
    add_trust_savedmodel(parser)
    return parser


def main(argv=None):
    parser = build_parser()
    args, prediction = start(parser, argv, "keras_convmixer.prediction")
    with one_line_errors(parser):
        results = prediction.predict(
            args.model,
            args.images,
            top_k=args.top_k,
            batch_size=args.batch_size,
            trust_savedmodel=args.trust_savedmodel,
        )
        emit_json(results, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
