"""Recipe parity: the official PyTorch CIFAR-10 ConvMixer recipe vs our Keras recipe, at an equal budget.

Side ``torch`` re-implements the official CIFAR-10 training script (locuslab/convmixer-cifar10) in plain
PyTorch + torchvision. Side ``ours`` runs ``scripts/train.py --recipe cifar10`` as a subprocess, the command
users run. Both train on the same 45k images and are scored on the same 5k stratified validation images,
carved from the CIFAR-10 training folder with the library's own split functions (split seed 0).

Examples:
  python benchmarks/recipe_parity.py --side torch --seeds 0,1 --out /tmp/parity/results.json
  KERAS_BACKEND=jax python benchmarks/recipe_parity.py --side ours --backend jax \\
      --ours-args "--in-memory --augment-on device" --out /tmp/parity/results.json
  python benchmarks/recipe_parity.py --table-only --out /tmp/parity/results.json
  python benchmarks/recipe_parity.py --side torch --epochs 1 --steps 2 --out /tmp/parity/smoke.json   # smoke
  # The official script's full 25-epoch setting on a GPU, as that script runs it (AMP, every batch):
  python benchmarks/recipe_parity.py --side torch --device cuda --dim 256 --depth 8 --patch-size 2 \\
      --epochs 25 --steps 0 --workers 8 --seeds 0 --out /tmp/parity/full.json
"""

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Run as a file (python benchmarks/recipe_parity.py), the repository root is not on the path by itself.
sys.path.insert(0, str(REPO))

from benchmarks.torch_convmixer import torch_convmixer  # noqa: E402  (after the path is set)
from keras_convmixer.presets import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402

# ----------------------------------------------------------------------------- the shared split


def carve_split(data_root, val_count, split_seed=0):
    """``(train_files, train_labels, val_files, val_labels)`` exactly as the library splits the folder."""
    # The library imports Keras; the torch backend keeps TensorFlow out of this process.
    os.environ.setdefault("KERAS_BACKEND", "torch")
    from keras_convmixer.data import stratified_split
    from keras_convmixer.data.folders import list_folder

    _, files, labels = list_folder(Path(data_root).expanduser())
    train_idx, val_idx = stratified_split(labels, val_count, seed=split_seed)
    files = np.asarray(files)
    return list(files[train_idx]), labels[train_idx], list(files[val_idx]), labels[val_idx]


# ----------------------------------------------------------------------------- torch side


def _import_torchvision():
    # The repository's importer: it declares torchvision's two compiled op schemas where the wheel's
    # extension does not load beside the CPU torch.
    from tests.vision_reference import import_vision

    return import_vision()[1]


def one_cycle(epochs, lr_max):
    """The official script's schedule: t is fractional epochs."""
    return lambda t: np.interp([t], [0, epochs * 2 // 5, epochs * 4 // 5, epochs], [0, lr_max, lr_max / 20.0, 0])[0]


class _FileDataset:
    def __init__(self, files, labels, transform):
        self.files, self.labels, self.transform = files, [int(v) for v in labels], transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            image = im.convert("RGB")
        return self.transform(image), self.labels[i]


def _seed_worker(worker_id):
    import torch

    # DataLoader seeds torch per worker from its generator; Python's and NumPy's RNGs follow it.
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def torch_device(name):
    """``"cuda"`` or ``"cpu"`` for ``--device`` (``auto``: CUDA where torch sees a GPU)."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    return name


def run_torch(seed, split, cfg, log=print):
    import torch
    from torch import nn

    torchvision = _import_torchvision()
    T = torchvision.transforms
    train_files, train_labels, val_files, val_labels = split

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)

    normalize = T.Normalize(CIFAR10_MEAN, CIFAR10_STD)
    train_tf = T.Compose(
        [
            T.RandomResizedCrop(32, scale=(1.0, 1.0), ratio=(1.0, 1.0)),
            T.RandomHorizontalFlip(p=0.5),
            T.RandAugment(num_ops=cfg["ra_n"], magnitude=cfg["ra_m"]),
            T.ColorJitter(0.0, 0.0, 0.0),
            T.ToTensor(),
            normalize,
            T.RandomErasing(p=0.0),
        ]
    )
    eval_tf = T.Compose([T.ToTensor(), normalize])

    device = torch_device(cfg["device"])
    workers = cfg["workers"]
    loader_kw = dict(
        num_workers=workers,
        worker_init_fn=_seed_worker,
        persistent_workers=workers > 0,
        pin_memory=device == "cuda",
    )
    train_loader = torch.utils.data.DataLoader(
        _FileDataset(train_files, train_labels, train_tf),
        batch_size=cfg["batch_size"],
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
        **loader_kw,
    )
    val_loader = torch.utils.data.DataLoader(
        _FileDataset(val_files, val_labels, eval_tf), batch_size=500, shuffle=False, **loader_kw
    )
    # --steps 0: whole epochs (every full batch of a shuffled pass), as the official script runs.
    steps = min(cfg["steps"], len(train_loader)) if cfg["steps"] else len(train_loader)
    # The official script trains with AMP (float16 autocast and a GradScaler) on the GPU.
    amp = device == "cuda" if cfg["amp"] == "auto" else cfg["amp"] == "on"
    if amp and device != "cuda":
        raise SystemExit("--amp on needs --device cuda (the official script's float16 autocast)")
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    model = torch_convmixer(cfg["dim"], cfg["depth"], cfg["kernel_size"], cfg["patch_size"], 10).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    criterion = nn.CrossEntropyLoss()
    lr_schedule = one_cycle(cfg["epochs"], cfg["lr"])

    t0 = time.perf_counter()
    for epoch in range(cfg["epochs"]):
        model.train()
        te, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        for i, (x, y) in enumerate(train_loader):
            if i >= steps:
                break
            lr = lr_schedule(epoch + (i + 1) / steps)
            opt.param_groups[0].update(lr=lr)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad()
            with torch.autocast(device, dtype=torch.float16, enabled=amp):
                out = model(x)
                loss = criterion(out, y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            loss_sum += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
            seen += len(y)
        log(
            f"[torch seed {seed}] epoch {epoch + 1}/{cfg['epochs']}: loss {loss_sum / seen:.4f} "
            f"train top-1 {correct / seen:.4f} lr {lr:.5f} ({time.perf_counter() - te:.0f} s)"
        )
    train_time = time.perf_counter() - t0

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in val_loader:
            x, y = x.to(device), y.to(device)
            with torch.autocast(device, dtype=torch.float16, enabled=amp):
                correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    wall = time.perf_counter() - t0
    top1 = correct / total
    log(f"[torch seed {seed}] val top-1 {top1:.4f} on {total} images, wall {wall:.0f} s")
    return dict(
        side="torch",
        path="torch+torchvision (official recipe)",
        seed=seed,
        val_top1=top1,
        num_val=total,
        wall_time_s=round(wall, 1),
        train_time_s=round(train_time, 1),
        device=device if device == "cpu" else f"cuda ({torch.cuda.get_device_name()})",
        amp=amp,
        steps_per_epoch=steps,
        images_per_sec=round(cfg["epochs"] * steps * cfg["batch_size"] / train_time, 1),
        workers=workers,
    )


# ----------------------------------------------------------------------------- our side


def run_ours(seed, cfg, backend, extra, out_dir, log=print):
    run_dir = Path(out_dir) / f"ours_{backend}_seed{seed}"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "train.py"),
        "--recipe",
        "cifar10",
        "--data",
        f"folder:{cfg['data']}",
        "--val-split",
        str(cfg["val_count"]),
        "--model",
        "custom",
        "--dim",
        str(cfg["dim"]),
        "--depth",
        str(cfg["depth"]),
        "--kernel-size",
        str(cfg["kernel_size"]),
        "--patch-size",
        str(cfg["patch_size"]),
        "--epochs",
        str(cfg["epochs"]),
        *(["--steps-per-epoch", str(cfg["steps"])] if cfg["steps"] else []),
        "--batch-size",
        str(cfg["batch_size"]),
        "--lr",
        str(cfg["lr"]),
        "--weight-decay",
        str(cfg["weight_decay"]),
        "--randaug-n",
        str(cfg["ra_n"]),
        "--randaug-m",
        str(cfg["ra_m"]),
        "--precision",
        "float32",
        # The torch side is the official script: its whole-epoch breakpoints, at any epoch count.
        "--lr-breakpoints",
        "official",
        "--seed",
        str(seed),
        "--output-dir",
        str(run_dir),
        "--verbose",
        "2",
        *shlex.split(extra or ""),
    ]
    env = {**os.environ, "KERAS_BACKEND": backend}
    log(f"[ours {backend} seed {seed}] $ KERAS_BACKEND={backend} {shlex.join(cmd)}")
    t0 = time.perf_counter()
    lines = []
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        log(f"  | {lines[-1]}")
    rc = proc.wait()
    wall = time.perf_counter() - t0
    path = f"keras/{backend}" + (f" {extra.strip()}" if extra and extra.strip() else "")
    row = dict(side="ours", path=path, seed=seed, wall_time_s=round(wall, 1), command=shlex.join(cmd))
    metrics_file = run_dir / "metrics.json"
    if rc != 0 or not metrics_file.exists():
        errors = [ln for ln in lines if ln.strip()]
        row.update(val_top1=None, error=f"exit {rc}: {errors[-1] if errors else 'no output'}")
        log(f"[ours {backend} seed {seed}] FAILED {row['error']}")
        return row
    metrics = json.loads(metrics_file.read_text())
    row.update(
        val_top1=metrics.get("val_top1"),
        train_time_s=metrics.get("train_time_s"),
        images_per_sec=metrics.get("images_per_sec"),
    )
    log(f"[ours {backend} seed {seed}] val top-1 {row['val_top1']}, wall {wall:.0f} s")
    return row


# ----------------------------------------------------------------------------- results


def _key(row):
    return (row["side"], row["path"], int(row["seed"]), row.get("budget", ""))


def merge_results(out_file, rows):
    """Rows replace earlier rows of the same side, path, seed and budget; the rest are kept."""
    old = json.loads(Path(out_file).read_text()) if out_file and Path(out_file).exists() else []
    merged = {_key(r): r for r in old}
    merged.update({_key(r): r for r in rows})
    result = sorted(merged.values(), key=lambda r: (r.get("budget", ""), r["side"] != "torch", r["path"], r["seed"]))
    if out_file:
        Path(out_file).parent.mkdir(parents=True, exist_ok=True)
        Path(out_file).write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_table(rows):
    def pct(v):
        return "failed" if v is None else f"{100 * v:.2f}%"

    out = []
    for budget in sorted({r.get("budget", "") for r in rows}):
        group = [r for r in rows if r.get("budget", "") == budget]
        out += [f"Budget: {budget}", "", "| side | path | seed | val top-1 | wall time (s) |", "|---|---|---|---|---|"]
        for r in group:
            wall = "" if r.get("wall_time_s") is None else f"{r['wall_time_s']:.0f}"
            out.append(f"| {r['side']} | {r['path']} | {r['seed']} | {pct(r.get('val_top1'))} | {wall} |")
        means = {}
        for r in group:
            means.setdefault((r["side"], r["path"]), []).append(r.get("val_top1"))
        out += ["", "| side | path | seeds | mean val top-1 |", "|---|---|---|---|"]
        for (side, path), vals in means.items():
            ok = [v for v in vals if v is not None]
            mean = float(np.mean(ok)) if ok else None
            means[(side, path)] = mean
            out.append(f"| {side} | {path} | {len(ok)}/{len(vals)} | {pct(mean)} |")
        torch_means = [m for (s, _), m in means.items() if s == "torch" and m is not None]
        if torch_means:
            for (side, path), m in means.items():
                if side == "ours" and m is not None:
                    out.append(f"\nours ({path}) - torch: {100 * (m - torch_means[0]):+.2f} points")
        failed = [r for r in group if r.get("error")]
        for r in failed:
            out.append(f"\n{r['side']} {r['path']} seed {r['seed']} failed: {r['error']}")
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------- CLI


def _seeds(text):
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be comma-separated integers like 0,1, got {text!r}") from None


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("--side", choices=["torch", "ours", "both"], default="both")
    a("--seeds", type=_seeds, default=[0, 1], help="training seeds (the split seed is always 0)")
    a(
        "--backend",
        choices=["tensorflow", "jax", "torch"],
        default=os.environ.get("KERAS_BACKEND", "jax"),
        help="KERAS_BACKEND for our side",
    )
    a("--ours-args", default="", help='extra flags for scripts/train.py, e.g. "--in-memory --augment-on device"')
    a("--data", default="/tmp/cifar10/train", help="folder of <class>/*.jpg (the CIFAR-10 training split)")
    a("--val-count", type=int, default=5000, help="stratified validation images carved from --data")
    a("--out", default="/tmp/parity/results.json", help="JSON file; results are merged into it")
    a("--table-only", action="store_true", help="print the table from --out and exit")
    a("--workers", type=int, default=2, help="torch DataLoader workers")
    a("--threads", type=int, default=2, help="torch intra-op threads")
    a("--device", choices=["auto", "cpu", "cuda"], default="auto", help="torch side: where it trains")
    a(
        "--amp",
        choices=["auto", "on", "off"],
        default="auto",
        help="torch side: float16 autocast + GradScaler, as the official script (auto: on with CUDA)",
    )
    g = p.add_argument_group("budget (defaults: the parity budget; lower them for a smoke run)")
    g.add_argument("--epochs", type=int, default=5)
    g.add_argument(
        "--steps", type=int, default=30, help="steps per epoch (shuffled batches drawn per epoch); 0: whole epochs"
    )
    g.add_argument("--batch-size", type=int, default=512)
    g.add_argument("--lr", type=float, default=0.05, help="peak learning rate")
    g.add_argument("--weight-decay", type=float, default=0.005)
    g.add_argument("--dim", type=int, default=128)
    g.add_argument("--depth", type=int, default=4)
    g.add_argument("--kernel-size", type=int, default=5)
    g.add_argument("--patch-size", type=int, default=4)
    g.add_argument("--ra-n", type=int, default=2)
    g.add_argument("--ra-m", type=int, default=12)
    return p


def _check(parser, args):
    for name in ("epochs", "batch_size", "dim", "depth", "kernel_size", "patch_size", "val_count"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.steps < 0:
        parser.error(f"--steps must be 0 (whole epochs) or more, got {args.steps}")
    if args.workers < 0 or args.threads < 1:
        parser.error("--workers must be >= 0 and --threads >= 1")
    if not args.seeds:
        parser.error("--seeds needs at least one seed")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    if args.table_only:
        if not Path(args.out).exists():
            parser.error(f"--out {args.out} does not exist: nothing to tabulate")
        print(format_table(merge_results(None, json.loads(Path(args.out).read_text()))))
        return

    def log(msg):
        print(msg, flush=True)

    cfg = dict(vars(args), data=str(Path(args.data).expanduser()))
    steps = f"{args.steps} steps" if args.steps else "all steps"
    budget = (
        f"ConvMixer-{args.dim}/{args.depth} k{args.kernel_size} p{args.patch_size}, {args.epochs} ep x "
        f"{steps} x {args.batch_size}, lr {args.lr}, wd {args.weight_decay}, "
        f"RandAugment n{args.ra_n} m{args.ra_m}"
    )
    log(f"budget: {budget}")
    out_dir = Path(args.out).parent
    split = None
    if args.side in ("torch", "both"):
        split = carve_split(cfg["data"], args.val_count, split_seed=0)
        log(f"split: {len(split[0])} train / {len(split[2])} val files (stratified, seed 0)")
    for seed in args.seeds:
        rows = []
        if args.side in ("torch", "both"):
            rows.append(run_torch(seed, split, cfg, log))
        if args.side in ("ours", "both"):
            rows.append(run_ours(seed, cfg, args.backend, args.ours_args, out_dir, log))
        for r in rows:
            r["budget"] = budget
        merge_results(args.out, rows)  # after every seed, so a killed run keeps what finished
    print()
    print(format_table(merge_results(args.out, [])))


if __name__ == "__main__":
    main()
