"""The sharded, resumable folder and TFDS stream (keras_convmixer.data.stream) on every backend."""

import json

import numpy as np
import pytest

from keras_convmixer import data
from keras_convmixer.data.stream import ShardedStream, StreamIterator, StreamState
from tests.data_images import encoded, one_line

tf = pytest.importorskip("tensorflow")

N_FILES = 26  # 3 global batches of 8 per epoch, and 2 files left over (a different 2 each epoch)


def grey(i):
    return 10 + 9 * i  # each file's one grey level: a crop of it has that level everywhere


def id_folder(tmp_path, damaged=()):
    """``N_FILES`` constant-grey PNGs in two classes; file ``i``'s pixels are all ``grey(i)``."""
    root = tmp_path / "ids"
    for i in range(N_FILES):
        folder = root / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        contents = encoded(np.full((12, 16, 3), grey(i), np.uint8), "PNG")
        (folder / f"{i:02d}.png").write_bytes(contents[: len(contents) // 2] if i in damaged else contents)
    return data.load_source(f"folder:{root}", val_split=0).train


def ids(batch):
    images, labels = (np.asarray(t) for t in batch)
    assert (images == images[:, :1, :1, :1]).all()  # each image is its file's constant grey
    found = (images[:, 0, 0, 0].astype(int) - 10) // 9
    np.testing.assert_array_equal(labels, found % 2)  # and carries its file's label
    return found.tolist()


def take(stream, n, state=None):
    return [(x.numpy(), y.numpy()) for x, y in stream.dataset(state).take(n)]


def stream(split, **kwargs):
    return ShardedStream(split, image_size=8, global_batch=8, seed=3, **kwargs)


def test_two_shards_are_disjoint_and_cover_each_epoch(tmp_path):
    split = id_folder(tmp_path)
    shards = [stream(split, process_index=p, process_count=2) for p in (0, 1)]
    assert shards[0].steps_per_epoch == 3 and shards[0].local_batch == 4
    epochs = []
    for epoch in range(2):
        read = [[i for b in take(s, 3, StreamState(epoch, 0, 3)) for i in ids(b)] for s in shards]
        assert all(len(r) == 12 for r in read)
        assert not set(read[0]) & set(read[1])  # disjoint
        assert len(set(read[0]) | set(read[1])) == 24  # all but the epoch's 2 left-over files, each once
        epochs.append(read)
    assert epochs[0] != epochs[1]  # each epoch its own order


def test_the_global_batch_is_the_processes_parts_in_order(tmp_path):
    split = id_folder(tmp_path)
    whole = take(stream(split), 7)  # two epochs and a step: across the epoch boundary
    parts = [take(stream(split, process_index=p, process_count=2), 7) for p in (0, 1)]
    for k, (x, y) in enumerate(whole):
        assert x.shape == (8, 8, 8, 3) and x.dtype == np.uint8 and y.dtype == np.int32
        assert parts[0][k][0].shape == (4, 8, 8, 3)
        assert ids(parts[0][k]) + ids(parts[1][k]) == ids((x, y))
    # The pixels too, on random crops of noise: each file's crop is keyed by its slot in the global order,
    # not by the process that reads it.
    photos = crops_of_a_photo_folder(tmp_path)
    whole = take(stream(photos), 3)
    parts = [take(stream(photos, process_index=p, process_count=2), 3) for p in (0, 1)]
    for k, (x, y) in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([parts[0][k][0], parts[1][k][0]]), x)
        np.testing.assert_array_equal(np.concatenate([parts[0][k][1], parts[1][k][1]]), y)


def crops_of_a_photo_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    for i in range(16):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
        (root / f"c{i % 2}" / f"{i}.jpg").write_bytes(encoded(image, "JPEG"))
    return data.load_source(f"folder:{root}", val_split=0).train


@pytest.mark.parametrize("source", ["folder", "tfds"])
@pytest.mark.parametrize("process_count", [1, 2])
def test_a_saved_state_resumes_with_the_batches_an_uninterrupted_run_reads_next(
    tmp_path, request, source, process_count
):
    # Random crops of noise: a wrong crop or order cannot pass. 16 files (4 steps an epoch) or 12 TFDS images (3).
    split = crops_of_a_photo_folder(tmp_path) if source == "folder" else request.getfixturevalue("tfds_noise")
    for p in range(process_count):

        def make(p=p):
            return ShardedStream(
                split, image_size=8, global_batch=4, seed=5, process_index=p, process_count=process_count
            )

        iterator = StreamIterator(make())
        uninterrupted = [tuple(t.numpy() for t in next(iterator)) for _ in range(8)]
        for stop in (2, 3, 4) if process_count == 1 else (4,):  # inside an epoch, and at or after its end
            first = StreamIterator(make())
            for _ in range(stop):
                next(first)
            saved = json.loads(json.dumps(first.get_state().to_dict()))  # as a backup holds it
            state = StreamState.from_dict(saved)
            assert state == make().state_at(stop)
            resumed = StreamIterator(make(), state)
            for want in uninterrupted[stop:]:
                got = next(resumed)
                np.testing.assert_array_equal(got[0].numpy(), want[0])
                np.testing.assert_array_equal(got[1].numpy(), want[1])


def test_the_restartable_dataset_starts_where_start_at_last_said_when_its_iterator_is_made(tmp_path):
    split = id_folder(tmp_path)
    whole = [ids(b) for b in take(stream(split), 7)]  # 3 steps an epoch: into the third epoch
    s = stream(split)
    ds = s.restartable_dataset()  # made before the start is known, as model.fit is given it
    assert [ids(b) for b in ds.take(2)] == whole[:2]
    s.start_at(s.state_at(4))
    assert [ids(b) for b in ds.take(3)] == whole[4:7]  # the next iterator reads the new start
    s.start_at(StreamState(0, 1, 3))
    assert ids(next(iter(ds))) == whole[1]
    with pytest.raises(ValueError, match="seed 9"):
        s.start_at(StreamState(0, 0, 9))


def test_a_file_that_fails_to_decode_is_black_and_named(tmp_path):
    split = id_folder(tmp_path, damaged=(4, 11))  # cut after a valid header: the scan cannot tell
    shard = ShardedStream(split, image_size=8, global_batch=13, epochs=1)  # every file, in 2 steps
    batches = take(shard, 10)
    assert len(batches) == 2  # the epoch keeps its steps and its batch size
    images = np.concatenate([x for x, _ in batches])
    assert images.shape == (26, 8, 8, 3)
    black = (images == 0).all(axis=(1, 2, 3))
    damaged = sorted(str(p) for p in split.paths if p.endswith(("04.png", "11.png")))
    assert sorted(shard.audit.failures) == damaged and all(shard.audit.failures.values())
    assert black.sum() == 2 and sorted(ids((images[~black], np.concatenate([y for _, y in batches])[~black]))) == [
        i for i in range(N_FILES) if i not in (4, 11)
    ]


def test_stream_arguments_and_states_are_checked(tmp_path):
    split = id_folder(tmp_path)
    cases = [
        (dict(process_count=3), "split evenly"),
        (dict(process_index=2, process_count=2), "below process_count"),
        (dict(global_batch=64), "fewer than one global batch"),
        (dict(crop="inception"), "HostCrop"),
        (dict(seed=-1), "seed"),
    ]
    for change, name in cases:
        with pytest.raises(ValueError) as excinfo:
            ShardedStream(split, **(dict(image_size=8, global_batch=8) | change))
        assert name in one_line(excinfo), change
    with pytest.raises(ValueError) as excinfo:
        ShardedStream(data.load_source("digits", val_split=0).train, image_size=8, global_batch=8)
    assert "files or TFDS split" in one_line(excinfo)
    s = stream(split, epochs=2)
    for state, name in [
        (StreamState(0, 0, 4), "seed 4"),
        (StreamState(0, 3, 3), "past the epoch"),
        (StreamState(2, 0, 3), "past the stream"),
    ]:
        with pytest.raises(ValueError) as excinfo:
            s.dataset(state)
        assert name in one_line(excinfo), state
    for bad in ({"epoch": 1}, {"epoch": 0, "step": -1, "seed": 0}, [0, 0, 0]):
        with pytest.raises(ValueError) as excinfo:
            StreamState.from_dict(bad)
        one_line(excinfo)


# ----------------------------------------------------------------------------- TFDS


@pytest.fixture(scope="module")
def tfds_ids(tmp_path_factory):
    """``tests.tfds_tiny``'s 26 constant-grey images (image ``i`` all ``grey(i)``, class ``i % 2``), prepared
    locally; TFDS wrote them in its own shuffled order, so a part's ids are not a range."""
    pytest.importorskip("tensorflow_datasets")
    from tests import tfds_tiny  # registers the builder

    assert tfds_tiny.grey(5) == grey(5)
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    return data.load_source("tfds:tiny_convmixer_ids", data_dir=data_dir, download=True, val_split=0).train


@pytest.fixture(scope="module")
def tfds_noise(tmp_path_factory):
    """``tests.tfds_tiny``'s 12 noise images (grey, 6 to 8 x 8): a wrong crop or order changes the pixels."""
    pytest.importorskip("tensorflow_datasets")
    from tests import tfds_tiny  # noqa: F401 (registers the builder)

    data_dir = str(tmp_path_factory.mktemp("tfds_noise"))
    return data.load_source("tfds:tiny_convmixer_images", data_dir=data_dir, download=True, val_split=0).train


def test_tfds_processes_read_their_own_part_and_each_epoch_covers_it_in_a_new_order(tfds_ids):
    one = stream(tfds_ids)
    assert one.steps_per_epoch == 3
    for epoch in range(2):  # one process: 24 of the 26 images an epoch, each once
        read = [i for b in take(one, 3, StreamState(epoch, 0, 3)) for i in ids(b)]
        assert len(set(read)) == 24
    parts = [stream(tfds_ids, process_index=p, process_count=2) for p in (0, 1)]
    assert parts[0].steps_per_epoch == 3 and parts[0].local_batch == 4
    seen, orders = [set(), set()], []
    for epoch in range(3):
        read = [[i for b in take(s, 3, StreamState(epoch, 0, 3)) for i in ids(b)] for s in parts]
        assert all(len(set(r)) == 12 for r in read)  # 12 different images a process an epoch
        assert not set(read[0]) & set(read[1])
        for p in (0, 1):
            seen[p] |= set(read[p])
        orders.append(read)
    # Each process keeps to its own half (13 of the 26: 12 of them an epoch), and the halves cover the split.
    assert not seen[0] & seen[1] and all(len(s) == 13 for s in seen)
    assert orders[0][0] != orders[1][0] and orders[1][0] != orders[2][0]
    # The first batches of two epochs share no more than chance would: an order, not a rotation of one.
    assert len(set(orders[0][0][:4]) & set(orders[1][0][:4])) < 4
