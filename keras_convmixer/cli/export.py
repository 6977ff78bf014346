"""Export a trained ConvMixer (run dir or .keras) as a SavedModel, ONNX or .keras.

By default the export is written INSIDE the run dir, to <run>/export/<format> (for a .keras file: beside it,
<dir>/export/<format>); --output writes it elsewhere. The command prints where it wrote. Every export holds an
export.json (classes, input contract, provenance).

An export is a folder of its own. A target folder that is not empty is refused (nothing is touched) unless
--overwrite is given; then it is replaced whole, once the new export is complete (a failed export leaves the old
one as it was).

    KERAS_BACKEND=jax convmixer-export runs/cifar --format savedmodel --output exported/cifar
"""

import argparse
import sys

from keras_convmixer.cli.common import one_line_errors, start


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="run dir (config.json + best.keras) or a .keras file")
    parser.add_argument("--format", required=True, choices=("savedmodel", "onnx", "keras"), dest="fmt")
    parser.add_argument("--output", help="output directory (default: <run>/export/<format>, inside the run dir)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty output folder whole (default: refuse it)"
    )
    parser.add_argument("--verbose", action="store_true", help="print what Keras exports")
    return parser


def main(argv=None):
    parser = build_parser()
    args, export = start(parser, argv, "keras_convmixer.export")
    with one_line_errors(parser, export.ExportBackendError):
        output = export.export_model(
            args.model, args.fmt, output=args.output, verbose=args.verbose, overwrite=args.overwrite
        )
    where = "" if args.output else " (inside the run dir: pass --output to write elsewhere)"
    print(f"Wrote the {args.fmt} export to {output}{where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
