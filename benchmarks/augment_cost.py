"""What the device augmentation costs inside the train step: a step with it over the same step without.

Both models are the training's own ``AugmentedClassifier`` around the same ConvMixer, compiled with the
recipe's AdamW; one holds the recipe's ``DeviceAugment`` (crop, flip, RandAugment, as ``--in-memory
--augment-on device`` builds it), the other a ``DeviceAugment`` with every random layer off (only the
cast). Both train from ``data.in_memory.batch_stream`` through ``model.fit``, in one process,
alternating short fits so that a busy machine slows both alike; the first fit of each compiles and is
not counted. The augmentation alone (its jitted forward on one batch) is timed too.

  KERAS_BACKEND=jax python benchmarks/augment_cost.py                      # ConvMixer-256/8, batch 512
  KERAS_BACKEND=jax python benchmarks/augment_cost.py --dim 128 --depth 4 --patch-size 4 --out cost.json

``--augment-only`` times only the augmentation, per image: e.g. the ImageNet recipe's, on the 224² uint8
squares the streamed input's host crop delivers (``--host-cropped``: no crop on the device, as training
builds it for a folder stream), with its MixUp/CutMix timed beside it:

  KERAS_BACKEND=jax python benchmarks/augment_cost.py --recipe imagenet --image-size 224 --batch-size 64 \
      --augment-only --host-cropped
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(cfg, augmented, crop=True):
    import keras

    from keras_convmixer import augment as aug
    from keras_convmixer.models import ConvMixer
    from keras_convmixer.training import AugmentedClassifier

    off = dict(cfg, hflip=0.0, randaug_n=0, reprob=0.0, color_jitter=0.0)
    augment = aug.DeviceAugment(cfg if augmented else off, crop=augmented and crop, name="device_augment")
    mix = aug.make_batch_mix(cfg, 10, host=False)
    classifier = ConvMixer(**cfg["model_kwargs"], classes=10, name="convmixer")
    model = AugmentedClassifier(classifier, augment, mix, 10)
    size = cfg["image_size"]
    model({"images": np.zeros((1, size, size, 3), "uint8"), "labels": np.zeros((1,), "int32")})
    if keras.backend.backend() == "jax":
        # As training does: Keras's RandomFlip declares supports_jit=False, which would run the whole
        # step unjitted; it traces under jax.jit.
        for layer in model._flatten_layers(include_self=True, recursive=True):
            layer.supports_jit = True
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=float(cfg["weight_decay"])),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.CategoricalAccuracy(name="top1")],
    )
    return model, augment


def time_augment_alone(augment, batch, repeats, labels=None):
    """Median seconds of ``augment``'s jitted forward on ``batch`` (with ``labels``: a batch mix's)."""
    import keras

    x = keras.ops.convert_to_tensor(batch)
    state = [v.value for v in augment.non_trainable_variables]

    def run(state, x):
        if labels is not None:
            return augment.stateless_call([], state, x, keras.ops.convert_to_tensor(labels))[0][0]
        return augment.stateless_call([], state, x, training=True)[0]

    if keras.backend.backend() == "jax":
        import jax

        run = jax.jit(run)
    keras.ops.convert_to_numpy(run(state, x))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        keras.ops.convert_to_numpy(run(state, x))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--kernel-size", type=int, default=5)
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="steps per timed fit")
    p.add_argument("--repeats", type=int, default=3, help="timed fits per model, alternating")
    p.add_argument("--out", default=None, help="JSON file for the figures")
    p.add_argument("--recipe", default="cifar10", help="the recipe whose augmentation is timed")
    p.add_argument("--image-size", type=int, default=None, help="default: the recipe's")
    p.add_argument("--augment-only", action="store_true", help="time the augmentation alone, per image")
    p.add_argument("--host-cropped", action="store_true", help="no crop on the device (the host cropped)")
    args = p.parse_args(argv)

    import keras

    from keras_convmixer.data.in_memory import batch_stream, stream_placement
    from keras_convmixer.recipes import resolve_config

    size = dict(image_size=args.image_size) if args.image_size else {}
    cfg = resolve_config(
        args.recipe,
        dict(
            size,
            model="custom",
            dim=args.dim,
            depth=args.depth,
            kernel_size=args.kernel_size,
            patch_size=args.patch_size,
            batch_size=args.batch_size,
            output_dir="unused",
            in_memory=not args.host_cropped,
            augment_on="device",
        ),
    )
    keras.utils.set_random_seed(0)
    # float32 only: on a CPU without bfloat16 units, mixed bfloat16 is emulated and tells nothing of a GPU.
    keras.mixed_precision.set_global_policy("float32")
    rng = np.random.default_rng(0)
    n = 4 * args.batch_size
    side = cfg["image_size"] if args.host_cropped else 32 if args.recipe == "cifar10" else 256
    images = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype("int32")
    if args.augment_only:
        return _augment_only(cfg, args, images, labels)
    models = {}
    for name, augmented in (("with", True), ("without", False)):
        model, augment = build(cfg, augmented)
        models[name] = (model, augment, batch_stream(images, labels, args.batch_size, seed=1))
    per_step = {name: [] for name in models}
    compile_s = {}
    for name, (model, _, stream) in models.items():
        t0 = time.perf_counter()
        model.fit(stream, steps_per_epoch=1, epochs=1, shuffle=False, verbose=0)
        compile_s[name] = round(time.perf_counter() - t0, 2)
        print(f"{name} augmentation: first step (compiles) {compile_s[name]:.1f} s", flush=True)
    for r in range(args.repeats):
        for name, (model, _, stream) in models.items():
            t0 = time.perf_counter()
            model.fit(stream, steps_per_epoch=args.steps, epochs=1, shuffle=False, verbose=0)
            per_step[name].append((time.perf_counter() - t0) / args.steps)
            print(f"repeat {r}: {name} augmentation {per_step[name][-1]:.3f} s/step", flush=True)
    augment_alone = time_augment_alone(models["with"][1], images[: args.batch_size], args.repeats)
    med = {name: statistics.median(v) for name, v in per_step.items()}
    result = dict(
        backend=keras.backend.backend(),
        model=f"ConvMixer-{args.dim}/{args.depth} k{args.kernel_size} p{args.patch_size}",
        batch_size=args.batch_size,
        precision="float32",
        stream=stream_placement(images),
        steps_per_fit=args.steps,
        repeats=args.repeats,
        step_s_with=round(med["with"], 4),
        step_s_without=round(med["without"], 4),
        ratio=round(med["with"] / med["without"], 4),
        augment_alone_s=round(augment_alone, 4),
        augment_alone_share_of_step=round(augment_alone / med["with"], 4),
        steps_with=[round(v, 4) for v in per_step["with"]],
        steps_without=[round(v, 4) for v in per_step["without"]],
        first_step_s=compile_s,
    )
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _augment_only(cfg, args, images, labels):
    from keras_convmixer import augment as aug

    augment = aug.DeviceAugment(cfg, crop=not args.host_cropped, name="device_augment")
    augment.build(images[: args.batch_size].shape)
    mix = aug.make_batch_mix(cfg, 10, host=False)
    batch, one_hot = images[: args.batch_size], labels[: args.batch_size]
    augment_s = time_augment_alone(augment, batch, args.repeats)
    mixed = np.asarray(augment(batch.astype("float32"), training=True))
    mix(mixed, one_hot)  # builds it
    mix_s = time_augment_alone(mix, mixed, args.repeats, labels=one_hot)
    result = dict(
        recipe=args.recipe,
        image_size=cfg["image_size"],
        input_side=int(images.shape[1]),
        device_crop=not args.host_cropped,
        batch_size=args.batch_size,
        repeats=args.repeats,
        randaug=f"n{cfg['randaug_n']} m{cfg['randaug_m']}",
        augment_s_per_batch=round(augment_s, 4),
        augment_ms_per_image=round(1000 * augment_s / args.batch_size, 3),
        mix_s_per_batch=round(mix_s, 4),
        mix_ms_per_image=round(1000 * mix_s / args.batch_size, 3),
    )
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
