"""Strategies, precision and JAX multi-process training, through the train command."""

import json
import os
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from keras_convmixer import distribute, recipes
from tests.helpers import ROOT, TINY_FLAGS, cli_flags, run_script

BACKEND = keras.backend.backend()


def test_precision_policy_is_set_and_named(monkeypatch):
    previous = keras.mixed_precision.global_policy()
    try:
        for precision in ("mixed_bfloat16", "float32"):
            assert distribute.set_precision({"precision": precision}) == precision
            assert keras.mixed_precision.global_policy().name == precision
        # auto: bfloat16 compute only where an accelerator makes it pay (the device query stubbed both ways:
        # what is under test here is the policy it picks).
        for found, policy in ((True, "mixed_bfloat16"), (False, "float32")):
            monkeypatch.setattr(distribute, "has_accelerator", lambda found=found: found)
            assert distribute.set_precision({"precision": "auto"}) == policy
            assert keras.mixed_precision.global_policy().name == policy
    finally:
        keras.mixed_precision.set_global_policy(previous)


@pytest.mark.skipif(
    any(os.path.exists(d) for d in ("/dev/nvidia0", "/dev/accel0")), reason="this machine has a GPU or TPU device"
)
def test_a_machine_without_gpu_or_tpu_devices_has_no_accelerator():
    assert distribute.has_accelerator() is False


def test_no_strategy_is_one_replica():
    cfg = recipes.resolve_config("demo", {"strategy": "none", "output_dir": "unused"})
    scope, name, replicas = distribute.make_strategy(cfg)
    assert (name, replicas) == ("none", 1)
    with scope:
        variable = keras.Variable(np.ones(3, "float32"))
        total = keras.ops.sum(variable * 2.0)
    # Nothing distributes it: no Keras distribution is set, and (TensorFlow) no tf.distribute strategy holds it.
    assert keras.distribution.distribution() is None
    assert float(keras.ops.convert_to_numpy(total)) == 6.0
    if BACKEND == "tensorflow":
        import tensorflow as tf

        assert not tf.distribute.has_strategy()
        assert tf.distribute.get_strategy().num_replicas_in_sync == 1


@pytest.mark.skipif(BACKEND != "tensorflow", reason="MirroredStrategy is TensorFlow's")
def test_mirrored_on_two_logical_cpus(tmp_path):
    run = tmp_path / "run"
    flags = cli_flags(output_dir=run, strategy="mirrored", logical_cpus=2, epochs=1, steps_per_epoch=6)
    proc = run_script(["scripts/train.py", *flags, *TINY_FLAGS])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "strategy mirrored (2 replicas)" in proc.stdout
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution multi-process runs on JAX")
def test_jax_two_processes_data_parallel(tmp_path):
    port = _free_port()
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "scripts/train.py",
                *cli_flags(
                    output_dir=tmp_path / "run",
                    strategy="data-parallel",
                    num_processes=2,
                    process_id=i,
                    coordinator=f"127.0.0.1:{port}",
                    in_memory=True,
                    augment_on="device",
                    epochs=1,
                    steps_per_epoch=5,
                    val_steps=2,
                ),
                *TINY_FLAGS,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
        assert "strategy data-parallel (2 replicas)" in out
    # One data-parallel model: both processes end with identical weights.
    # Both share one --output-dir (as on a shared filesystem); process 1 keeps its files apart.
    run = tmp_path / "run"
    w0, w1 = (
        keras.saving.load_model(path).get_weights() for path in (run / "last.keras", run / "process_1" / "last.keras")
    )
    for a, b in zip(w0, w1, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _photo_folder(root):
    """Three classes of 140 small JPEGs (each class bright in its own channel): 23 batches of 16 an epoch."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(140):
            small = rng.integers(0, 256, (8, 7, 3), dtype=np.uint8)
            small[..., c] = 200
            Image.fromarray(small).resize((20, 24), Image.BICUBIC).save(root / f"class{c}" / f"{i:03d}.jpg", quality=90)
    return f"folder:{root}"


def _processes(run, logs, n, port=None, **settings):
    """The demo recipe's training run of the tiny model with JAX data parallelism, as ``n`` processes on
    127.0.0.1 (each writing its output to ``logs/process_<i>.{out,err}``)."""
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "PYTHONPATH": ROOT,
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    procs, port = [], port or _free_port()
    for i in range(n):
        flags = dict(strategy="data-parallel", augment_on="device", **settings)
        if n > 1:
            flags.update(num_processes=n, process_id=i, coordinator=f"127.0.0.1:{port}")
        procs.append(
            subprocess.Popen(
                [sys.executable, "scripts/train.py", *TINY_FLAGS, *cli_flags(output_dir=run, **flags)],  # last wins
                cwd=ROOT,
                env=env,
                stdout=open(logs / f"process_{i}.out", "w"),
                stderr=open(logs / f"process_{i}.err", "w"),
            )
        )
    return procs


def _weights(path):
    return keras.saving.load_model(path).get_weights()


def _wait(procs, logs, rc=0, timeout=400):
    for i, p in enumerate(procs):
        assert p.wait(timeout=timeout) == rc, (logs / f"process_{i}.err").read_text()[-2000:]


def _kill_after_first_epoch(procs, run, logs, victim):
    """Kill ``procs[victim]`` (SIGKILL) once ``run``'s history has its first epoch; returns the time of the kill."""
    deadline = time.monotonic() + 300
    history = run / "history.csv"
    while not (history.exists() and len(history.read_text().splitlines()) >= 2):  # header + epoch 0
        assert time.monotonic() < deadline, (logs / "process_0.err").read_text()[-2000:]
        assert all(p.poll() is None for p in procs), (logs / "process_0.err").read_text()[-2000:]
        time.sleep(0.05)
    procs[victim].kill()
    return time.monotonic()


# Batch 16 over 2 processes: 8 images each per step; 2 epochs x 23 steps, a validation batch each epoch.
STREAMED = dict(epochs=2, batch_size=16, val_steps=1)


@pytest.fixture(scope="module")
def streamed_runs(tmp_path_factory):
    """Uninterrupted streamed runs of one and of two processes on the same folder, trained side by side."""
    if BACKEND != "jax":
        pytest.skip("keras.distribution multi-process runs on JAX")
    root = tmp_path_factory.mktemp("streamed")
    folder = _photo_folder(root / "photos")
    (root / "one").mkdir()
    (root / "two").mkdir()
    one = _processes(root / "one" / "run", root / "one", 1, data=folder, **STREAMED)
    two = _processes(root / "two" / "run", root / "two", 2, data=folder, **STREAMED)
    _wait(one, root / "one")
    _wait(two, root / "two")
    return root, folder


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution multi-process runs on JAX")
def test_two_processes_stream_a_folder_and_train_the_weights_one_process_does_on_the_same_global_batches(
    streamed_runs,
):
    root, _ = streamed_runs
    for i in range(2):
        out = (root / "two" / f"process_{i}.out").read_text()
        assert "2 epochs x 23 steps, batch 16, strategy data-parallel (2 replicas)" in out, out[-2000:]
        assert "augment on device, streamed: 8 images of each batch per process" in out
    assert (
        "2 epochs x 23 steps, batch 16, strategy data-parallel (1 replica)"
        in (root / "one" / "process_0.out").read_text()
    )
    run = root / "two" / "run"
    w0, w1 = _weights(run / "last.keras"), _weights(run / "process_1" / "last.keras")
    single = _weights(root / "one" / "run" / "last.keras")
    # Each process read its half of every global batch of 16 (8 files, disjoint, together the one process's 16):
    # a shard that overlapped the other's, or missed files, would train other weights.
    for a, b, c in zip(w0, w1, single, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)
    state = json.loads((run / "backup" / "epoch-0002.stream.json").read_text())
    assert state == {"epoch": 2, "step": 0, "seed": 0}  # where the stream stood after 2 x 23 global batches


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution multi-process runs on JAX")
def test_a_resumed_one_process_stream_reads_the_batches_the_uninterrupted_run_read(streamed_runs, tmp_path):
    root, folder = streamed_runs
    run = tmp_path / "run"
    procs = _processes(run, tmp_path, 1, data=folder, **STREAMED)
    _kill_after_first_epoch(procs, run, tmp_path, victim=0)
    procs[0].wait(timeout=60)
    assert len((run / "history.csv").read_text().splitlines()) == 2, "the kill came after the run had finished"
    _wait(_processes(run, tmp_path, 1, data=folder, **STREAMED), tmp_path)
    # Same pixels, same order, same augmentation draws: the weights are the uninterrupted run's, bit for bit.
    for a, b in zip(_weights(run / "last.keras"), _weights(root / "one" / "run" / "last.keras"), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution multi-process runs on JAX")
def test_a_killed_process_ends_the_other_with_one_line_and_the_same_command_reads_on(streamed_runs, tmp_path):
    root, folder = streamed_runs
    run = tmp_path / "run"
    procs = _processes(run, tmp_path, 2, port=_free_port(), data=folder, **STREAMED)
    killed = _kill_after_first_epoch(procs, run, tmp_path, victim=1)
    procs[0].wait(timeout=120)
    waited = time.monotonic() - killed
    err = (tmp_path / "process_0.err").read_text()
    assert procs[0].returncode == 1, err[-2000:]
    assert waited < 60, waited  # JAX's own shutdown waits ~100 s for the lost process, then aborts
    assert "Traceback" not in err and "Check failure" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("train.py: process 1 of this 2-process run stopped, so process 0 stops too"), last
    assert len((run / "history.csv").read_text().splitlines()) == 2  # the finished epoch is kept

    _wait(_processes(run, tmp_path, 2, port=_free_port(), data=folder, **STREAMED), tmp_path)  # a new port
    assert [row.split(",")[0] for row in (run / "history.csv").read_text().splitlines()[1:]] == ["0", "1"]
    for a, b in zip(_weights(run / "last.keras"), _weights(root / "two" / "run" / "last.keras"), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # the batches the uninterrupted run read


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution multi-process runs on JAX")
def test_a_killed_coordinator_ends_the_other_process_with_one_line(streamed_runs, tmp_path):
    _, folder = streamed_runs
    run = tmp_path / "run"
    procs = _processes(run, tmp_path, 2, data=folder, **STREAMED)
    killed = _kill_after_first_epoch(procs, run, tmp_path, victim=0)  # process 0 also runs the coordinator
    procs[1].wait(timeout=120)
    waited = time.monotonic() - killed
    err = (tmp_path / "process_1.err").read_text()
    assert procs[1].returncode == 1, err[-2000:]
    assert waited < 60, waited
    assert "Traceback" not in err and "Check failure" not in err, err[-2000:]
    # Two watchers race here: our handler of the failed step, and JAX's coordination client, whose poll thread
    # ends the process (exit 1, no stack) once the coordinator is gone. Either way the user is told.
    ours = "train.py: process 0 of this 2-process run stopped, so process 1 stops too"
    jax_own = "Terminating process because the JAX distributed service detected fatal errors"
    assert ours in err or jax_own in err, err[-2000:]


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution multi-process runs on JAX")
def test_two_processes_stream_a_tfds_split_without_holding_it_in_memory(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from keras_convmixer import data
    from tests import tfds_tiny  # noqa: F401 (registers the builder; the runs read the prepared files)

    data_dir = str(tmp_path / "tfds")
    data.load_source("tfds:tiny_convmixer_ids", data_dir=data_dir, download=True)
    run = tmp_path / "run"
    # 26 images, 3 held out: 23 to train, 11 in each process's part, so 5 global batches of 4 an epoch.
    tfds_run = dict(data="tfds:tiny_convmixer_ids", data_dir=data_dir, val_split=3, epochs=2, batch_size=4)
    _wait(_processes(run, tmp_path, 2, val_steps=1, **tfds_run), tmp_path)
    for i in range(2):
        out = (tmp_path / f"process_{i}.out").read_text()
        assert "2 epochs x 5 steps, batch 4, strategy data-parallel (2 replicas)" in out, out[-2000:]
        assert "augment on device, streamed: 2 images of each batch per process" in out
    for a, b in zip(_weights(run / "last.keras"), _weights(run / "process_1" / "last.keras"), strict=True):
        np.testing.assert_array_equal(a, b)
    assert json.loads((run / "backup" / "epoch-0002.stream.json").read_text()) == {"epoch": 2, "step": 0, "seed": 0}


def test_only_a_lost_peer_of_a_multi_process_run_is_named_as_one():
    class JaxRuntimeError(RuntimeError):  # the type's name is what JAX raises; its text is what gloo says
        pass

    lost = JaxRuntimeError("UNKNOWN: Gloo all-reduce failed: Read error: Connection reset by peer")
    three = dict(num_processes=3, process_id=2)
    assert str(distribute.peer_lost(lost, three)).startswith(
        "another process of this 3-process run stopped, so process 2 stops too"
    )
    assert str(distribute.peer_lost(lost, dict(num_processes=2, process_id=1))).startswith("process 0 of this")
    # A device_put onto a global sharding checks its input across processes and raises ValueError.
    gather = ValueError("UNKNOWN: Gloo AllGather failed: [pair.cc:538] Read error: Connection reset by peer")
    assert distribute.peer_lost(gather, three) is not None
    try:
        try:
            raise lost
        except JaxRuntimeError as inner:
            raise KeyError("step") from inner
    except KeyError as outer:
        assert distribute.peer_lost(outer, three) is not None  # found where it came from
    assert distribute.peer_lost(JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory"), three) is None
    assert distribute.peer_lost(lost, dict(num_processes=1, process_id=0)) is None
    assert distribute.peer_lost(ValueError("--batch-size 3 does not split over 2 processes"), three) is None
    assert distribute.peer_lost(ConnectionResetError("Connection reset by peer"), three) is None  # e.g. a download
