"""Throughput of the depthwise op and of ConvMixer, per depthwise_impl, beside PyTorch (``make bench``).

Kept for ``python scripts/benchmark.py``; the code is in benchmarks/benchmark.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_convmixer.cli.common import load_main  # noqa: E402  (after the path is set)

# An unknown KERAS_BACKEND or a missing package: one line and exit 2, like a bad flag.
main = load_main("benchmarks.benchmark", __file__)

if __name__ == "__main__":
    main()
