"""The run directory survives kills, full disks, second runs and damaged files.

The end-to-end tests run ``scripts/train.py`` in a subprocess on the digits demo with a tiny model,
and kill it with a real SIGKILL; the others leave the exact state a kill or a bad disk leaves.
"""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import h5py
import keras
import numpy as np
import pytest

from keras_convmixer import atomic, curves, rundir
from tests.helpers import ROOT, TINY_FLAGS, rows, run_script

BACKEND = keras.backend.backend()


def _tiny_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")])
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    return model


def _train_one_step(model, seed):
    rng = np.random.default_rng(seed)
    model.fit(rng.normal(size=(4, 3)), rng.normal(size=(4, 2)), epochs=1, verbose=0)


def _row(epoch, top1):
    return {"epoch": epoch, "loss": 1.0 / (epoch + 1), "top1": top1}


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "best.json"
    atomic.write_json(path, {"value": 1})
    with pytest.raises(KeyboardInterrupt), atomic.atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write('{"val')  # a torn write...
        raise KeyboardInterrupt  # ...interrupted
    assert json.loads(path.read_text()) == {"value": 1}
    assert sorted(os.listdir(tmp_path)) == ["best.json"]  # no temporary left behind


def test_history_csv_has_csvloggers_layout_and_best_is_derived_from_it(tmp_path):
    run = rundir.RunDir(tmp_path / "run").create()
    history = [_row(0, 0.5), {"epoch": 1, "loss": 0.4, "top1": 0.75, "val_top1": 0.7}, _row(2, 0.6)]
    atomic.write_text(run / rundir.HISTORY, rundir.history_csv(history))
    back = run.history()
    assert list(back[0]) == ["epoch", "loss", "top1", "val_top1"]
    assert [r["val_top1"] for r in back] == ["NA", "0.7", "NA"]
    assert rundir.history_value(back[0], "val_top1") is None
    assert rundir.best_of(back, "top1") == {"monitor": "top1", "value": 0.75, "epoch": 1}  # row index, from 0


def test_restore_falls_back_to_the_previous_checkpoint_when_the_latest_is_damaged(tmp_path):
    run = rundir.RunDir(tmp_path / "run").create()
    model = _tiny_model()
    history, saved = [], []
    for epoch in range(3):
        _train_one_step(model, epoch)
        history.append(_row(epoch, 0.1 * epoch))
        run.commit_epoch(model, history, "top1")
        saved.append([w.copy() for w in model.get_weights()])
    assert sorted(run.checkpoints()) == [2, 3]  # the two newest are kept
    # What a kill inside a non-atomic write leaves: a truncated file.
    latest = run.checkpoint(3)
    with open(latest, "r+b") as f:
        f.truncate(100)

    fresh = _tiny_model()
    fresh.optimizer.build(fresh.trainable_variables)
    messages = []
    assert run.restore(fresh, log=messages.append) == 2
    for got, want in zip(fresh.get_weights(), saved[1], strict=True):
        np.testing.assert_array_equal(got, want)
    assert [int(r["epoch"]) for r in run.history()] == [0, 1]
    assert "unreadable" in messages[0] and latest in messages[0] and "after 2 of the 3 recorded epochs" in messages[1]


def test_restore_with_no_readable_checkpoint_starts_over(tmp_path):
    run = rundir.RunDir(tmp_path / "run").create()
    model = _tiny_model()
    _train_one_step(model, 0)
    run.commit_epoch(model, [_row(0, 0.1)], "top1")
    open(run.checkpoint(1), "wb").close()  # an empty file, as a kill during a plain write leaves
    assert run.restore(_tiny_model(), log=lambda _: None) == 0
    assert run.history() == []


@pytest.mark.parametrize("content", ["", '{"epochs": 3'])
def test_damaged_config_is_named_in_one_line(tmp_path, content):
    run = rundir.RunDir(tmp_path / "run").create()
    (tmp_path / "run" / "config.json").write_text(content)
    with pytest.raises(rundir.RunDirError) as err:
        run.read_config()
    message = str(err.value)
    assert "config.json" in message and "\n" not in message and "line 1 column" not in message.split(":")[0]


def test_lock_refuses_a_second_holder_and_names_it(tmp_path):
    first = rundir.RunDir(tmp_path / "run").create().lock()
    try:
        with pytest.raises(rundir.RunDirBusy) as err:
            rundir.RunDir(tmp_path / "run").lock()  # a second open file: flock refuses it, even in-process
        assert f"PID {os.getpid()}" in str(err.value) and "--output-dir" in str(err.value)
    finally:
        first.unlock()
    rundir.RunDir(tmp_path / "run").lock().unlock()  # released


def test_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
            "f.write(f'PID {os.getpid()} on elsewhere'); f.flush(); print('held', flush=True); time.sleep(60)",
            str(tmp_path / "run" / ".lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    (tmp_path / "run").mkdir()
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(rundir.RunDirBusy, match=f"PID {holder.pid} on elsewhere"):
            rundir.RunDir(tmp_path / "run").lock()
    finally:
        holder.kill()
        holder.wait()
    run = rundir.RunDir(tmp_path / "run").lock()
    assert (tmp_path / "run" / ".lock").read_text().startswith(f"PID {os.getpid()} on ")
    run.unlock()


def test_resume_refuses_another_backend_and_changed_classes():
    saved = {"backend": "jax", "epochs": 2, "class_names": ["cat", "dog"], "data": "folder:/d"}
    with pytest.raises(ValueError, match="trained with KERAS_BACKEND=jax, not torch"):
        rundir.check_resumable(saved, dict(saved, backend="torch"), (), "runs/a")
    with pytest.raises(ValueError, match=r"changed since runs/a began \(added emu; removed dog\)"):
        rundir.check_resumable(saved, dict(saved, class_names=["cat", "emu"]), (), "runs/a")
    rundir.check_resumable(saved, dict(saved), (), "runs/a")  # the same run resumes


def test_curves_show_the_lr_of_every_step_on_integer_epochs(tmp_path):
    history = [
        {
            "epoch": str(e),
            "loss": str(2 - e / 10),
            "val_loss": str(2.1 - e / 10),
            "top1": str(e / 10),
            "val_top1": str(e / 10 + 0.05),
            "lr": "0.01",
            "images_per_sec": str(900 + e),
        }
        for e in range(7)
    ]
    # A one-cycle sampled per step: its peak falls between the once-an-epoch lr values of the history.
    t = np.arange(1, 701) / 100
    lr = np.interp(t, [0, 2.5, 5.5, 7], [0, 0.05, 0.0025, 0])
    fig = curves.curves_figure(
        history,
        lr_curve=(t, lr),
        title="ConvMixer-256/8, recipe cifar10, jax backend",
        note="train loss includes label smoothing",
    )
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert sorted(axes) == ["learning rate", "loss", "top-1 accuracy", "training images/s"]
    assert fig._suptitle.get_text() == "ConvMixer-256/8, recipe cifar10, jax backend"
    assert "train loss includes label smoothing" in [text.get_text() for text in fig.texts]
    (line,) = axes["learning rate"].lines
    np.testing.assert_array_equal(line.get_xdata(), t)
    assert line.get_ydata().max() == pytest.approx(0.05)
    assert sorted(line.get_label() for line in axes["loss"].lines) == ["loss", "val_loss"]
    np.testing.assert_array_equal(axes["training images/s"].lines[0].get_ydata(), np.arange(900, 907))
    for ax in fig.axes:
        ticks = ax.get_xticks()
        assert np.array_equal(ticks, np.round(ticks)), (ax.get_title(), ticks)
        assert all(gridline.get_visible() for gridline in ax.xaxis.get_gridlines())
    curves.plot_curves(history, tmp_path / "curves.png", lr_curve=(t, lr))
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- end to end

EPOCHS, STEPS = 6, 2
TRAIN = ["scripts/train.py", "--epochs", str(EPOCHS), "--steps-per-epoch", str(STEPS), *TINY_FLAGS]


def _env():
    return {**os.environ, "KERAS_BACKEND": BACKEND, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}


def _assert_consistent(run):
    """What a later resume relies on: every file parses, and the history names a checkpoint that loads."""
    history = rows(run / "history.csv") if (run / "history.csv").exists() else []
    assert [int(r["epoch"]) for r in history] == list(range(len(history)))
    for name in ("config.json", "best.json"):
        if (run / name).exists():
            json.loads((run / name).read_text())
    if history:
        with h5py.File(run / "backup" / f"epoch-{len(history):04d}.weights.h5") as f:
            assert len(f.keys()) > 0
    return len(history)


def test_a_loop_of_sigkills_never_breaks_the_run_dir(tmp_path):
    run = tmp_path / "run"
    args = [*TRAIN, "--output-dir", str(run)]
    rng = random.Random(0)
    kills = 0
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for line in proc.stdout:  # the moment training starts: kill somewhere in the next ~2 epochs
            if line.startswith("Training "):
                break
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        kills += proc.returncode == -signal.SIGKILL
        _assert_consistent(run)
    assert kills >= 3  # most runs were killed mid-way, not after finishing
    final = run_script([*args, "--verbose", "2"])
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-2000:]
    assert _assert_consistent(run) == EPOCHS
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == EPOCHS and metrics["optimizer_steps"] == EPOCHS * STEPS


def test_a_second_run_into_the_same_dir_is_refused_while_the_first_runs(tmp_path):
    run = tmp_path / "run"
    long_run = [*TRAIN, "--output-dir", str(run), "--epochs", "500"]  # still running when the second starts
    first = subprocess.Popen(
        [sys.executable, *long_run], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        for line in first.stdout:
            if line.startswith("Training "):
                break
        second = run_script(long_run)
        assert first.poll() is None, "the first run ended before the second started"
        assert second.returncode == 2
        err = second.stderr.strip().splitlines()
        assert f"is in use by PID {first.pid}" in err[-1] and "Traceback" not in second.stderr
    finally:
        first.kill()
        first.communicate()
    _assert_consistent(run)  # one writer: no duplicated epochs


@contextlib.contextmanager
def _tmpfs(path, size):
    path.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_stops_with_one_line_and_the_run_resumes_once_space_is_back(tmp_path):
    disk = tmp_path / "disk"
    with _tmpfs(disk, "400k"):
        run = disk / "run"
        args = [*TRAIN, "--output-dir", str(run)]
        full = run_script(args)
        assert full.returncode != 0 and full.returncode != -signal.SIGSEGV
        err = full.stderr.strip().splitlines()
        assert "Traceback" not in full.stderr, full.stderr[-3000:]
        assert "no space left" in err[-1] and str(run) in err[-1] and "MiB free" in err[-1]
        done = _assert_consistent(run)
        assert done < EPOCHS

        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        again = run_script(args)
        assert again.returncode == 0, again.stderr[-3000:]
        assert _assert_consistent(run) == EPOCHS
        assert json.loads((run / "metrics.json").read_text())["optimizer_steps"] == EPOCHS * STEPS


def test_a_failed_start_takes_away_only_what_it_made(tmp_path):
    # A new directory (and the parents made for it) goes entirely.
    new = rundir.RunDir(tmp_path / "a" / "b" / "run")
    with pytest.raises(RuntimeError, match="failed start"), new.claimed():
        new.write_config({"epochs": 2})
        os.makedirs(os.path.join(new / "tensorboard", "train"))
        raise RuntimeError("failed start")
    assert list(tmp_path.iterdir()) == []
    # A folder that was there keeps everything it held, the user's own tensorboard/ included.
    mine = tmp_path / "mine"
    (mine / "tensorboard").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    run = rundir.RunDir(mine)
    with pytest.raises(KeyboardInterrupt), run.claimed():
        run.write_config({"epochs": 2})
        atomic.write_json(run / rundir.METRICS, {})
        raise KeyboardInterrupt
    assert sorted(os.listdir(mine)) == ["notes.txt", "tensorboard"]
    assert (mine / "notes.txt").read_text() == "keep me"
    # A run with a recorded epoch is kept whatever fails after it.
    done = rundir.RunDir(tmp_path / "done")
    with pytest.raises(RuntimeError), done.claimed():
        done.commit_epoch(_tiny_model(), [_row(0, 0.5)], "top1")
        raise RuntimeError("after the first epoch")
    assert {"history.csv", "backup", "best.json"} <= set(os.listdir(tmp_path / "done"))
    assert len(rows(tmp_path / "done" / "history.csv")) == 1


def test_a_second_start_never_takes_away_the_directory_of_the_run_that_holds_it(tmp_path):
    first = rundir.RunDir(tmp_path / "run")
    with first.claimed():
        first.write_config({"epochs": 2})
        second = rundir.RunDir(tmp_path / "run")
        with pytest.raises(rundir.RunDirBusy, match="is in use by PID"), second.claimed():
            pass
        with pytest.raises(rundir.RunDirBusy, match="is in use by PID"):
            second.check_free()  # said before the second run loads its data, without the lock
        assert sorted(os.listdir(tmp_path / "run")) == [".lock", "backup", "config.json"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda run: (run / "history.csv").mkdir(parents=True), "history.csv is a folder where a run keeps its"),
        (lambda run: (run / ".lock").mkdir(parents=True), ".lock is a folder where a run keeps its"),
        (lambda run: run.mkdir() or (run / "backup").write_text("x"), "backup is a file where a run keeps its"),
        (lambda run: run.parent.joinpath("file").write_text("x"), "lies under"),
    ],
)
def test_a_path_that_cannot_hold_a_run_is_one_line_before_anything_is_written(tmp_path, make, message):
    run = tmp_path / "run"
    make(run)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    target = tmp_path / "file" / "run" if message == "lies under" else run
    with pytest.raises(rundir.RunDirError, match=message) as excinfo:
        rundir.RunDir(target).create()
    assert "\n" not in str(excinfo.value) and "Errno" not in str(excinfo.value)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
