"""Host input-pipeline throughput (images/s) of our tf.data augmentation next to the PyTorch reference.

Both sides read the same image folder, decode every JPEG (no cache) and batch; the model is left out.

  --recipe cifar     decode, full-image crop, flip, RandAugment n2 m12 of 31 bins (torchvision policy)
                     vs torchvision ImageFolder + RandomResizedCrop(scale 1) + flip + RandAugment(2, 12)
  --recipe imagenet  decode, Inception crop (random interpolation), flip, rand-m9-mstd0.5-inc1 (timm
                     policy), random erasing 0.25 (pixel mode)
                     vs timm create_transform(is_training=True, auto_augment=..., re_prob=0.25)

``--ours-impl`` (a comma list, each timed in the same run): ``image`` runs RandAugment (and erasing)
per image before batching (``host_map``); ``batch`` after batching (``host_batch_map``, still one op
choice per image); ``none`` leaves RandAugment and erasing out (decode, crop and flip only: what the
augmentation costs on top).
The reference is a ``DataLoader(num_workers=--workers)``; it needs torch, torchvision and timm.

Example:
  KERAS_BACKEND=jax python scripts/benchmark_input.py --data folder:/tmp/cifar10/train --max-batches 12
"""

import argparse
import json
import os
import time

from keras_convmixer.presets import IMAGENET_MEAN, IMAGENET_STD


def benchmark_dataset(dataset, *, max_batches=None, warmup_batches=2, clock=time.perf_counter):
    """Iterate ``dataset`` (batches of ``(images, ...)``) with the model left out and time it with ``clock``.

    Returns ``images`` and ``seconds`` over all batches read, and ``images_per_s`` over the batches
    after ``warmup_batches`` (which pay for thread start-up and autotuning).
    """
    images = steady_images = 0
    start = clock()
    steady_start = start
    for i, batch in enumerate(dataset):
        n = int(batch[0].shape[0])
        images += n
        if i == warmup_batches - 1:
            steady_start = clock()
        elif i >= warmup_batches:
            steady_images += n
        if max_batches is not None and i + 1 >= max_batches:
            break
    end = clock()
    steady_seconds = end - steady_start
    return {
        "images": images,
        "seconds": end - start,
        "images_per_s": (steady_images / steady_seconds) if steady_images else images / max(end - start, 1e-9),
    }


def _ours_layers(recipe, magnitude, seed):
    from keras_convmixer.augment import RandAugment, RandomErasing, from_timm_string

    if recipe == "cifar":
        return RandAugment("torchvision", num_ops=2, magnitude=magnitude, seed=seed), None
    randaug = from_timm_string("rand-m9-mstd0.5-inc1", mean=IMAGENET_MEAN, seed=seed)
    return randaug, RandomErasing(0.25, mode="pixel", mean=IMAGENET_MEAN, std=IMAGENET_STD, seed=seed)


def ours(args, impl):
    """Our tf.data pipeline through ``data.make_dataset``: returns the result dict."""
    import tensorflow as tf

    from keras_convmixer import augment, data

    source = data.load_source(args.data, val_split=0)
    randaug, erasing = _ours_layers(args.recipe, args.magnitude, args.seed)
    if args.recipe == "cifar":
        scale, ratio, interpolation = (1.0, 1.0), (1.0, 1.0), "bilinear"
    else:
        scale, ratio, interpolation = (0.08, 1.0), (3 / 4, 4 / 3), "random"
    per_image = impl == "image"

    def image_map(image):
        image = augment.tf_random_resized_crop(image, args.image_size, scale, ratio, interpolation)
        image = tf.image.random_flip_left_right(image)
        if per_image:
            image = randaug.host_map(image)
            if erasing is not None:
                image = erasing.host_map(image)
        return image

    batch_map = None
    if impl == "batch":

        def batch_map(images, labels):
            images = randaug.host_batch_map(images)
            if erasing is not None:
                images = erasing.host_batch_map(images)
            return images, labels

    dataset = data.make_dataset(
        source.train,
        image_size=args.image_size,
        batch_size=args.batch_size,
        training=True,
        seed=args.seed,
        image_map=image_map,
        batch_map=batch_map,
        cache=False,
    )
    result = benchmark_dataset(dataset, max_batches=args.max_batches)
    result.update(side="ours", impl=impl, backend=os.environ.get("KERAS_BACKEND", "tensorflow"))
    return result


def reference(args):
    """torchvision ImageFolder + DataLoader with the recipe's transform (timm's for ImageNet)."""
    from tests.vision_reference import import_vision

    torch, torchvision, timm = import_vision()
    from torchvision import transforms as T

    if args.recipe == "cifar":
        transform = T.Compose(
            [
                T.RandomResizedCrop(args.image_size, scale=(1.0, 1.0), ratio=(1.0, 1.0)),
                T.RandomHorizontalFlip(),
                T.RandAugment(num_ops=2, magnitude=int(args.magnitude)),
                T.ToTensor(),
            ]
        )
    else:
        from PIL import Image
        from timm.data import auto_augment, create_transform

        # timm's PosterizeIncreasing keeps 0 bits at magnitude 10 (N(9, 0.5) clipped: 2.3% of draws);
        # Pillow >= 13 refuses bits=0 where older Pillow returned black. Restore the black image.
        posterize = auto_augment.NAME_TO_OP["PosterizeIncreasing"]

        def posterize_zero_bits(img, bits, **kwargs):
            return Image.new(img.mode, img.size, 0) if bits <= 0 else posterize(img, bits, **kwargs)

        auto_augment.NAME_TO_OP["PosterizeIncreasing"] = posterize_zero_bits
        transform = create_transform(
            args.image_size,
            is_training=True,
            auto_augment="rand-m9-mstd0.5-inc1",
            interpolation="random",
            re_prob=0.25,
            re_mode="pixel",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )
    root = args.data.split(":", 1)[1] if args.data.startswith("folder:") else args.data
    dataset = torchvision.datasets.ImageFolder(root, transform=transform)
    torch.manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        persistent_workers=False,
    )
    result = benchmark_dataset(loader, max_batches=args.max_batches)
    result.update(side="torchvision" if args.recipe == "cifar" else "timm", workers=args.workers)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="folder:/tmp/cifar10/train", help="folder:<path> of class folders")
    parser.add_argument("--recipe", choices=("cifar", "imagenet"), default="cifar")
    parser.add_argument("--image-size", type=int, default=None, help="default 32 (cifar) or 224 (imagenet)")
    parser.add_argument("--magnitude", type=int, default=12, help="cifar: torchvision magnitude (of 31 bins)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--max-batches", type=int, default=12, help="batches per side (2 are warm-up)")
    parser.add_argument("--workers", type=int, default=2, help="reference DataLoader workers")
    parser.add_argument("--ours-impl", default="image,batch", help="comma list of: image, batch, none")
    parser.add_argument("--sides", default="ours,reference", help="comma list of: ours, reference")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.image_size is None:
        args.image_size = 32 if args.recipe == "cifar" else 224
    if args.batch_size < 1 or args.image_size < 1 or (args.max_batches is not None and args.max_batches < 3):
        parser.error("--batch-size and --image-size must be positive and --max-batches at least 3")
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or any(s not in ("ours", "reference") for s in sides):
        parser.error(f"--sides must list 'ours' and/or 'reference', got {args.sides!r}")
    impls = [s.strip() for s in args.ours_impl.split(",") if s.strip()]
    if "ours" in sides and (not impls or any(i not in ("image", "batch", "none") for i in impls)):
        parser.error(f"--ours-impl must list 'image', 'batch' and/or 'none', got {args.ours_impl!r}")
    runs = [(side, impl) for side in sides for impl in (impls if side == "ours" else [None])]
    for side, impl in runs:
        result = ours(args, impl) if side == "ours" else reference(args)
        result.update(recipe=args.recipe, image_size=args.image_size, batch_size=args.batch_size)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
