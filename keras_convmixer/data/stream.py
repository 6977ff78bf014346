"""A streamed training input from a files or TFDS split, sharded by process and resumable to the batch.

Every process computes the same order of each epoch (a stateless shuffle of the split keyed by the seed
and the epoch) and cuts it into global batches of ``global_batch`` files; process ``p`` of ``P`` reads
only the ``p``-th ``global_batch / P`` files of each global batch, so each reads only its own shard and
no process holds the data set in memory. Each file's crop (``decoding.HostCrop``) is keyed by its slot
in the epoch's global order, so the pixels of a global batch do not depend on how many processes read
it: P processes together read exactly the batches one process would.

The position is three numbers, ``StreamState(epoch, step, seed)``, ``step`` being the global batches
already read in ``epoch``; ``ShardedStream.dataset(state)`` starts there without reading anything
before it. Every epoch has ``len(split) // global_batch`` steps on every process (the remainder of the
order is left out, a different part each epoch); a file that fails to decode gives a black image in its
slot, so that no process runs short of a batch that the others' step waits for, and is named in the
split's ``DecodeAudit``. All processes must see the same files at the same paths and run the same
TensorFlow (the shuffle is TensorFlow's stateless one).

A TFDS split (TFRecord files, which have no random access) is sharded as TFDS shards for JAX processes:
process ``p`` reads only the ``p``-th of ``P`` equal contiguous parts of the split (``tfds.even_splits``),
so ``P`` processes do not read the batches one process would. Each epoch reads its part's files in an
order keyed by the seed and the epoch, 16 files interleaved, permuted in blocks of ``shuffle_buffer``
records (stateless, keyed by the seed, the epoch and the block; a block is held in memory as encoded
records), and decodes only the crop's window of each image. The state is the same three numbers; a
resumed run skips the records of the epoch's steps already read (read, not decoded).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from keras_convmixer.data import decoding
from keras_convmixer.data.decoding import HostCrop
from keras_convmixer.data.folders import DecodeAudit
from keras_convmixer.data.sources import Split
from keras_convmixer.data.transforms import check_max_pixels
from keras_convmixer.tf_import import import_tf


def _whole(value, name, low=0):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class StreamState:
    """Where a stream is: ``step`` global batches of ``epoch`` read, with the order of ``seed``."""

    epoch: int = 0
    step: int = 0
    seed: int = 0

    def __post_init__(self):
        for name in ("epoch", "step", "seed"):
            object.__setattr__(self, name, _whole(getattr(self, name), f"stream state {name}"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, value) -> StreamState:
        """The state ``to_dict`` wrote (as read back from JSON)."""
        keys = {"epoch", "step", "seed"}
        if not isinstance(value, dict) or set(value) != keys:
            raise ValueError(f"a stream state is a dict with the keys epoch, step and seed, got {value!r}")
        return cls(**value)


class ShardedStream:
    """Training batches of a files split for process ``process_index`` of ``process_count``.

    Each batch is ``(uint8 [global_batch / process_count, image_size, image_size, 3], int32 labels)``:
    this process's part of a global batch, cropped by ``crop`` (default: timm's ImageNet
    ``RandomResizedCrop``, random interpolation). ``epochs=None`` streams without end.
    ``shuffle_buffer``: a TFDS split's records are shuffled in blocks of this many, read from its files in a
    random order, 16 at a time (a folder's order is one permutation of all its files).
    """

    def __init__(
        self,
        split: Split,
        *,
        image_size: int,
        global_batch: int,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        crop: HostCrop | None = None,
        epochs: int | None = None,
        audit: DecodeAudit | None = None,
        shuffle_buffer: int = 4096,
    ):
        if not isinstance(split, Split) or split.kind not in ("files", "tfds"):
            raise ValueError("ShardedStream streams a files or TFDS split (a folder or tfds: source from load_source)")
        self.split = split
        self.image_size = _whole(image_size, "image_size", 1)
        self.global_batch = _whole(global_batch, "global_batch", 1)
        self.seed = _whole(seed, "seed")
        self.process_count = _whole(process_count, "process_count", 1)
        self.process_index = _whole(process_index, "process_index")
        if self.process_index >= self.process_count:
            raise ValueError(f"process_index {process_index} is not below process_count {process_count}")
        if self.global_batch % self.process_count:
            raise ValueError(f"global batch {global_batch} does not split evenly over {process_count} processes")
        self.shuffle_buffer = _whole(shuffle_buffer, "shuffle_buffer", 1)
        # A TFDS process reads its own part: the epoch is as long as the parts' equal share of it.
        self._records = _tfds_records(split, self.process_index, self.process_count) if split.kind == "tfds" else None
        per_epoch = len(split) if self._records is None else self._records.per_process * self.process_count
        if per_epoch < self.global_batch:
            raise ValueError(f"the split has {len(split)} images, fewer than one global batch of {global_batch}")
        self.crop = crop if crop is not None else HostCrop(interpolation="random")
        decoding.check_crop(self.crop, training=True)
        self.epochs = None if epochs is None else _whole(epochs, "epochs", 1)
        self.local_batch = self.global_batch // self.process_count
        self.steps_per_epoch = per_epoch // self.global_batch
        self.audit = audit if audit is not None else split.audit if split.audit is not None else DecodeAudit()
        self._start = None

    def state_at(self, step: int) -> StreamState:
        """The state after ``step`` global batches from the start (e.g. the optimizer's iterations)."""
        step = _whole(step, "step")
        return StreamState(step // self.steps_per_epoch, step % self.steps_per_epoch, self.seed)

    def _check_state(self, state):
        state = StreamState(seed=self.seed) if state is None else state
        if not isinstance(state, StreamState):
            raise ValueError(f"state must be a StreamState, got {type(state).__name__}")
        if state.seed != self.seed:
            raise ValueError(f"the stream state was saved with seed {state.seed}, this stream's seed is {self.seed}")
        if state.step >= self.steps_per_epoch:
            raise ValueError(f"stream state step {state.step} is past the epoch's {self.steps_per_epoch} steps")
        if self.epochs is not None and state.epoch >= self.epochs:
            raise ValueError(f"stream state epoch {state.epoch} is past the stream's {self.epochs} epochs")
        return state

    def _slots(self, first_epoch, first_step):
        """The dataset of ``(key, (path, label))`` (a TFDS split: ``(key, (record id, encoded image, label))``)
        for this process's images from step ``first_step`` of epoch ``first_epoch`` on (Python ints or int64
        scalars, read when an iterator is made)."""
        if self._records is not None:
            return self._tfds_slots(first_epoch, first_step)
        tf = import_tf()
        n, g, local = len(self.split), self.global_batch, self.local_batch
        paths = tf.constant([str(p) for p in self.split.paths])
        labels = tf.constant(self.split.labels.astype(np.int32))
        offsets = tf.range(local, dtype=tf.int64) + self.process_index * local
        first_epoch = tf.cast(first_epoch, tf.int64)
        first_step = tf.cast(first_step, tf.int64)

        def epoch_slots(epoch):
            first = tf.where(tf.equal(epoch, first_epoch), first_step, tf.constant(0, tf.int64))
            steps = tf.range(first, self.steps_per_epoch, dtype=tf.int64)
            slots = tf.reshape(steps[:, None] * g + offsets[None, :], [-1])
            order = tf.random.experimental.stateless_shuffle(
                tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(self.seed, tf.int64), epoch])
            )
            files = tf.gather(order, slots)
            keys = epoch * (self.steps_per_epoch * g) + slots  # the slot in the whole stream: the crop's key
            return tf.data.Dataset.from_tensor_slices((keys, (tf.gather(paths, files), tf.gather(labels, files))))

        stop = self.epochs if self.epochs is not None else np.iinfo(np.int64).max
        return tf.data.Dataset.range(first_epoch, stop).flat_map(epoch_slots)

    def _tfds_slots(self, first_epoch, first_step):
        tf = import_tf()
        records, g, local, steps = self._records, self.global_batch, self.local_batch, self.steps_per_epoch
        files = tf.constant(records.files)
        skips = tf.constant(records.skips, tf.int64)
        takes = tf.constant(records.takes, tf.int64)
        offsets = tf.range(local, dtype=tf.int64) + self.process_index * local
        first_epoch = tf.cast(first_epoch, tf.int64)
        first_step = tf.cast(first_step, tf.int64)
        parse = records.parse

        def read(file, skip, take):
            def named(i, record):
                return tf.strings.join([file, "[", tf.strings.as_string(i), "]"]), record

            return tf.data.TFRecordDataset(file).skip(skip).take(take).enumerate(skip).map(named)

        def epoch_slots(epoch):
            key = tf.stack([tf.constant(self.seed, tf.int64), epoch])
            order = tf.random.experimental.stateless_shuffle(tf.range(len(records.files), dtype=tf.int64), seed=key)
            instructions = tf.data.Dataset.from_tensor_slices(
                (tf.gather(files, order), tf.gather(skips, order), tf.gather(takes, order))
            )
            first = tf.where(tf.equal(epoch, first_epoch), first_step, tf.constant(0, tf.int64))

            # Stateless, as the folder's order: tf.data's own shuffle, seeded per epoch, gave orders whose first
            # elements repeated from one seed to the next (measured), so each block is permuted here.
            def permuted(block_index, block):
                block_key = tf.random.experimental.stateless_fold_in(key, block_index)
                order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(block[0])[0]), seed=block_key)
                return tf.data.Dataset.from_tensor_slices(tuple(tf.gather(part, order) for part in block))

            named = (
                instructions.interleave(read, cycle_length=16, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                .batch(self.shuffle_buffer)
                .enumerate()
                .flat_map(permuted)
                .skip(first * local)  # records, not yet parsed or decoded
                .take((steps - first) * local)
            )
            slots = tf.reshape(tf.range(first, steps, dtype=tf.int64)[:, None] * g + offsets[None, :], [-1])
            keys = tf.data.Dataset.from_tensor_slices(epoch * (steps * g) + slots)
            return tf.data.Dataset.zip(keys, named).map(
                lambda k, r: (k, (r[0], *parse(r[1]))), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
            )

        stop = self.epochs if self.epochs is not None else np.iinfo(np.int64).max
        return tf.data.Dataset.range(first_epoch, stop).flat_map(epoch_slots)

    def dataset(self, state: StreamState | None = None):
        """The ``tf.data.Dataset`` of this process's batches from ``state`` (default: the start) on."""
        state = self._check_state(state)
        return self._batched(self._slots(state.epoch, state.step))

    def restartable_dataset(self):
        """The dataset of this process's batches from the state last given to ``start_at`` (default: the start),
        read each time an iterator is made: ``model.fit`` makes its iterator after the callbacks'
        ``on_train_begin``, where a resumed run learns how far it got."""
        tf = import_tf()
        if self._start is None:
            self._start = tf.Variable([0, 0], dtype=tf.int64, trainable=False, name="stream_start")
        start = self._start
        return self._batched(tf.data.Dataset.from_tensors(0).flat_map(lambda _: self._slots(start[0], start[1])))

    def start_at(self, state: StreamState) -> None:
        """Make ``restartable_dataset``'s next iterator begin at ``state``."""
        state = self._check_state(state)
        if self._start is None:
            self.restartable_dataset()
        self._start.assign([state.epoch, state.step])

    def _batched(self, slots):
        tf = import_tf()
        ds = slots.interleave(
            self._decode_or_black(),
            cycle_length=tf.data.AUTOTUNE,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        ds = ds.batch(self.local_batch, drop_remainder=True)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF  # sharded here
        return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

    def _decode_or_black(self):
        """``(key, (path, label)) -> dataset of one (crop, label)``: the decoded crop, or a black image when the
        file fails to decode (its index noted for the audit)."""
        tf = import_tf()
        if self._records is None:
            max_pixels = check_max_pixels(self.split.max_pixels)
            decode = decoding.decoder(
                max_pixels if not self.split.sizes_checked else None, self.crop, self.image_size, self.seed
            )
        else:  # the TFDS record's encoded image, already read
            max_pixels = None

            def decode(key, item):
                _, contents, label = item
                uniforms = decoding.draws(self.crop, self.seed, key)
                return decoding.decode_crop(contents, self.image_size, uniforms, self.crop), label

        failed = tf.lookup.experimental.MutableHashTable(tf.string, tf.int64, default_value=0)
        black = tf.zeros([self.image_size, self.image_size, 3], tf.uint8)

        def substitute(key, item):
            name, label = item[0], item[-1]
            with tf.control_dependencies([failed.insert(name, tf.constant(1, tf.int64))]):
                return tf.identity(black), label

        def one(key, item):
            element = tf.data.Dataset.from_tensors((key, item))
            return element.map(decode).ignore_errors().concatenate(element.map(substitute)).take(1)

        self.audit._watch(lambda: [(p.decode(), max_pixels) for p in failed.export()[0].numpy().tolist()])
        return one

    def __iter__(self):
        return StreamIterator(self)


@dataclasses.dataclass(frozen=True)
class _TfdsRecords:
    """This process's part of a TFDS split: its TFRecord file ranges and the parse of one record."""

    files: list
    skips: list
    takes: list
    per_process: int
    parse: object  # serialized record -> (encoded image, int32 label)


def _tfds_records(split: Split, process_index: int, process_count: int) -> _TfdsRecords:
    import tensorflow_datasets as tfds

    tf = import_tf()
    builder = tfds.builder(split.tfds_name, data_dir=split.data_dir)
    info = builder.info
    if str(info.file_format.value) != "tfrecord":
        raise ValueError(
            f"TFDS dataset {split.tfds_name!r} is stored as {info.file_format.value}: "
            "the stream reads TFRecord files: prepare it with file_format='tfrecord', or train one process with "
            "--augment-on host"
        )
    part = tfds.even_splits(split.tfds_split, n=process_count, drop_remainder=True)[process_index]
    instructions = [i for i in info.splits[part].file_instructions if i.take != 0]
    takes = [i.take if i.take > 0 else i.examples_in_shard - i.skip for i in instructions]
    image_key, label_key = info.supervised_keys[:2]
    features = info.features

    def parse(serialized):
        example = features.deserialize_example(serialized, decoders={image_key: tfds.decode.SkipDecoding()})
        return example[image_key], tf.cast(example[label_key], tf.int32)

    return _TfdsRecords([i.filename for i in instructions], [i.skip for i in instructions], takes, sum(takes), parse)


class StreamIterator:
    """An iterator over a ``ShardedStream``'s batches that knows its position: ``get_state`` is the state of
    the next batch, which a new stream given it (``set_state`` or ``StreamIterator(stream, state)``) yields."""

    def __init__(self, stream: ShardedStream, state: StreamState | None = None):
        self.stream = stream
        self.set_state(state)

    def set_state(self, state: StreamState | None) -> None:
        self._state = self.stream._check_state(state)
        self._batches = iter(self.stream.dataset(self._state))

    def get_state(self) -> StreamState:
        return self._state

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._batches)
        epoch, step = self._state.epoch, self._state.step + 1
        if step == self.stream.steps_per_epoch:
            epoch, step = epoch + 1, 0
        self._state = StreamState(epoch, step, self._state.seed)
        return batch
