"""Top-5 class names and scores for image files or folders, as JSON.

MODEL is a run dir, a .keras file or an exported SavedModel; class names come
from the run's config.json (or the export's export.json). A SavedModel runs its
own TensorFlow graph (which can read and write files), so it is only opened with
--trust-savedmodel.

    python scripts/predict.py runs/digits photo.png more_photos/
    python scripts/predict.py exported/digits photo.png --trust-savedmodel
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="run dir, .keras file or exported SavedModel dir")
    parser.add_argument("images", nargs="+", help="image files and/or folders of images")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--output", help="write the JSON here too")
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

    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    from keras_convmixer.inference import predict

    try:
        results = predict(args.model, args.images, top_k=args.top_k, trust_savedmodel=args.trust_savedmodel)
        text = json_text(results)
        if args.output:
            with open(args.output, "w") as f:
                f.write(text + "\n")
    except USER_ERRORS as err:
        fail(parser, err)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
