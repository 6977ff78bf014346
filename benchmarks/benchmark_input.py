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
augmentation costs on top). The host part of ``--augment-on device`` (no flip; the rest runs on the device):
``window`` decodes only the crop's window and resizes it to uint8 (``make_dataset(crop=HostCrop(...),
dtype="uint8")``); ``crop-full`` decodes whole images and crops them (``tf_random_resized_crop``);
``stream`` is ``window``'s work through ``data.stream.ShardedStream`` (one process of one); ``stream-tfds`` the
same on the folder's JPEGs written once, unchanged, as a prepared TFDS dataset (``benchmarks/tfds_folder.py``).
The reference is a ``DataLoader(num_workers=--workers)``; it needs torch, torchvision and timm.
``--sides`` may also name ``timm-loader`` (timm's ``create_loader`` with the recipe), ``timm-loader-crop``
(``create_loader`` with the crop and flip only) and ``grain`` (the host part through Grain's DataLoader with
``--workers`` workers: ``benchmarks/grain_loader.py``, needs ``pip install grain``). ``--rounds`` repeats the
runs, interleaved, so that a shared machine's load falls on every side alike; compare the ratios within a round.
``--make-folder N`` first writes an ImageNet-shaped folder of N JPEGs (about 500x375, quality 90, 10
classes) at the ``--data`` path, if it is not there.

Examples:
  KERAS_BACKEND=jax python scripts/benchmark_input.py --data folder:/tmp/cifar10/train --max-batches 12
  KERAS_BACKEND=tensorflow python scripts/benchmark_input.py --data folder:/tmp/inet1k --make-folder 1000 \
      --recipe imagenet --batch-size 64 --max-batches 12 --sides ours,timm-loader --ours-impl window --rounds 3
"""

import argparse
import json
import os
import statistics
import time

from keras_convmixer.presets import IMAGENET_MEAN, IMAGENET_STD


def benchmark_dataset(dataset, *, max_batches=None, warmup_batches=2, clock=time.perf_counter, cpu=None):
    """Iterate ``dataset`` (batches of ``(images, ...)``) with the model left out and time it with ``clock``.

    Returns ``images`` and ``seconds`` over all batches read, and ``images_per_s`` over the batches
    after ``warmup_batches`` (which pay for thread start-up and autotuning). ``cpu(iterator)``, when
    given, reads the CPU seconds the loader has used so far (all its threads and worker processes):
    ``images_per_cpu_s`` is then the steady batches' images over the CPU time spent meanwhile, which a
    shared machine's load changes far less than the wall-clock rate.
    """
    images = steady_images = 0
    start = clock()
    steady_start = start
    iterator = iter(dataset)
    cpu_start = cpu(iterator) if cpu else None
    for i, batch in enumerate(iterator):
        n = int(batch[0].shape[0])
        images += n
        if i == warmup_batches - 1:
            steady_start = clock()
            cpu_start = cpu(iterator) if cpu else None
        elif i >= warmup_batches:
            steady_images += n
        if max_batches is not None and i + 1 >= max_batches:
            break
    end = clock()
    steady_seconds = end - steady_start
    result = {
        "images": images,
        "seconds": end - start,
        "images_per_s": (steady_images / steady_seconds) if steady_images else images / max(end - start, 1e-9),
    }
    if cpu:
        result["images_per_cpu_s"] = steady_images / max(cpu(iterator) - cpu_start, 1e-9)
    return result


def process_cpu(_iterator=None):
    """This process's CPU seconds, all threads (tf.data's included)."""
    return time.process_time()


def loader_cpu(iterator):
    """CPU seconds of this process and of a DataLoader iterator's worker processes, read from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = time.process_time()
    for worker in getattr(iterator, "_workers", []):
        try:
            with open(f"/proc/{worker.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        except (OSError, IndexError, ValueError):
            pass  # a worker that has ended: its time is no longer readable
    return total


def _ours_layers(recipe, magnitude, seed):
    from keras_convmixer.augment import RandAugment, RandomErasing, from_timm_string

    if recipe == "cifar":
        return RandAugment("torchvision", num_ops=2, magnitude=magnitude, seed=seed), None
    randaug = from_timm_string("rand-m9-mstd0.5-inc1", mean=IMAGENET_MEAN, seed=seed)
    return randaug, RandomErasing(0.25, mode="pixel", mean=IMAGENET_MEAN, std=IMAGENET_STD, seed=seed)


def make_imagenet_folder(root, images=1000, classes=10, seed=0):
    """ImageNet-shaped JPEGs under ``root/<class>/``: photo-like content (smooth shapes plus fine texture),
    about 500x375 in both orientations, quality 90 (PIL's default 4:2:0 chroma), as ImageNet's files are."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = os.path.join(root, f"class_{i % classes:02d}")
        os.makedirs(folder, exist_ok=True)
        w, h = (500, int(rng.integers(333, 376))) if i % 4 else (int(rng.integers(333, 376)), 500)
        coarse = rng.integers(0, 256, (h // 24 + 2, w // 24 + 2, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.int16)
        texture = rng.normal(0, 12, ((h + 1) // 2, (w + 1) // 2, 1)).repeat(2, 0).repeat(2, 1)[:h, :w]
        pixels = np.clip(base + texture, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def host_part(args, impl):
    """The host part of ``--augment-on device``: decode and Inception crop only (see the module)."""
    from keras_convmixer import augment, data
    from keras_convmixer.data.decoding import HostCrop

    source = data.load_source(args.data, val_split=0)
    scale, ratio, interpolation = (0.08, 1.0), (3 / 4, 4 / 3), "random"
    common = dict(image_size=args.image_size, batch_size=args.batch_size, training=True, seed=args.seed, cache=False)
    if impl == "window":
        crop = HostCrop(scale, ratio, interpolation)
        dataset = data.make_dataset(source.train, crop=crop, dtype="uint8", repeat=True, **common)
    elif impl in ("stream", "stream-tfds"):
        from keras_convmixer.data.stream import ShardedStream

        if impl == "stream-tfds":  # the same files, as a prepared TFDS dataset
            from benchmarks import tfds_folder

            data_dir = tfds_folder.prepare(args.data.split(":", 1)[1])
            source = data.load_source("tfds:bench_folder_jpegs", data_dir=data_dir, val_split=0)
        crop = HostCrop(scale, ratio, interpolation)
        size = args.image_size
        stream = ShardedStream(source.train, image_size=size, global_batch=args.batch_size, seed=args.seed, crop=crop)
        dataset = stream.dataset()
    else:

        def image_map(image):
            return augment.tf_random_resized_crop(image, args.image_size, scale, ratio, interpolation)

        dataset = data.make_dataset(source.train, image_map=image_map, repeat=True, **common)
    result = benchmark_dataset(dataset, max_batches=args.max_batches, cpu=process_cpu)
    result.update(side="ours", impl=impl, backend=os.environ.get("KERAS_BACKEND", "tensorflow"))
    return result


def ours(args, impl):
    """Our tf.data pipeline through ``data.make_dataset``: returns the result dict."""
    import tensorflow as tf

    if impl in ("window", "crop-full", "stream", "stream-tfds"):
        return host_part(args, impl)
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
    result = benchmark_dataset(dataset, max_batches=args.max_batches, cpu=process_cpu)
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
    result = benchmark_dataset(loader, max_batches=args.max_batches, cpu=loader_cpu)
    result.update(side="torchvision" if args.recipe == "cifar" else "timm", workers=args.workers)
    return result


def timm_loader(args, crop_only):
    """timm's own ``create_dataset`` + ``create_loader`` (no prefetcher: it is for CUDA) on the same folder."""
    from tests.vision_reference import import_vision

    torch, _, timm = import_vision()
    from timm.data import create_dataset, create_loader

    root = args.data.split(":", 1)[1] if args.data.startswith("folder:") else args.data
    dataset = create_dataset("", root=root, is_training=True)
    recipe = {} if crop_only else dict(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel")
    torch.manual_seed(args.seed)
    loader = create_loader(
        dataset,
        input_size=(3, args.image_size, args.image_size),
        batch_size=args.batch_size,
        is_training=True,
        interpolation="random",
        color_jitter=0.0,  # timm's default 0.4 is off when RandAugment is on; off in both variants here
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_workers=args.workers,
        use_prefetcher=False,
        persistent_workers=False,
        device=torch.device("cpu"),
        **recipe,
    )
    result = benchmark_dataset(loader, max_batches=args.max_batches, cpu=loader_cpu)
    result.update(side="timm-loader-crop" if crop_only else "timm-loader", workers=args.workers)
    return result


def profile_host(args, files=300):
    """CPU milliseconds per image of each step of the host part, one image at a time in a ``tf.function``
    (one thread): where the time of ``window`` goes. Returns one result dict per step."""
    import glob

    import tensorflow as tf

    from keras_convmixer.data import decoding

    root = args.data.split(":", 1)[1] if args.data.startswith("folder:") else args.data
    contents = [tf.constant(open(f, "rb").read()) for f in sorted(glob.glob(os.path.join(root, "*", "*.jp*g")))[:files]]
    crop = decoding.HostCrop(interpolation="random")
    size = args.image_size

    def window(c, u):
        shape = tf.io.extract_jpeg_shape(c, output_type=tf.int32)
        top, left, h, w = decoding.crop_window(shape[0], shape[1], u, crop)
        return tf.io.decode_and_crop_jpeg(c, tf.stack([top, left, h, w]), channels=3)

    steps = {
        "full decode": lambda c, u: tf.io.decode_jpeg(c, channels=3),
        "window decode": window,
        "window decode + resize (ours: window)": lambda c, u: decoding.decode_crop(c, size, u, crop),
        "full decode + crop + resize": lambda c, u: decoding.crop_decoded(
            tf.io.decode_jpeg(c, channels=3), size, u, crop
        ),
        "resize of a decoded window alone": lambda w, u: decoding.resize_window(w, size, u, crop),
    }
    uniforms = [tf.random.stateless_uniform([2 * crop.attempts + 3], seed=[args.seed, i]) for i in range(len(contents))]
    windows = [window(c, u) for c, u in zip(contents, uniforms, strict=True)]
    results = []
    for name, step in steps.items():
        fn = tf.function(step, reduce_retracing=True)
        inputs = windows if name.startswith("resize") else contents
        fn(inputs[0], uniforms[0])  # trace
        start = time.process_time()
        for c, u in zip(inputs, uniforms, strict=True):
            fn(c, u)
        ms = (time.process_time() - start) / len(contents) * 1000
        results.append({"side": "profile", "step": name, "cpu_ms_per_image": round(ms, 3), "images": len(contents)})
    return results


def grain_side(args):
    """The host part through Grain's ``DataLoader`` (``benchmarks.grain_loader``), ``--workers`` workers."""
    try:
        import grain.python  # noqa: F401
    except ImportError:
        raise SystemExit("benchmark_input.py: --sides grain needs Grain (pip install grain)") from None
    from benchmarks.grain_loader import grain_loader, tree_cpu
    from tests.vision_reference import import_vision

    import_vision()  # timm's crop sampler, in the workers too
    root = args.data.split(":", 1)[1] if args.data.startswith("folder:") else args.data
    loader = grain_loader(root, args.image_size, args.batch_size, args.workers, args.seed)
    result = benchmark_dataset(loader, max_batches=args.max_batches, cpu=tree_cpu)
    result.update(side="grain", workers=args.workers)
    return result


SIDES = ("ours", "reference", "timm-loader", "timm-loader-crop", "grain", "profile")
IMPLS = ("image", "batch", "none", "window", "crop-full", "stream", "stream-tfds")


def _run(args, side, impl):
    if side == "profile":
        return profile_host(args)
    if side == "ours":
        return ours(args, impl)
    if side == "reference":
        return reference(args)
    if side == "grain":
        return grain_side(args)
    return timm_loader(args, crop_only=side == "timm-loader-crop")


def _summary(results):
    """Median images/s (wall clock and per CPU second) of each run, and each run's ratio to the first
    non-ours side in the same round."""
    names = list(dict.fromkeys(r["run"] for r in results))
    summary = {}
    for key in ("images_per_s", "images_per_cpu_s"):
        rates = {name: [r.get(key) for r in results if r["run"] == name] for name in names}
        rates = {name: v for name, v in rates.items() if None not in v}
        summary["median_" + key] = {name: round(statistics.median(v), 1) for name, v in rates.items()}
        anchor = next((name for name in rates if not name.startswith("ours")), None)
        if anchor is not None:
            summary[f"{key}_ratio_to_{anchor}"] = {
                name: [round(a / b, 3) for a, b in zip(rates[name], rates[anchor], strict=True)]
                for name in rates
                if name != anchor
            }
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="folder:/tmp/cifar10/train", help="folder:<path> of class folders")
    parser.add_argument("--recipe", choices=("cifar", "imagenet"), default="cifar")
    parser.add_argument("--image-size", type=int, default=None, help="default 32 (cifar) or 224 (imagenet)")
    parser.add_argument("--magnitude", type=int, default=12, help="cifar: torchvision magnitude (of 31 bins)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--max-batches", type=int, default=12, help="batches per side (2 are warm-up)")
    parser.add_argument("--workers", type=int, default=2, help="reference DataLoader workers")
    parser.add_argument("--ours-impl", default="image,batch", help=f"comma list of: {', '.join(IMPLS)}")
    parser.add_argument("--sides", default="ours,reference", help=f"comma list of: {', '.join(SIDES)}")
    parser.add_argument("--rounds", type=int, default=1, help="repeat all runs, interleaved")
    parser.add_argument("--make-folder", type=int, default=0, help="first write an ImageNet-shaped folder of N JPEGs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.image_size is None:
        args.image_size = 32 if args.recipe == "cifar" else 224
    if args.batch_size < 1 or args.image_size < 1 or (args.max_batches is not None and args.max_batches < 3):
        parser.error("--batch-size and --image-size must be positive and --max-batches at least 3")
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or any(s not in SIDES for s in sides):
        parser.error(f"--sides must list some of {', '.join(SIDES)}, got {args.sides!r}")
    impls = [s.strip() for s in args.ours_impl.split(",") if s.strip()]
    if "ours" in sides and (not impls or any(i not in IMPLS for i in impls)):
        parser.error(f"--ours-impl must list some of {', '.join(IMPLS)}, got {args.ours_impl!r}")
    if args.rounds < 1 or args.make_folder < 0:
        parser.error("--rounds must be positive and --make-folder not negative")
    if args.make_folder:
        root = args.data.split(":", 1)[1] if args.data.startswith("folder:") else args.data
        if not os.path.isdir(root):
            make_imagenet_folder(root, args.make_folder)
    runs = [(side, impl) for side in sides for impl in (impls if side == "ours" else [None])]
    results = []
    for round_ in range(args.rounds):
        for side, impl in runs:
            result = _run(args, side, impl)
            if side == "profile":
                for step in result:
                    print(json.dumps({**step, "round": round_}), flush=True)
                continue
            result.update(recipe=args.recipe, image_size=args.image_size, batch_size=args.batch_size, round=round_)
            result["run"] = f"ours:{impl}" if side == "ours" else side
            results.append(result)
            print(json.dumps(result), flush=True)
    if results and (args.rounds > 1 or len(runs) > 1):
        print(json.dumps({"summary": _summary(results)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
