"""Measurements that are not tests: throughput of the model and the depthwise op (``benchmark``), of the host
input pipeline (``benchmark_input``), converted timm models against timm (``compare_timm``), and the CIFAR-10
recipe against the official PyTorch one (``recipe_parity``). Each module runs as ``python -m benchmarks.<name>``
from the repository root, or through its ``scripts/`` front end."""
