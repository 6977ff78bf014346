"""Independent PyTorch ConvMixers written from the spec (REFERENCE.md), not tests.

``timm_convmixer`` uses timm's module layout, so its ``state_dict()`` has
timm's parameter names; ``official_convmixer`` is the paper's flat
``nn.Sequential``. Both take raw [0, 255] NCHW pixels and normalise first,
as our Keras models do.
"""

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _modules():
    import torch
    from torch import nn

    class Residual(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return self.fn(x) + x

    class Normalize(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0, persistent=False)

        def forward(self, x):
            return (x - self.mean) / self.std

    return torch, nn, Residual, Normalize


def _act(nn, activation):
    return nn.GELU() if activation == "gelu" else nn.ReLU()


def _block(nn, Residual, dim, kernel, activation):
    return nn.Sequential(
        Residual(
            nn.Sequential(
                nn.Conv2d(dim, dim, kernel, groups=dim, padding="same"),
                _act(nn, activation),
                nn.BatchNorm2d(dim),
            )
        ),
        nn.Conv2d(dim, dim, 1),
        _act(nn, activation),
        nn.BatchNorm2d(dim),
    )


def timm_convmixer(dim, depth, kernel, patch, classes, activation="gelu", normalize=True):
    """``normalize=False`` gives timm's own interface (normalised input)."""
    torch, nn, Residual, Normalize = _modules()

    class ConvMixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.normalize = Normalize() if normalize else nn.Identity()
            self.stem = nn.Sequential(nn.Conv2d(3, dim, patch, stride=patch), _act(nn, activation), nn.BatchNorm2d(dim))
            self.blocks = nn.Sequential(*[_block(nn, Residual, dim, kernel, activation) for _ in range(depth)])
            self.head = nn.Linear(dim, classes)

        def forward(self, x):
            x = self.blocks(self.stem(self.normalize(x)))
            return self.head(x.mean(dim=(2, 3)))

    return _randomized(torch, nn, ConvMixer())


def official_convmixer(dim, depth, kernel, patch, classes, activation="gelu"):
    torch, nn, Residual, Normalize = _modules()
    body = nn.Sequential(
        nn.Conv2d(3, dim, patch, stride=patch),
        _act(nn, activation),
        nn.BatchNorm2d(dim),
        *[_block(nn, Residual, dim, kernel, activation) for _ in range(depth)],
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(dim, classes),
    )
    model = nn.Sequential(Normalize(), body)
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
