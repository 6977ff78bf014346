"""Benchmark the depthwise op and ConvMixer training/inference for every depthwise_impl, next to PyTorch.

Prints one JSON line per measurement, then a Markdown table of them all. In one run:

* the depthwise op alone, forward and forward+backward (``--op-shape``, default k9
  (8, 32, 32, 256)), for every implementation and, when torch is installed, PyTorch's
  ``F.conv2d(groups=C)`` in NCHW and channels_last;
* training images/s of ``--train-model`` (default ConvMixer-256/8 at 32x32, batch 64);
* inference images/s of ``--infer-model`` (default ConvMixer-1024/20 at 224x224, batch 16);

each for every implementation and for a timm-style PyTorch ConvMixer of the same shapes.
The CPU figures of docs/benchmarks.md come from runs such as:

    KERAS_BACKEND=jax python scripts/benchmark.py --what op,train --steps 7 --warmup 2

GPU target shapes (bfloat16):

    KERAS_BACKEND=jax python scripts/benchmark.py --precision bfloat16 --op-shape 64,32,1536,9 \\
        --train-model convmixer_1536_20 --infer-model convmixer_1536_20 --infer-batch-size 64 --no-torch

Tiny smoke run:

    KERAS_BACKEND=jax python scripts/benchmark.py --op-shape 2,8,16,9 --dim 16 --depth 1 \\
        --train-image-size 32 --infer-image-size 56 --steps 2 --warmup 1
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:
    from keras_convmixer.benchmark import (
        BENCH_IMPLS,
        MEASUREMENTS,
        PRECISIONS,
        common_fields,
        default_impls,
        median_seconds,
        model_config,
        op_arrays,
        run_benchmarks,
        summary_table,
    )
    from keras_convmixer.models import list_models
except ImportError as err:  # an unknown KERAS_BACKEND, a missing package: one line, not a traceback
    sys.stderr.write(f"{os.path.basename(__file__)}: error: {(str(err).splitlines() or [type(err).__name__])[0]}\n")
    sys.exit(2)


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def op_shape(text):
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected batch,tokens,channels,kernel (4 positive integers), got {text!r}")
    return dict(zip(("batch_size", "tokens", "dim", "kernel_size"), values, strict=True))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--what", default=",".join(MEASUREMENTS),
                        help=f"comma-separated, from: {','.join(MEASUREMENTS)}")
    parser.add_argument("--impls", help=f"comma-separated, from: {','.join(BENCH_IMPLS)} (default: all but "
                        "'fast' on CPU, where it runs in Pallas's interpreter)")
    parser.add_argument("--op-shape", type=op_shape, default=op_shape("8,32,256,9"),
                        help="batch,tokens,channels,kernel")
    parser.add_argument("--train-model", default="convmixer_256_8", help=f"one of: {', '.join(list_models())}")
    parser.add_argument("--train-batch-size", type=positive_int, default=64)
    parser.add_argument("--train-image-size", type=positive_int, help="default: the model's")
    parser.add_argument("--infer-model", default="convmixer_1024_20", help="as --train-model")
    parser.add_argument("--infer-batch-size", type=positive_int, default=16)
    parser.add_argument("--infer-image-size", type=positive_int, help="default: the model's")
    parser.add_argument("--dim", type=positive_int, help="override both models' width (smoke runs)")
    parser.add_argument("--depth", type=positive_int, help="override both models' depth (smoke runs)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="float32")
    parser.add_argument("--steps", type=positive_int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    args = parser.parse_args(argv)

    args.what = [part.strip() for part in args.what.split(",") if part.strip()]
    bad = [part for part in args.what if part not in MEASUREMENTS]
    if bad or not args.what:
        parser.error(f"--what takes a comma-separated list of {', '.join(MEASUREMENTS)}, got {bad or 'nothing'}")
    if args.impls is None:
        args.impls = default_impls()
    else:
        args.impls = [impl.strip() for impl in args.impls.split(",") if impl.strip()]
        bad = [impl for impl in args.impls if impl not in BENCH_IMPLS]
        if bad or not args.impls:
            parser.error(f"--impls takes a comma-separated list of {', '.join(BENCH_IMPLS)}, got {bad or 'nothing'}")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    for section in ("train", "infer"):
        try:
            config = model_config(getattr(args, f"{section}_model"), dim=args.dim, depth=args.depth)
        except ValueError as error:
            parser.error(str(error))
        image_size = getattr(args, f"{section}_image_size") or config["default_size"]
        if image_size % config["patch_size"]:
            parser.error(f"--{section}-image-size {image_size} is not a multiple of the patch size "
                         f"{config['patch_size']}")
        setattr(args, section, dict(config=config, batch_size=getattr(args, f"{section}_batch_size"),
                                    image_size=image_size))
    return args


def torch_conv_mixer(config):
    """A timm-style ConvMixer ``nn.Module`` (conv -> act -> BN, residual around the depthwise part)."""
    from torch import nn

    dim, k, p = config["dim"], config["kernel_size"], config["patch_size"]
    act = nn.GELU if config["activation"] == "gelu" else nn.ReLU

    class Residual(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return x + self.fn(x)

    blocks = [
        nn.Sequential(
            Residual(nn.Sequential(nn.Conv2d(dim, dim, k, groups=dim, padding="same"), act(), nn.BatchNorm2d(dim))),
            nn.Conv2d(dim, dim, 1), act(), nn.BatchNorm2d(dim),
        )
        for _ in range(config["depth"])
    ]
    return nn.Sequential(
        nn.Conv2d(3, dim, p, stride=p), act(), nn.BatchNorm2d(dim), *blocks,
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(dim, config["classes"]),
    )


def torch_reference(args):
    """PyTorch records for the same shapes (float32 on CPU): op in NCHW and channels_last, then the models."""
    import platform

    import numpy as np
    import torch
    import torch.nn.functional as F

    device = f"torch:cpu:{platform.processor() or platform.machine()}"
    common = common_fields(precision="float32", steps=args.steps, warmup=args.warmup, backend="pytorch",
                           device=device)
    common["torch_threads"] = torch.get_num_threads()
    layouts = {"pytorch_nchw": torch.contiguous_format, "pytorch_channels_last": torch.channels_last}
    if "op" in args.what:
        shape = args.op_shape
        x, kernel, bias = op_arrays(**shape)
        kt = torch.tensor(kernel, dtype=torch.float32).permute(2, 0, 1)[:, None].contiguous()
        bt = torch.tensor(bias, dtype=torch.float32)
        for name, layout in layouts.items():
            xt = torch.tensor(x, dtype=torch.float32).permute(0, 3, 1, 2).contiguous(memory_format=layout)
            for measurement, backward in (("op_forward", False), ("op_forward_backward", True)):
                def run(backward=backward, xt=xt):
                    tensors = [t.detach().requires_grad_(backward) for t in (xt, kt, bt)]
                    out = F.conv2d(tensors[0], tensors[1], tensors[2], padding="same", groups=shape["dim"])
                    if backward:
                        out.sum().backward()
                    else:
                        out.sum().item()

                with torch.set_grad_enabled(backward):
                    seconds = median_seconds(run, args.steps, args.warmup)
                yield dict(common, depthwise_impl=name, measurement=measurement, ms=1e3 * seconds, **shape)
    for section, measurement in (("train", "train"), ("infer", "inference")):
        if measurement not in args.what:
            continue
        spec = getattr(args, section)
        config, batch, size = spec["config"], spec["batch_size"], spec["image_size"]
        rng = np.random.default_rng(0)
        images = torch.tensor(rng.uniform(0, 1, (batch, 3, size, size)), dtype=torch.float32)
        labels = torch.tensor(rng.integers(0, config["classes"], batch))
        for name, layout in layouts.items():
            torch.manual_seed(0)
            model = torch_conv_mixer(config).to(memory_format=layout)
            inputs = images.contiguous(memory_format=layout)
            if measurement == "train":
                optimizer = torch.optim.AdamW(model.parameters(), 1e-3)

                def step(model=model, inputs=inputs, optimizer=optimizer, labels=labels):
                    model.train()
                    optimizer.zero_grad()
                    loss = F.cross_entropy(model(inputs), labels)
                    loss.backward()
                    optimizer.step()
                    loss.item()
            else:
                def step(model=model, inputs=inputs):
                    model.eval()
                    with torch.inference_mode():
                        model(inputs).sum().item()
            seconds = median_seconds(step, args.steps, args.warmup)
            yield dict(common, depthwise_impl=name, measurement=measurement, model=f"convmixer_{config['dim']}_"
                       f"{config['depth']}", batch_size=batch, dim=config["dim"], depth=config["depth"],
                       kernel_size=config["kernel_size"], patch_size=config["patch_size"], image_size=size,
                       tokens=size // config["patch_size"], images_per_s=batch / seconds, step_ms=1e3 * seconds)


def main(argv=None):
    args = parse_args(argv)
    records = []

    def emit(record):
        records.append(record)
        print(json.dumps(record), flush=True)

    start = time.perf_counter()
    for record in run_benchmarks(
        impls=args.impls, precision=args.precision, steps=args.steps, warmup=args.warmup,
        op=args.op_shape if "op" in args.what else None,
        train=args.train if "train" in args.what else None,
        inference=args.infer if "inference" in args.what else None,
    ):
        emit(record)
    if not args.no_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            emit(dict(backend="pytorch", measurement="skipped", reason="torch is not installed"))
        else:
            for record in torch_reference(args):
                emit(record)
    print(f"\n{summary_table(records)}\n\n(total {time.perf_counter() - start:.0f} s)", flush=True)
    return records


if __name__ == "__main__":
    main()
