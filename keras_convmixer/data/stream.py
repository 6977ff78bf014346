"""A streamed training input from a files split, sharded by process and resumable to the batch.

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
    ):
        if not isinstance(split, Split) or split.kind != "files":
            raise ValueError("ShardedStream streams a files split (a folder source from load_source)")
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
        if len(split) < self.global_batch:
            raise ValueError(f"the split has {len(split)} files, fewer than one global batch of {global_batch}")
        self.crop = crop if crop is not None else HostCrop(interpolation="random")
        decoding.check_crop(self.crop, training=True)
        self.epochs = None if epochs is None else _whole(epochs, "epochs", 1)
        self.local_batch = self.global_batch // self.process_count
        self.steps_per_epoch = len(split) // self.global_batch
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
        """The dataset of ``(key, (path, label))`` for this process's files from step ``first_step`` of epoch
        ``first_epoch`` on (Python ints or int64 scalars, read when an iterator is made)."""
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
        max_pixels = check_max_pixels(self.split.max_pixels)
        decode = decoding.decoder(
            max_pixels if not self.split.sizes_checked else None, self.crop, self.image_size, self.seed
        )
        failed = tf.lookup.experimental.MutableHashTable(tf.string, tf.int64, default_value=0)
        black = tf.zeros([self.image_size, self.image_size, 3], tf.uint8)

        def substitute(key, item):
            path, label = item
            with tf.control_dependencies([failed.insert(path, tf.constant(1, tf.int64))]):
                return tf.identity(black), label

        def one(key, item):
            element = tf.data.Dataset.from_tensors((key, item))
            return element.map(decode).ignore_errors().concatenate(element.map(substitute)).take(1)

        self.audit._watch(lambda: [(p.decode(), max_pixels) for p in failed.export()[0].numpy().tolist()])
        return one

    def __iter__(self):
        return StreamIterator(self)


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
