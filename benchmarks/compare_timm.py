"""Compare converted real timm ConvMixers with timm itself (for a machine with timm).

Builds ``timm.create_model(name)`` (random init, BN statistics randomised so
that they matter), saves its state dict as safetensors, converts it with
``keras_convmixer.convert`` and compares logits on random images in eval mode.
Meant for the GPU machine, with our library on JAX:

    KERAS_BACKEND=jax python scripts/compare_timm.py --models convmixer_768_32 convmixer_1536_20 \
        --report timm_compare.json

Exits 0 with a "SKIPPED" line when timm (or torch) cannot be imported, 1 when
a model differs by more than --atol, 2 on bad arguments.
"""

import argparse
import json
import os
import tempfile
import time


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["convmixer_768_32", "convmixer_1536_20"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument(
        "--atol", type=float, default=1e-3, help="max |logit difference| (float32 through 20-32 blocks; default 1e-3)"
    )
    parser.add_argument("--report", help="write the JSON results here")
    return parser


def compare_one(name, batch_size, image_size, seed=0):
    import keras
    import numpy as np
    import timm
    import torch
    from safetensors.torch import save_file

    from keras_convmixer import conversion, presets

    torch.manual_seed(seed)
    reference = timm.create_model(name, pretrained=False).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(c, generator=generator) * 0.1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
        model, arch = conversion.build_from_checkpoint(path, variant=name, image_size=image_size)

    pixels = np.random.default_rng(seed).uniform(0, 255, (batch_size, image_size, image_size, 3)).astype("float32")
    preset = presets.eval_transform(arch["variant"])
    mean = np.array(preset["mean"], "float32") * 255.0
    std = np.array(preset["std"], "float32") * 255.0
    # timm takes normalised NCHW input; our model normalises raw pixels itself.
    normalised = torch.from_numpy(np.ascontiguousarray(((pixels - mean) / std).transpose(0, 3, 1, 2)))
    with torch.no_grad():
        expected = reference(normalised).numpy()
    start = time.perf_counter()
    got = keras.ops.convert_to_numpy(model(pixels, training=False))
    seconds = time.perf_counter() - start
    diff = np.abs(got - expected)
    return {
        "model": name,
        "detected": {k: arch[k] for k in ("dim", "depth", "kernel_size", "patch_size", "classes", "activation")},
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_logit": float(np.abs(expected).max()),
        "same_top1": bool((got.argmax(-1) == expected.argmax(-1)).all()),
        "keras_backend": keras.backend.backend(),
        "keras_forward_seconds_incl_compile": round(seconds, 3),
    }


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from keras_convmixer.errors import first_line

    try:
        from keras_convmixer.convert import CheckpointError
    except ImportError as err:  # an unknown KERAS_BACKEND, a missing package: one line, not a traceback
        parser.exit(2, f"{parser.prog}: error: {first_line(err)}\n")
    try:
        # The tests' importer: it lets timm load where torchvision's compiled extension does not fit the torch.
        from tests.vision_reference import import_vision

        torch = import_vision()[0]
    except Exception as err:  # timm fails with errors other than ImportError when torchvision is broken
        print(f"SKIPPED: timm/torch not importable here ({type(err).__name__}: {first_line(err)[:200]})")
        return 0
    # Full float32 on GPUs (TF32 would add ~1e-3 noise on both sides).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
    except ImportError:
        pass

    results = []
    for name in args.models:
        try:
            results.append(compare_one(name, args.batch_size, args.image_size))
        except (CheckpointError, ValueError, RuntimeError) as err:
            parser.exit(2, f"{parser.prog}: error: {name}: {first_line(err)}\n")
        print(json.dumps(results[-1]))
    if args.report:
        with open(args.report, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if all(r["max_abs_diff"] <= args.atol for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
