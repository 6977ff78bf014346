"""Evaluate a model on a data split (the ``convmixer-evaluate`` command).

Kept for ``python scripts/evaluate.py``; the code is in keras_convmixer/cli/evaluate.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_convmixer.cli.common import load_main  # noqa: E402  (after the path is set)

# An unknown KERAS_BACKEND or a missing package: one line and exit 2, like a bad flag.
main = load_main("keras_convmixer.cli.evaluate", __file__)

if __name__ == "__main__":
    sys.exit(main())
