"""Benchmark ConvMixer training/inference and the depthwise op, depthwise_impl "keras" vs "fast".

Prints one JSON line per measurement. Example (GPU target shapes):

    KERAS_BACKEND=jax python scripts/benchmark.py --variant convmixer_1536_20 \\
        --batch-size 64 --precision bfloat16

Tiny smoke run on CPU (the "fast" path runs in Pallas's interpreter there: not a speed figure):

    KERAS_BACKEND=jax python scripts/benchmark.py --variant convmixer_256_8 --dim 32 --depth 2 \\
        --image-size 32 --batch-size 4 --steps 3 --warmup 1
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_convmixer.benchmark import BENCH_IMPLS, PRECISIONS, model_config, run_benchmarks  # noqa: E402
from keras_convmixer.models import list_models  # noqa: E402


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="convmixer_1536_20", help=f"one of: {', '.join(list_models())}")
    parser.add_argument("--dim", type=positive_int, help="override the variant's width")
    parser.add_argument("--depth", type=positive_int, help="override the variant's depth")
    parser.add_argument("--kernel-size", type=positive_int, help="override the variant's kernel size")
    parser.add_argument("--patch-size", type=positive_int, help="override the variant's patch size")
    parser.add_argument("--image-size", type=positive_int, help="input size (default: the variant's)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="bfloat16")
    parser.add_argument("--impls", default=",".join(BENCH_IMPLS), help="comma-separated, from: keras,fast")
    parser.add_argument("--what", choices=("all", "model", "op"), default="all")
    parser.add_argument("--steps", type=positive_int, default=20, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    args = parser.parse_args(argv)

    try:
        args.config = model_config(
            args.variant, dim=args.dim, depth=args.depth, kernel_size=args.kernel_size, patch_size=args.patch_size
        )
    except ValueError as error:
        parser.error(str(error))
    args.impls = [impl.strip() for impl in args.impls.split(",") if impl.strip()]
    bad = [impl for impl in args.impls if impl not in BENCH_IMPLS]
    if bad or not args.impls:
        parser.error(f"--impls takes a comma-separated list of {', '.join(BENCH_IMPLS)}, got {bad or 'nothing'}")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    args.image_size = args.image_size or args.config["default_size"]
    if args.image_size % args.config["patch_size"]:
        parser.error(f"--image-size {args.image_size} is not a multiple of the patch size {args.config['patch_size']}")
    return args


def main(argv=None):
    args = parse_args(argv)
    for result in run_benchmarks(
        args.config,
        impls=args.impls,
        what=args.what,
        batch_size=args.batch_size,
        image_size=args.image_size,
        precision=args.precision,
        steps=args.steps,
        warmup=args.warmup,
    ):
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
