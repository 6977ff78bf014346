"""benchmarks/gpu_cifar.py and the recipe_parity flags it uses: the log parsing, the timing summary, the
targets and the JSON lines. The training runs themselves are too long for CI (see docs/results.md)."""

import json
import subprocess
import sys

import pytest

from benchmarks import gpu_cifar, recipe_parity
from tests.helpers import ROOT

# A line exactly as Keras 3.15 prints an epoch with --verbose 2 (from a parity run's log).
KERAS_LINE = (
    "30/30 - 88s - 3s/step - loss: 1.2677 - top1: 0.5499 - top5: 0.9387 - val_loss: 1.1118 - val_top1: 0.6006 "
    "- val_top5: 0.9606 - lr: 0.0000e+00 - images_per_sec: 188.4381 - epoch_time_s: 87.7447"
)
TORCH_LINE = "[torch seed 0] epoch 3/25: loss 1.2345 train top-1 0.5521 lr 0.03750 (12 s)"


def test_epoch_lines_are_parsed():
    figures = gpu_cifar.keras_epoch_metrics(KERAS_LINE)
    assert figures["loss"] == 1.2677 and figures["val_top1"] == 0.6006 and figures["lr"] == 0.0
    assert figures["epoch_time_s"] == 87.7447 and "step" not in figures
    assert gpu_cifar.keras_epoch_metrics("Epoch 5/5") is None
    assert gpu_cifar.torch_epoch_metrics(TORCH_LINE) == dict(
        epoch=3, epochs=25, loss=1.2345, top1=0.5521, lr=0.0375, epoch_time_s=12
    )
    assert gpu_cifar.torch_epoch_metrics(KERAS_LINE) is None


def test_summary_takes_compilation_out_of_the_first_epoch():
    history = [dict(epoch_time_s=t, images_per_sec=ips) for t, ips in [(30.0, 1500), (2.0, 23000), (2.2, 21000)]]
    history += [dict(epoch_time_s=2.1, images_per_sec=22000)]
    s = gpu_cifar.summarize_ours(history, dict(val_top1=0.92, steps_per_epoch=87), command_wall_s=70.0)
    assert s["train_time_s"] == pytest.approx(36.3)
    assert s["steady_epoch_s"] == pytest.approx(2.1) and s["compile_estimate_s"] == pytest.approx(27.9)
    assert s["train_time_without_compile_s"] == pytest.approx(8.4)  # four epochs at the steady 2.1 s
    assert s["images_per_sec_steady"] == 22000 and s["val_top1"] == 0.92 and s["epochs"] == 4


def test_targets():
    met = gpu_cifar.targets(dict(val_top1=0.915, train_time_s=55.0), dict(val_top1=0.90, wall_time_s=130.0))
    assert met == dict(
        top1_at_least_91=True,
        top1_not_below_torch=True,
        train_time_at_most_60s=True,
        ratio_to_torch=0.423,
        ratio_at_most_045=True,
    )
    missed = gpu_cifar.targets(dict(val_top1=0.905, train_time_s=70.0), dict(val_top1=0.91, wall_time_s=140.0))
    assert not any(v for k, v in missed.items() if k != "ratio_to_torch")
    assert gpu_cifar.targets(dict(val_top1=0.92, train_time_s=50.0), {})["ratio_at_most_045"] is None


def test_json_lines_append_as_they_come(tmp_path, capsys):
    out = gpu_cifar.JsonLines(tmp_path / "sub" / "r.jsonl")
    out.emit("machine", gpu=None)
    out.emit("ours_epoch", epoch=1, loss=2.0)
    rows = [json.loads(line) for line in (tmp_path / "sub" / "r.jsonl").read_text().splitlines()]
    assert [r["event"] for r in rows] == ["machine", "ours_epoch"] and rows[1]["loss"] == 2.0
    assert capsys.readouterr().out.count("JSON {") == 2


def test_stream_tees_and_stops_at_its_time_limit(tmp_path):
    seen = []
    prog = "import time\nfor i in range(100):\n    print(i, flush=True)\n    time.sleep(0.05)"
    rc, wall, tail = gpu_cifar.stream([sys.executable, "-c", prog], None, tmp_path / "log", seen.append, 0.5)
    assert rc == "timeout" and wall < 5 and 0 < len(seen) < 100
    assert (tmp_path / "log").read_text().splitlines()[: len(seen)] == seen and tail[-1] == seen[-1]
    # A silent run (validation, compilation) is stopped at its limit too, not at its next line.
    silent = [sys.executable, "-c", "import time; time.sleep(60)"]
    rc, wall, _ = gpu_cifar.stream(silent, None, tmp_path / "log3", seen.append, 0.5)
    assert rc == "timeout" and wall < 10
    rc, _, _ = gpu_cifar.stream([sys.executable, "-c", "print('x')"], None, tmp_path / "log2", seen.append, 30)
    assert rc == 0 and seen[-1] == "x"


def test_recipe_parity_flags_for_the_full_budget():
    parser = recipe_parity.build_parser()
    args = parser.parse_args(["--steps", "0", "--device", "cuda", "--amp", "off"])
    recipe_parity._check(parser, args)
    assert (args.steps, args.device, args.amp) == (0, "cuda", "off")
    with pytest.raises(SystemExit):
        recipe_parity._check(parser, parser.parse_args(["--steps", "-1"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "tpu"])


def test_ours_side_passes_steps_only_when_capped(tmp_path, monkeypatch):
    # --steps 0 leaves --steps-per-epoch out, so train.py runs whole epochs.
    commands = []

    class Stop(Exception):
        pass

    def fake_popen(cmd, **kwargs):
        commands.append(cmd)
        raise Stop

    monkeypatch.setattr(recipe_parity.subprocess, "Popen", fake_popen)
    cfg = vars(recipe_parity.build_parser().parse_args([]))
    for steps in (0, 30):
        with pytest.raises(Stop):
            recipe_parity.run_ours(0, dict(cfg, steps=steps), "jax", "", tmp_path, log=lambda m: None)
    assert "--steps-per-epoch" not in commands[0]
    assert commands[1][commands[1].index("--steps-per-epoch") + 1] == "30"


def test_gpu_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", f"{ROOT}/benchmarks/gpu_cifar.sh"]).returncode == 0
