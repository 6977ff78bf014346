"""The full CIFAR-10 recipe on one GPU, ours against the official PyTorch recipe, in one call.

1. Ours: the README's command, as a user runs it (``convmixer-train`` on the PATH):
   ``KERAS_BACKEND=jax convmixer-train --recipe cifar10 --data folder:DATA --val-split 5000 --in-memory
   --augment-on device`` (ConvMixer-256/8, k5, p2, 25 epochs, batch 512; precision "auto", which is mixed
   bfloat16 on a GPU).
2. The anchor: ``benchmarks/recipe_parity.py --side torch`` at the same full budget, on the same card
   (AMP and every batch of each epoch, as the official script runs).

Each result goes to ``--out`` as one JSON line as soon as it exists (the machine, each epoch of both
runs, each run's summary, the targets), so a run cut off at its time limit still reports what it did.
``--dry-run``: 1 epoch of 3 steps a side on whatever device there is, to check the wiring on a CPU.

  python benchmarks/gpu_cifar.py --data /tmp/cifar10/train --out $OUT/gpu_cifar.jsonl
  python benchmarks/gpu_cifar.py --data /tmp/cifar10/train --out /tmp/dry.jsonl --dry-run

``benchmarks/gpu_cifar.sh`` sets up the GPU machine (wheels, the data, the command) and runs this.
"""

import argparse
import csv
import datetime
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The targets for the full run.
TARGET_TOP1 = 0.91
TARGET_TRAIN_S = 60.0
TARGET_RATIO = 0.45
# The dry run keeps each command's precision: "auto" is float32 on a CPU, where mixed bfloat16 runs
# emulated, about 20 times slower (247 s a step of ConvMixer-256/8 at batch 512 on the 2-core box).
DRY_RUN_OURS = ["--epochs", "1", "--steps-per-epoch", "3", "--val-steps", "2"]
# 1,000 held-out images instead of 5,000 (another split, which a dry run does not mind).
DRY_RUN_TORCH = ["--epochs", "1", "--steps", "3", "--val-count", "1000"]


class JsonLines:
    """Appends one JSON object a line to ``path``, flushed at once, and echoes it to stdout."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, event, **fields):
        row = {"event": event, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        row.update(fields)
        line = json.dumps(row, sort_keys=False)
        with open(self.path, "a") as f:
            f.write(line + "\n")
        print(f"JSON {line}", flush=True)
        return row


# ----------------------------------------------------------------------------- parsing the two logs

_KERAS_PAIR = re.compile(r"(\w+): ([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)")
_TORCH_EPOCH = re.compile(
    r"\[torch seed \d+\] epoch (\d+)/(\d+): loss ([\d.]+) train top-1 ([\d.]+) lr ([\d.e+-]+) \((\d+) s\)"
)


def keras_epoch_metrics(line):
    """The ``name: value`` figures of Keras's ``--verbose 2`` epoch line (``30/30 - 5s - loss: ...``), or None."""
    if " - loss: " not in line:
        return None
    return {k: float(v) for k, v in _KERAS_PAIR.findall("loss: " + line.split(" - loss: ", 1)[1])}


def torch_epoch_metrics(line):
    m = _TORCH_EPOCH.search(line)
    if not m:
        return None
    return dict(
        epoch=int(m[1]), epochs=int(m[2]), loss=float(m[3]), top1=float(m[4]), lr=float(m[5]), epoch_time_s=int(m[6])
    )


def summarize_ours(history, metrics, command_wall_s):
    """Wall time with and without compilation and steady img/s from the run's history rows.

    JAX compiles the train and eval steps during epoch 1, so epoch 1 less the median later epoch is
    the compilation (and first-touch) cost; "without compilation" removes that from the train time.
    """
    times = [float(r["epoch_time_s"]) for r in history if r.get("epoch_time_s") not in (None, "")]
    ips = [float(r["images_per_sec"]) for r in history if r.get("images_per_sec") not in (None, "")]
    later = times[1:]
    steady = statistics.median(later) if later else None
    compile_s = max(0.0, times[0] - steady) if steady is not None else None
    train_s = sum(times)
    return dict(
        val_top1=metrics.get("val_top1"),
        val_top5=metrics.get("val_top5"),
        epochs=len(times),
        command_wall_s=round(command_wall_s, 1),
        train_time_s=round(train_s, 2),
        first_epoch_s=round(times[0], 2) if times else None,
        steady_epoch_s=None if steady is None else round(steady, 3),
        compile_estimate_s=None if compile_s is None else round(compile_s, 2),
        train_time_without_compile_s=None if compile_s is None else round(train_s - compile_s, 2),
        # Training steps only (validation excluded), epochs 2 onwards: no compilation in them.
        images_per_sec_steady=round(statistics.median(ips[1:]), 1) if len(ips) > 1 else None,
        images_per_sec_mean=metrics.get("images_per_sec"),
        optimizer_steps=metrics.get("optimizer_steps"),
        steps_per_epoch=metrics.get("steps_per_epoch"),
        backend=metrics.get("backend"),
    )


def targets(ours, torch):
    """The issue's four checks, each None where a figure is missing."""

    def check(ok, *needed):
        return None if any(v is None for v in needed) else bool(ok())

    o_top1, t_top1 = ours.get("val_top1"), torch.get("val_top1")
    o_train, t_wall = ours.get("train_time_s"), torch.get("wall_time_s")
    return dict(
        top1_at_least_91=check(lambda: o_top1 >= TARGET_TOP1, o_top1),
        top1_not_below_torch=check(lambda: o_top1 >= t_top1, o_top1, t_top1),
        train_time_at_most_60s=check(lambda: o_train <= TARGET_TRAIN_S, o_train),
        ratio_to_torch=None if None in (o_train, t_wall) else round(o_train / t_wall, 3),
        ratio_at_most_045=check(lambda: o_train <= TARGET_RATIO * t_wall, o_train, t_wall),
    )


# ----------------------------------------------------------------------------- running


def stream(cmd, env, log_path, on_line, timeout_s):
    """Run ``cmd``, teeing its output to ``log_path`` and calling ``on_line`` per line; (rc, wall, tail)."""
    t0 = time.perf_counter()
    tail = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        # A timer, not a check per line: a run can be silent for minutes (validation, compilation).
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                tail = (tail + [line.rstrip("\n")])[-20:]
                on_line(line.rstrip("\n"))
            rc = proc.wait()
        finally:
            timer.cancel()
    wall = time.perf_counter() - t0
    return ("timeout" if wall >= timeout_s else rc), wall, tail


def versions():
    out = {}
    for name in ("jax", "jaxlib", "keras", "torch", "torchvision", "numpy", "pillow", "tensorflow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def gpu_name():
    if not shutil.which("nvidia-smi"):
        return None
    q = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return q.stdout.strip() or None


def train_command():
    """The README's command: ``convmixer-train`` where it is installed (or put on the PATH by gpu_cifar.sh)."""
    found = shutil.which("convmixer-train")
    return [found] if found else [sys.executable, str(REPO / "scripts" / "train.py")]


def run_ours(args, out, env):
    run_dir = Path(args.run_dir) / "ours"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run, never a resumed one
    cmd = [
        *train_command(),
        "--recipe",
        "cifar10",
        "--data",
        f"folder:{args.data}",
        "--val-split",
        "5000",
        "--in-memory",
        "--augment-on",
        "device",
        "--output-dir",
        str(run_dir),
        "--verbose",
        "2",
        *(DRY_RUN_OURS if args.dry_run else []),
    ]
    env = {**env, "KERAS_BACKEND": "jax"}
    out.emit("ours_start", command="KERAS_BACKEND=jax " + " ".join(cmd))
    state = {"epochs_done": 0}

    def on_line(line):
        figures = keras_epoch_metrics(line)
        if figures is not None:
            # Counted here: Keras prints its "Epoch i/n" line only when n > 1.
            state["epochs_done"] += 1
            out.emit("ours_epoch", epoch=state["epochs_done"], **figures)
        if line.startswith(("Training ", "TensorBoard logs skipped")):
            out.emit("ours_note", line=line)

    rc, wall, tail = stream(cmd, env, Path(args.log_dir) / "ours.log", on_line, args.ours_timeout)
    metrics_file = run_dir / "metrics.json"
    if rc != 0 or not metrics_file.exists():
        return out.emit("ours", ok=False, rc=rc, command_wall_s=round(wall, 1), tail=tail[-8:])
    with open(run_dir / "history.csv") as f:
        history = list(csv.DictReader(f))
    summary = summarize_ours(history, json.loads(metrics_file.read_text()), wall)
    return out.emit("ours", ok=True, **summary)


def run_torch(args, out, env):
    parity_json = Path(args.run_dir) / "parity_torch.json"
    if parity_json.exists():
        parity_json.unlink()
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "recipe_parity.py"),
        "--side",
        "torch",
        "--seeds",
        "0",
        "--data",
        args.data,
        "--device",
        "auto" if args.dry_run else "cuda",
        "--dim",
        "256",
        "--depth",
        "8",
        "--kernel-size",
        "5",
        "--patch-size",
        "2",
        "--epochs",
        "25",
        "--steps",
        "0",
        "--workers",
        str(min(args.torch_workers, os.cpu_count() or 1) if args.dry_run else args.torch_workers),
        "--out",
        str(parity_json),
        *(DRY_RUN_TORCH if args.dry_run else []),
    ]
    out.emit("torch_start", command=" ".join(cmd))

    def on_line(line):
        figures = torch_epoch_metrics(line)
        if figures is not None:
            out.emit("torch_epoch", **figures)

    rc, wall, tail = stream(cmd, env, Path(args.log_dir) / "torch.log", on_line, args.torch_timeout)
    rows = json.loads(parity_json.read_text()) if parity_json.exists() else []
    if rc != 0 or not rows:
        return out.emit("torch", ok=False, rc=rc, command_wall_s=round(wall, 1), tail=tail[-8:])
    row = rows[0]
    keep = ("val_top1", "num_val", "wall_time_s", "train_time_s", "images_per_sec", "device", "amp")
    return out.emit(
        "torch", ok=True, command_wall_s=round(wall, 1), **{k: row.get(k) for k in keep}, **{"budget": row["budget"]}
    )


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="the CIFAR-10 training folder (<class>/*.jpg)")
    p.add_argument("--out", required=True, help="JSON-lines file, appended to as results come")
    p.add_argument("--run-dir", default="/tmp/gpu_cifar_run", help="where both runs write")
    p.add_argument("--log-dir", default=None, help="full logs of both runs (default: beside --out)")
    p.add_argument("--dry-run", action="store_true", help="1 epoch of 3 steps a side, any device")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--torch-workers", type=int, default=8, help="DataLoader workers of the PyTorch run")
    p.add_argument("--ours-timeout", type=float, default=300.0, help="seconds before our run is stopped")
    p.add_argument("--torch-timeout", type=float, default=240.0, help="seconds before the PyTorch run is stopped")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.data = str(Path(args.data).expanduser().resolve())
    if not Path(args.data).is_dir():
        raise SystemExit(f"--data {args.data} is not a folder")
    args.log_dir = args.log_dir or str(Path(args.out).parent)
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    out = JsonLines(args.out)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out.emit(
        "machine",
        dry_run=args.dry_run,
        gpu=gpu_name(),
        cpus=os.cpu_count(),
        python=sys.version.split()[0],
        versions=versions(),
        # Installed is not importable: the dry run hides TensorFlow, as the GPU image lacks it.
        tensorflow_importable=importlib.util.find_spec("tensorflow") is not None,
        train_command=train_command(),
        torch_workers=args.torch_workers,
    )
    ours = {} if args.skip_ours else run_ours(args, out, env)
    torch = {} if args.skip_torch else run_torch(args, out, env)
    out.emit("targets", dry_run=args.dry_run, **targets(ours, torch))


if __name__ == "__main__":
    main()
