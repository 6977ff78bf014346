"""Names that a setting chooses between and that a Keras layer also checks, held below both.

The layers (``initializers``, ``augment``) import Keras, and the settings table must not (``--help`` loads no
framework), so a name list both need lives here rather than in either of them. Resampler names belong to the
image transforms and live in ``data.transforms``, which is Keras-free.
"""

import dataclasses
import os
import re

# Initialisation schemes of the model layers: PyTorch's defaults (the paper's models) or Keras's.
INITIALIZERS = ("torch", "keras")

# The top of each RandAugment magnitude scale: timm's 0-10, torchvision's 31 bins (0-30).
RANDAUG_SCALES = {"timm": 10.0, "torchvision": 30.0}

# A weights spec (``weights=`` / ``--weights``): the settings check it, and so does the loader.
HF_PREFIX = "hf://"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass(frozen=True)
class WeightsSpec:
    """A checked weights spec: ``kind`` is "imagenet", "hub" (``repo``, ``revision``), "keras_weights" (a bare
    ``.weights.h5``, which only a model of the same architecture can load) or "path"."""

    kind: str
    text: str
    repo: str | None = None
    revision: str | None = None


def parse_spec(spec):
    """Check a ``weights=`` / ``--weights`` value and say what kind of source it is (one line otherwise)."""
    if not isinstance(spec, (str, os.PathLike)) or not os.fspath(spec):
        raise ValueError(f"weights must be None, 'imagenet', 'hf://owner/repo' or a path, got {spec!r}.")
    text = os.fspath(spec)
    if text == "imagenet":
        return WeightsSpec("imagenet", text)
    if text.startswith(HF_PREFIX):
        repo, _, revision = text[len(HF_PREFIX) :].partition("@")
        if not _REPO_ID.match(repo) or (revision == "" and "@" in text):
            raise ValueError(f"weights {text!r} is not 'hf://owner/repo' or 'hf://owner/repo@revision'.")
        return WeightsSpec("hub", text, repo, revision or None)
    return WeightsSpec("keras_weights" if text.endswith(".weights.h5") else "path", text)
