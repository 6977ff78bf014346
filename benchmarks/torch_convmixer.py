"""The paper's ConvMixer as a plain PyTorch ``nn.Sequential``, with PyTorch's default initialisation: the
reference side of the speed benchmark and of the recipe-parity run. Imports no Keras."""


def torch_convmixer(dim, depth, kernel_size, patch_size, classes=10, activation="gelu"):
    """conv -> act -> BN stem; blocks of a residual depthwise conv -> act -> BN and a pointwise conv -> act -> BN;
    average pool and a linear head. Takes normalised NCHW input, like timm's models."""
    from torch import nn

    class Residual(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return self.fn(x) + x

    act = {"gelu": nn.GELU, "relu": nn.ReLU}[activation]
    blocks = [
        nn.Sequential(
            Residual(
                nn.Sequential(nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"), act(), nn.BatchNorm2d(dim))
            ),
            nn.Conv2d(dim, dim, kernel_size=1),
            act(),
            nn.BatchNorm2d(dim),
        )
        for _ in range(depth)
    ]
    return nn.Sequential(
        nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size),
        act(),
        nn.BatchNorm2d(dim),
        *blocks,
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(dim, classes),
    )
