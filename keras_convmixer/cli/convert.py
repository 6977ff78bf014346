"""Convert a timm (model.safetensors) or official (.pth.tar) ConvMixer checkpoint to Keras.

Writes OUTPUT/model.weights.h5 (for e.g. ``ConvMixer1536_20(weights=...)``), OUTPUT/model.keras (logits) and
OUTPUT/config.json, so OUTPUT works as a run dir for convmixer-export, -evaluate and -predict.

    convmixer-convert model.safetensors --output converted/convmixer_768_32

The architecture is read off the tensor shapes, but the activation is not in the weights: it is the matching
variant's (ReLU for the released 768/32, GELU otherwise). Weights trained with another one, e.g. a 768/32 from
the paper's GELU code, need --activation. The summary printed at the end says what was chosen.
"""

import argparse
import sys

from keras_convmixer.cli.common import one_line_errors, positive_int, start


def _stats(text):
    """argparse type for --mean/--std: three comma-separated fractions of 1 (a zero std is left to the converter)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 3 comma-separated numbers such as 0.5,0.5,0.5, got {text!r}"
        ) from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected 3 comma-separated numbers (R,G,B), got {len(values)} in {text!r}")
    if not all(0.0 <= v <= 1.0 for v in values):
        hint = " (fractions of 1 as timm writes them, not 0-255)" if any(abs(v) > 1 for v in values) else ""
        raise argparse.ArgumentTypeError(f"expected numbers in [0, 1]{hint}, got {text!r}")
    return values


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="model.safetensors (timm) or .pth/.pth.tar (official; needs torch)")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--variant", help="expected variant, e.g. convmixer_768_32 (checked against the shapes)")
    parser.add_argument(
        "--activation",
        choices=("gelu", "relu"),
        help="the activation the weights were trained with (default: the matching variant's, else gelu)",
    )
    parser.add_argument(
        "--image-size",
        type=positive_int,
        help="model input size (default: the variant's, 32 for the CIFAR shapes, else 224)",
    )
    parser.add_argument(
        "--mean",
        type=_stats,
        help="normalisation mean R,G,B as fractions of 1, like timm (default: the variant's, e.g. ImageNet's)",
    )
    parser.add_argument("--std", type=_stats, help="normalisation std R,G,B as fractions of 1 (default: the variant's)")
    parser.add_argument(
        "--use-ema",
        action="store_true",
        help="take a training checkpoint's EMA weights (state_dict_ema) instead of its state_dict, as timm's "
        "use_ema=True",
    )
    parser.add_argument(
        "--class-names",
        help="text file with one class name per line (default: ImageNet-1k's for 1000 classes, else class_0 ...)",
    )
    return parser


def _numbers(values):
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def summary(config, output, image_size_given=False):
    """The lines printed after a conversion: what was read and every choice made around it."""
    kwargs, how = config["model_kwargs"], config["conversion"]
    activation = kwargs["activation"]
    if how["activation_from"] == "given":
        activation_note = "given with --activation"
    elif how["activation_from"] == "variant":
        other = "gelu" if activation == "relu" else "relu"
        activation_note = (
            f"inferred from the variant {config['model']}; weights trained with {other.upper()} need "
            f"--activation {other}"
        )
    else:
        activation_note = "the default for a shape that matches no variant; check it, or pass --activation"
    if image_size_given:
        size_note = "--image-size"
    else:
        size_note = "the variant's default" if config["model"] != "custom" else "the default for an unnamed shape"
    norm_note = "--mean/--std" if how["normalization_from"] == "given" else "the variant's preset"
    weights_note = how["weights_from"]
    if how["ema_in_file"] and not how["use_ema"]:
        weights_note += f" (the file also holds EMA weights {how['ema_in_file']!r}: --use-ema takes them)"
    return [
        f"{config['model']}: dim {kwargs['dim']}, depth {kwargs['depth']}, kernel {kwargs['kernel_size']}, "
        f"patch {kwargs['patch_size']}, {activation}, {kwargs['classes']} classes -> {output}",
        f"  ACTIVATION   {activation.upper()} ({activation_note})",
        f"  image size   {config['image_size']} ({size_note})",
        f"  mean / std   {_numbers(config['mean'])} / {_numbers(config['std'])} ({norm_note})",
        f"  eval         crop_pct {config['crop_pct']}, {config['interpolation']} resize",
        f"  weights      {weights_note}",
        f"  class names  {how['class_names_from']}",
    ]


def main(argv=None):
    parser = build_parser()
    args, conversion = start(parser, argv, "keras_convmixer.conversion")
    with one_line_errors(parser):
        class_names = None
        if args.class_names:
            with open(args.class_names) as f:
                class_names = [line.strip() for line in f if line.strip()]
        config = conversion.convert_checkpoint(
            args.checkpoint,
            args.output,
            variant=args.variant,
            activation=args.activation,
            image_size=args.image_size,
            mean=args.mean,
            std=args.std,
            use_ema=args.use_ema,
            class_names=class_names,
        )
    print("\n".join(summary(config, args.output, image_size_given=args.image_size is not None)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
