"""Real torchvision and timm for reference checks, or a pytest skip when they are not installed.

torchvision's wheel next to a CPU-only torch fails to import (``operator torchvision::nms does not
exist``): its import registers kernels for two ops whose schemas live in the compiled extension.
Declaring those two schemas first lets the pure-Python parts (transforms, timm's models and data
pipeline) import and run; nothing used here calls them.
"""

import functools
import glob
import importlib.util
import os

import pytest

_LIBRARY = None  # the torch.library.Library must stay alive for the declared schemas to stay registered


@functools.lru_cache(maxsize=1)
def _import():
    global _LIBRARY
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or importlib.util.find_spec("timm") is None:
        raise ImportError("torchvision and timm are needed")
    extension = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so"))
    try:
        # A torchvision built for this torch registers its ops itself.
        torch.ops.load_library(extension[0])
    except (OSError, RuntimeError, IndexError):
        _LIBRARY = torch.library.Library("torchvision", "DEF")
        _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import timm
    import torchvision

    return torch, torchvision, timm


def import_vision():
    """``(torch, torchvision, timm)``, importing them safely; raises ImportError when one is missing."""
    return _import()


def vision_or_skip():
    """``(torch, torchvision, timm)`` or ``pytest.skip`` when any of them is not installed."""
    pytest.importorskip("torch")
    pytest.importorskip("PIL")
    try:
        return _import()
    except ImportError as err:
        pytest.skip(f"torchvision/timm not installed: {err}")
