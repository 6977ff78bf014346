"""Independent PyTorch ConvMixers for the tests, not tests.

Both are the benchmarks' spec-written ``torch_convmixer`` (the paper's flat ``nn.Sequential``):
``official_convmixer`` as it is, ``timm_convmixer`` with its layers regrouped in timm's module
layout, so its ``state_dict()`` has timm's parameter names. Both take raw [0, 255] NCHW pixels and
normalise first, as our Keras models do, and carry non-trivial BatchNorm statistics.
"""

import numpy as np

from benchmarks.torch_convmixer import torch_convmixer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _normalize():
    import torch
    from torch import nn

    class Normalize(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0, persistent=False)

        def forward(self, x):
            return (x - self.mean) / self.std

    return Normalize()


def timm_convmixer(dim, depth, kernel, patch, classes, activation="gelu", normalize=True):
    """``normalize=False`` gives timm's own interface (normalised input)."""
    import torch
    from torch import nn

    # The paper's layers, regrouped under timm's names: stem (3 layers), blocks, head.
    layers = list(torch_convmixer(dim, depth, kernel, patch, classes, activation))

    class ConvMixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.normalize = _normalize() if normalize else nn.Identity()
            self.stem = nn.Sequential(*layers[:3])
            self.blocks = nn.Sequential(*layers[3 : 3 + depth])
            self.head = layers[-1]

        def forward(self, x):
            x = self.blocks(self.stem(self.normalize(x)))
            return self.head(x.mean(dim=(2, 3)))

    return _randomized(torch, nn, ConvMixer())


def official_convmixer(dim, depth, kernel, patch, classes, activation="gelu"):
    import torch
    from torch import nn

    body = torch_convmixer(dim, depth, kernel, patch, classes, activation)
    model = nn.Sequential(_normalize(), body)
    _randomized(torch, nn, model)
    return model, body


def _randomized(torch, nn, model, seed=0):
    """Non-trivial BN statistics (fresh BN is the identity in eval mode)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                module.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                module.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
    return model.eval()


def torch_logits(model, images_nhwc):
    import torch

    x = torch.from_numpy(np.ascontiguousarray(np.transpose(images_nhwc, (0, 3, 1, 2)), dtype=np.float32))
    with torch.no_grad():
        return model(x).numpy()
