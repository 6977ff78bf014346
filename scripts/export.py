"""Export a trained ConvMixer (run dir or .keras) as a SavedModel, ONNX or .keras.

    KERAS_BACKEND=jax python scripts/export.py runs/cifar --format savedmodel --output exported/cifar
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="run dir (config.json + best.keras) or a .keras file")
    parser.add_argument("--format", required=True, choices=("savedmodel", "onnx", "keras"), dest="fmt")
    parser.add_argument("--output", help="output directory (default: <run>/export/<format>)")
    parser.add_argument("--verbose", action="store_true", help="print what Keras exports")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from keras_convmixer import export
        from keras_convmixer.cli import USER_ERRORS, fail
    except ImportError as err:  # an unknown KERAS_BACKEND, a missing package: one line, not a traceback
        parser.exit(2, f"{parser.prog}: error: {(str(err).splitlines() or [type(err).__name__])[0]}\n")

    try:
        output = export.export_model(args.model, args.fmt, output=args.output, verbose=args.verbose)
    except (*USER_ERRORS, export.ExportBackendError) as err:
        fail(parser, err)
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
