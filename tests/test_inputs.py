"""What model.fit reads (keras_convmixer.inputs): the in-memory stream's order and its validation subset."""

import keras
import numpy as np

from keras_convmixer import data, inputs, recipes


def test_in_memory_subset_is_stratified_and_random():
    labels = np.repeat(np.arange(4), 50)  # ordered by class, as in-memory arrays are
    keep = inputs.subset(len(labels), 40, labels, seed=0)
    assert len(keep) == len(set(keep)) == 40
    assert np.bincount(labels[keep], minlength=4).tolist() == [10, 10, 10, 10]
    assert not np.array_equal(keep, np.sort(keep))  # shuffled, not in class order


def test_the_in_memory_stream_training_feeds_is_the_seeded_chain_of_shuffled_passes():
    # What the in-memory path hands model.fit: seeded permutations of the training images chained and cut into
    # batches (a short epoch continues the pass), written out here with NumPy; on JAX the batches are gathered
    # on the device (data.in_memory.batch_stream), in the same order as the host's.
    cfg = recipes.resolve_config(
        "demo", dict(in_memory=True, augment_on="device", batch_size=32, seed=3, output_dir="unused", verbose=0)
    )
    stream, _, fit_kwargs, info = inputs.prepare(cfg)
    mem = data.load_in_memory(
        "digits", image_size=cfg["image_size"], val_split=cfg["val_split"], seed=cfg["split_seed"]
    )
    n = len(mem.y_train)
    assert info["num_train"] == n and fit_kwargs["steps_per_epoch"] == n // 32
    rng = np.random.default_rng(3)
    order = np.concatenate([rng.permutation(n) for _ in range(3)])
    steps = 2 * n // 32 + 3  # two passes and into the third; each pass ends inside a batch
    drawn = [next(stream) for _ in range(steps)]
    if keras.backend.backend() == "jax":
        import jax

        assert isinstance(drawn[0][0]["images"], jax.Array)  # gathered on the device
    for k, (x, y) in enumerate(drawn):
        index = order[32 * k : 32 * (k + 1)]
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(x["images"]), mem.x_train[index])
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(x["labels"]), mem.y_train[index])
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(y), mem.y_train[index])
