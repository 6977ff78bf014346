"""What ``model.fit`` reads: the training stream and validation data of a run, on each input path.

``prepare(cfg, strategy)`` picks the path: ``--in-memory`` arrays (``data.in_memory``), a folder or TFDS
split streamed per process (``data.stream.ShardedStream``, for JAX data parallelism with the augmentation
on the device), or a tf.data pipeline (``data.make_dataset``), augmented on the host or left to the device.
"""

import numpy as np

from keras_convmixer import augment as aug
from keras_convmixer import data
from keras_convmixer.data.in_memory import batch_stream
from keras_convmixer.tf_import import import_tf


def subset(n, size, labels, seed):
    """A seeded, stratified random subset of ``size`` of ``n`` indices, in random order."""
    if size >= n:
        return np.random.default_rng(seed).permutation(n)
    keep, _ = data.stratified_split(labels, n - size, seed)  # the "val" part is what is left out
    return np.random.default_rng(seed).permutation(keep)


def prepare(cfg, strategy="none"):
    """Return ``(train, val, fit_kwargs, source_info)`` for the host/device, tf.data/in-memory and streamed
    paths (``strategy``: the one ``distribute.make_strategy`` chose).

    Every path gives ``model.fit`` an endless training stream and a known number of steps per
    epoch, so the optimizer takes exactly ``epochs x steps`` steps and the one-cycle schedule ends
    where it should (a dataset of unknown length makes Keras count one extra step per epoch when
    it runs out). The validation split depends on ``split_seed`` only, not on the training seed.
    """
    batch = int(cfg["batch_size"])
    steps_cap = int(cfg["steps_per_epoch"] or 0)
    # Both paths split the same way, so an in-memory run validates on the images a tf.data run would.
    split = dict(val_split=cfg["val_split"], val_source=cfg["val_source"], seed=cfg["split_seed"])
    if cfg["in_memory"]:
        mem = data.load_in_memory(cfg["data"], image_size=cfg["image_size"], **split)
        x, y = mem.x_train, mem.y_train
        if cfg["num_processes"] > 1:  # each process feeds its own shard, batch_size per process
            # Equal shard lengths, so every process runs the same steps with the same batch shapes.
            per_process = len(y) // cfg["num_processes"]
            shard = slice(cfg["process_id"], per_process * cfg["num_processes"], cfg["num_processes"])
            x, y = x[shard], y[shard]
            batch //= cfg["num_processes"]
        steps = len(y) // batch
        if steps_cap:
            steps = min(steps, steps_cap)
        xv, yv = mem.x_val, mem.y_val
        if cfg["val_steps"]:
            # A random stratified subset, not a prefix: the arrays are ordered by class.
            keep = subset(len(yv), int(cfg["val_steps"]) * batch, yv, cfg["split_seed"])
            xv, yv = xv[keep], yv[keep]
        val = ({"images": xv, "labels": yv}, yv) if len(yv) else None
        unreadable = data.DecodeAudit()
        for path, reason in mem.failures.items():
            unreadable.add(path, reason)
        info = dict(
            class_names=mem.class_names, num_train=len(y), num_val=len(yv), unreadable=unreadable, steps_per_epoch=steps
        )
        # Successive shuffled passes chained (as the tf.data path's repeated shuffle), so a short epoch still draws
        # from every image; on JAX without a distribution the arrays stay on the device and each step's batch is
        # gathered there.
        stream = batch_stream(x, y, batch, cfg["seed"])
        return stream, val, dict(validation_batch_size=batch, steps_per_epoch=steps, shuffle=False), info
    if streams(cfg, strategy):
        return _streamed(cfg, batch, split, steps_cap)
    return _tf_data(cfg, batch, split, steps_cap)


def streams(cfg, strategy):
    """Whether training reads its folder or TFDS split through ``data.stream.ShardedStream``: JAX data
    parallelism (one process or several) with the augmentation on the device and the images not held in
    memory. Each process then reads only its shard, and a resumed run reads on where it stopped."""
    return (
        strategy == "data-parallel"
        and not cfg["in_memory"]
        and cfg["augment_on"] == "device"
        and data.parse_source(cfg["data"])[0] in ("folder", "tfds")
    )


def _streamed(cfg, batch, split, steps_cap):
    """``prepare`` for the streamed path: the host decodes the crop's window to a uint8 square (the rest
    of the augmentation runs batched on the device); the validation images, a whole pass on every process, are
    read by tf.data as on the other paths."""
    from keras_convmixer.data.decoding import HostCrop
    from keras_convmixer.data.stream import ShardedStream

    _need_tensorflow()
    src = data.load_source(cfg["data"], data_dir=cfg["data_dir"], download=cfg["download"], **split)
    crop = HostCrop(
        scale=tuple(cfg["crop_scale"]), ratio=tuple(cfg["crop_ratio"]), interpolation=cfg["train_interpolation"]
    )
    stream = ShardedStream(
        src.train,
        image_size=cfg["image_size"],
        global_batch=batch,
        seed=cfg["seed"],
        process_index=cfg["process_id"],
        process_count=cfg["num_processes"],
        crop=crop,
    )
    train = stream.restartable_dataset().map(lambda x, y: ({"images": x, "labels": y}, y))
    steps = min(stream.steps_per_epoch, steps_cap) if steps_cap else stream.steps_per_epoch
    # Every process validates on the whole split, in batches of its share of the global batch.
    local = dict(image_size=cfg["image_size"], batch_size=stream.local_batch, seed=cfg["seed"])
    val = _validation(cfg, src, dict(local, crop_pct=cfg["crop_pct"], interpolation=cfg["interpolation"]))
    info = _source_info(src, steps, stream=stream)
    return train, val, dict(shuffle=False, steps_per_epoch=steps), info


def _tf_data(cfg, batch, split, steps_cap):
    """``prepare`` for the tf.data path: batched datasets, augmented on the host or left to the device."""
    _need_tensorflow()
    src = data.load_source(cfg["data"], data_dir=cfg["data_dir"], download=cfg["download"], **split)
    n = src.num_classes
    common = dict(
        image_size=cfg["image_size"],
        batch_size=batch,
        seed=cfg["seed"],
        crop_pct=cfg["crop_pct"],
        interpolation=cfg["interpolation"],
    )
    image_map = aug.host_image_map(cfg)
    if cfg["augment_on"] == "host":
        train = data.make_dataset(
            src.train, training=True, image_map=image_map, batch_map=aug.host_batch_map(cfg, n), repeat=True, **common
        )
    else:
        train = data.make_dataset(src.train, training=True, image_map=image_map, repeat=True, **common)
        train = train.map(lambda x, y: ({"images": x, "labels": y}, y))
    steps = src.num_train // batch
    if steps_cap:
        steps = min(steps, steps_cap)
    val = _validation(cfg, src, common)
    info = _source_info(src, steps)
    return train, val, dict(shuffle=False, steps_per_epoch=steps), info  # tf.data shuffles itself


def _need_tensorflow():
    try:
        import_tf()
    except ImportError:
        raise ImportError(
            "The tf.data input path needs TensorFlow, which is not installed: "
            "train with --in-memory --augment-on device instead."
        ) from None


def _validation(cfg, src, common):
    """The validation dataset of a files or TFDS source (None without a validation split): one-hot labels for
    the host path, the ``{"images", "labels"}`` input of the device path; ``--val-steps`` batches of it."""
    if src.val is None:
        return None
    val = data.make_dataset(src.val, training=False, **common)
    if cfg["augment_on"] == "host":
        tf, n = import_tf(), src.num_classes
        val = val.map(lambda x, y: (x, tf.one_hot(y, n)))
    else:
        val = val.map(lambda x, y: ({"images": x, "labels": y}, y))
    return val.take(int(cfg["val_steps"])) if cfg["val_steps"] else val


def _source_info(src, steps, **more):
    return dict(
        class_names=src.class_names,
        num_train=src.num_train,
        num_val=src.num_val,
        unreadable=src.audit,
        steps_per_epoch=steps,
        **more,
    )
