"""Convert a timm (model.safetensors) or official (.pth.tar) ConvMixer checkpoint to Keras.

Writes OUTPUT/model.weights.h5 (for e.g. ``ConvMixer1536_20(weights=...)``), OUTPUT/model.keras (logits) and
OUTPUT/config.json, so OUTPUT works as a run dir for convmixer-export, -evaluate and -predict.

    convmixer-convert model.safetensors --output converted/convmixer_768_32
"""

import argparse
import sys

from keras_convmixer.cli.common import one_line_errors, positive_int, start


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="model.safetensors (timm) or .pth/.pth.tar (official; needs torch)")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--variant", help="expected variant, e.g. convmixer_768_32 (checked against the shapes)")
    parser.add_argument(
        "--activation",
        choices=("gelu", "relu"),
        help="override the activation (default: the matching variant's, else gelu)",
    )
    parser.add_argument("--image-size", type=positive_int, default=224, help="model input size (default: 224)")
    parser.add_argument("--class-names", help="text file with one class name per line (default: class_0 ...)")
    return parser


def main(argv=None):
    parser = build_parser()
    args, convert = start(parser, argv, "keras_convmixer.convert")
    with one_line_errors(parser):
        class_names = None
        if args.class_names:
            with open(args.class_names) as f:
                class_names = [line.strip() for line in f if line.strip()]
        config = convert.convert_checkpoint(
            args.checkpoint,
            args.output,
            variant=args.variant,
            activation=args.activation,
            image_size=args.image_size,
            class_names=class_names,
        )
    kwargs = config["model_kwargs"]
    print(
        f"{config['model']}: dim {kwargs['dim']}, depth {kwargs['depth']}, kernel {kwargs['kernel_size']}, "
        f"patch {kwargs['patch_size']}, {kwargs['activation']}, {kwargs['classes']} classes -> {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
