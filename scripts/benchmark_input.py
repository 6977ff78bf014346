"""Host input-pipeline throughput (images/s), the model left out.

Modes:
  decode     read + decode + resize to --image-size, no cache (what every epoch costs uncached)
  augment    decode + the training helper's host augmentation (keras_convmixer.augment.host_image_map)
  eval       decode + eval transform (resize shorter side, centre crop)
  in-memory  load_in_memory: PIL decode of the whole source into uint8 arrays (cached as .npy)

Example:
  python scripts/benchmark_input.py --data folder:/tmp/cifar10/train --mode augment --max-batches 20
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = ("decode", "augment", "eval", "in-memory")


def augment_config(image_size, seed, randaug_n, randaug_m):
    """The cifar10 recipe's host augmentation (REFERENCE.md): full-image crop, flip, RandAugment n2 m12/30."""
    from keras_convmixer import augment

    return {
        "image_size": image_size,
        "seed": seed,
        "crop_scale": (1.0, 1.0),
        "crop_ratio": (1.0, 1.0),
        "train_interpolation": "bilinear",
        "augment_impl": "keras",
        "augment_on": "host",
        "hflip": 0.5,
        "randaug_n": randaug_n,
        "randaug_m": randaug_m,
        "randaug_mstd": 0.0,
        "randaug_scale": "torchvision",
        "randaug_factor": augment.randaugment_factor(randaug_m, "torchvision"),
        "color_jitter": 0.0,
        "reprob": 0.0,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="digits", help="digits | folder:<path> | tfds:<name>")
    parser.add_argument("--data-dir", default=None, help="TFDS data dir")
    parser.add_argument("--mode", choices=MODES, default="decode")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=1, help="passes over the data to time")
    parser.add_argument("--max-batches", type=int, default=None, help="stop each pass after this many batches")
    parser.add_argument("--cache", action="store_true", help="cache decoded images in RAM (default: off)")
    parser.add_argument("--cache-dir", default=None, help="in-memory mode: where the .npy cache goes")
    parser.add_argument("--workers", type=int, default=None, help="in-memory mode: decoding processes")
    parser.add_argument("--randaug-n", type=int, default=2)
    parser.add_argument("--randaug-m", type=float, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.image_size < 1 or args.batch_size < 1 or args.epochs < 1:
        parser.error("--image-size, --batch-size and --epochs must be positive")

    from keras_convmixer import data

    try:
        if args.mode == "in-memory":
            start = time.perf_counter()
            mem = data.load_in_memory(
                args.data, image_size=args.image_size, val_split=0, cache_dir=args.cache_dir, workers=args.workers
            )
            seconds = time.perf_counter() - start
            n = len(mem.y_train)
            result = {
                "mode": args.mode,
                "images": n,
                "seconds": seconds,
                "images_per_s": n / seconds,
                "skipped": mem.skipped,
                "cache": mem.cache_path,
            }
            print(json.dumps(result))
            return 0
        start = time.perf_counter()
        source = data.load_source(args.data, val_split=0, data_dir=args.data_dir)
        scan_seconds = time.perf_counter() - start
    except (ValueError, OSError) as err:
        parser.error(str(err))

    image_map = None
    if args.mode == "augment":
        from keras_convmixer import augment

        image_map = augment.host_image_map(augment_config(args.image_size, args.seed, args.randaug_n, args.randaug_m))
    dataset = data.make_dataset(
        source.train,
        image_size=args.image_size,
        batch_size=args.batch_size,
        training=args.mode != "eval",
        seed=args.seed,
        image_map=image_map,
        cache=args.cache,
    )
    for epoch in range(args.epochs):
        result = data.benchmark_dataset(dataset, max_batches=args.max_batches)
        result.update(mode=args.mode, epoch=epoch + 1, skipped=source.skipped, load_source_seconds=scan_seconds)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
