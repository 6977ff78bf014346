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


def _two_processes(run, logs, port, **settings):
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "PYTHONPATH": ROOT,
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    flags = dict(strategy="data-parallel", num_processes=2, coordinator=f"127.0.0.1:{port}", in_memory=True)
    return [
        subprocess.Popen(
            [
                sys.executable,
                "scripts/train.py",
                *cli_flags(output_dir=run, process_id=i, **flags, augment_on="device", **settings),
                *TINY_FLAGS,
            ],
            cwd=ROOT,
            env=env,
            stdout=open(logs / f"process_{i}.out", "w"),
            stderr=open(logs / f"process_{i}.err", "w"),
        )
        for i in range(2)
    ]


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution multi-process runs on JAX")
def test_a_killed_process_ends_the_other_with_one_line_and_the_same_command_resumes(tmp_path):
    run, settings = tmp_path / "run", dict(epochs=2, steps_per_epoch=60)
    procs = _two_processes(run, tmp_path, _free_port(), **settings)
    deadline = time.monotonic() + 300
    history = run / "history.csv"
    while not (history.exists() and len(history.read_text().splitlines()) >= 2):  # header + epoch 0
        assert time.monotonic() < deadline and procs[0].poll() is None, (tmp_path / "process_0.err").read_text()[-2000:]
        time.sleep(0.1)
    procs[1].kill()
    killed = time.monotonic()
    procs[0].wait(timeout=120)
    waited = time.monotonic() - killed
    err = (tmp_path / "process_0.err").read_text()
    assert procs[0].returncode == 1, err[-2000:]
    assert waited < 60, waited  # JAX's own shutdown waits ~100 s for the lost process, then aborts
    assert "Traceback" not in err and "Check failure" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("train.py: process 1 of this 2-process run stopped, so process 0 stops too"), last
    assert len(history.read_text().splitlines()) == 2  # the finished epoch is kept

    procs = _two_processes(run, tmp_path, _free_port(), **settings)
    for i, p in enumerate(procs):
        assert p.wait(timeout=400) == 0, (tmp_path / f"process_{i}.err").read_text()[-2000:]
    assert [row.split(",")[0] for row in history.read_text().splitlines()[1:]] == ["0", "1"]
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2


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
