"""Train a ConvMixer: a recipe (imagenet, cifar10, demo) plus flag overrides.

Examples:
  python scripts/train.py                                   # the demo recipe on sklearn digits
  python scripts/train.py --recipe cifar10 --data folder:/data/cifar10/train --val-split 5000
  KERAS_BACKEND=jax python scripts/train.py --recipe cifar10 --data folder:/data/c10 --in-memory \\
      --augment-on device
Choose the backend with KERAS_BACKEND. Re-running with the same --output-dir resumes after a kill.
"""

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

try:  # an unknown KERAS_BACKEND fails here: one line, not the import's traceback
    from keras_convmixer import training
except ImportError as err:
    sys.stderr.write(f"train.py: error: {(str(err).splitlines() or [type(err).__name__])[0]}\n")
    sys.exit(2)


def _pair(text):
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers like 0.08,1.0, got {text!r}") from None
    return [lo, hi]


def _split(text):
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1) or a whole number of images, got {text!r}")
    return int(value) if value >= 1 and value.is_integer() else value


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--recipe", default="demo", choices=sorted(training.RECIPES), help="base settings (default: demo)")
    a("--output-dir", help="run directory (default runs/<timestamp>); reuse it to resume")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="registry name (e.g. convmixer_256_8) or 'custom' with --dim/--depth/...")
    for flag in ("--dim", "--depth", "--kernel-size", "--patch-size"):
        g.add_argument(flag, type=int)
    g.add_argument("--activation")
    g.add_argument("--dropout", type=float)
    g.add_argument("--initializer", choices=["torch", "keras"],
                   help="torch (default): PyTorch's default init, as the paper's models; keras: Keras's defaults")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="digits | folder:<path> | tfds:<name>")
    g.add_argument("--data-dir", help="TFDS data directory")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=None, help="TFDS may download")
    g.add_argument("--val-split", type=_split, help="fraction (0.1) or image count (5000) held out, stratified")
    g.add_argument("--val-source", help="separate validation folder, or TFDS split name")
    g.add_argument("--split-seed", type=int,
                   help="seed of the stratified --val-split (default 0; independent of --seed, so runs with "
                        "different seeds are scored on the same images)")
    g.add_argument("--in-memory", action="store_true", default=None,
                   help="decode once to uint8 arrays (cached .npy), no tf.data; needs --augment-on device")
    g.add_argument("--image-size", type=int)
    g.add_argument("--crop-pct", type=float, help="eval: resize shorter side to size/crop_pct, centre crop")
    g.add_argument("--interpolation", choices=["bilinear", "bicubic", "nearest", "area"], help="eval resize")
    g = p.add_argument_group("optimisation")
    for flag, kind in (("--epochs", int), ("--batch-size", int), ("--lr", float), ("--weight-decay", float),
                       ("--epsilon", float), ("--clip-norm", float), ("--warmup-epochs", float), ("--seed", int)):
        g.add_argument(flag, type=kind)
    g.add_argument("--schedule", choices=["onecycle", "cosine"])
    g.add_argument("--wd-exclude-bias-bn", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--precision", choices=["auto", "float32", "mixed_float16", "mixed_bfloat16"])
    g = p.add_argument_group("augmentation")
    g.add_argument("--crop-scale", type=_pair, help="RandomResizedCrop area range, e.g. 0.08,1")
    g.add_argument("--crop-ratio", type=_pair, help="RandomResizedCrop aspect range, e.g. 0.75,1.3333")
    g.add_argument("--train-interpolation", choices=["bilinear", "bicubic", "random"])
    g.add_argument("--hflip", type=float, help="0 or 0.5")
    g.add_argument("--randaug-n", type=int, help="RandAugment ops per image (0 = off)")
    g.add_argument("--randaug-m", type=float, help="RandAugment magnitude on --randaug-scale")
    g.add_argument("--randaug-mstd", type=float, help="timm magnitude noise std (mstd)")
    g.add_argument("--randaug-scale", choices=["timm", "torchvision"],
                   help="timm: rand-m{m}-mstd{mstd}-inc1 (0-10, each op with p 0.5); "
                        "torchvision: RandAugment(n, m) with 31 bins (0-30)")
    g.add_argument("--color-jitter", type=float)
    g.add_argument("--reprob", type=float, help="random erasing probability")
    g.add_argument("--mixup", dest="mixup_alpha", type=float, help="MixUp alpha (0 = off)")
    g.add_argument("--cutmix", dest="cutmix_alpha", type=float, help="CutMix alpha (0 = off)")
    g.add_argument("--mix-prob", type=float)
    g.add_argument("--switch-prob", type=float)
    g.add_argument("--label-smoothing", "--smoothing", dest="label_smoothing", type=float)
    g.add_argument("--augment-impl", choices=["convmixer", "keras_cv"],
                   help="convmixer (default): torchvision/timm RandAugment and timm erasing; keras_cv: keras-cv 0.9's")
    g.add_argument("--augment-on", choices=["host", "device"])
    g = p.add_argument_group("scale")
    g.add_argument("--strategy", choices=list(training.STRATEGIES))
    g.add_argument("--logical-cpus", type=int, help="split the CPU into N logical devices (mirrored, testing)")
    g.add_argument("--coordinator", help="JAX multi-process: host:port of process 0")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)
    g = p.add_argument_group("run length (smoke tests)")
    g.add_argument("--steps-per-epoch", type=int)
    g.add_argument("--val-steps", type=int)
    g.add_argument("--verbose", type=int, choices=[0, 1, 2])
    return p


def main(argv=None):
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    recipe = args.pop("recipe")
    try:
        config = training.resolve_config(recipe, args)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    from keras_convmixer.cli import USER_ERRORS, fail

    try:
        training.train(config)
    except training.TrainingDiverged as err:  # not a usage error: exit 1, one line
        parser.exit(1, f"{parser.prog}: {err}\n")
    except USER_ERRORS as err:
        fail(parser, err)


if __name__ == "__main__":
    main()
