"""Host input-pipeline throughput beside a torchvision/timm DataLoader.

Kept for ``python scripts/benchmark_input.py``; the code is in benchmarks/benchmark_input.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_convmixer.cli.common import load_main  # noqa: E402  (after the path is set)

# An unknown KERAS_BACKEND or a missing package: one line and exit 2, like a bad flag.
main = load_main("benchmarks.benchmark_input", __file__)

if __name__ == "__main__":
    sys.exit(main())
