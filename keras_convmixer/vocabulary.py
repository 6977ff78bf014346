"""Names that a setting chooses between and that a Keras layer also checks, held below both.

The layers (``initializers``, ``augment``) import Keras, and the settings table must not (``--help`` loads no
framework), so a name list both need lives here rather than in either of them. Resampler names belong to the
image transforms and live in ``data.transforms``, which is Keras-free.
"""

# Initialisation schemes of the model layers: PyTorch's defaults (the paper's models) or Keras's.
INITIALIZERS = ("torch", "keras")

# The top of each RandAugment magnitude scale: timm's 0-10, torchvision's 31 bins (0-30).
RANDAUG_SCALES = {"timm": 10.0, "torchvision": 30.0}
