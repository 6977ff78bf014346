"""A ConvMixer forward pass in plain NumPy (float64), written from the paper.

Independent of keras_convmixer: it takes weights as NumPy arrays in Keras
layouts and computes inference-mode outputs, so tests can compare our Keras
model against it.
"""

import numpy as np
from scipy.special import erf


def gelu(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def relu(x):
    return np.maximum(x, 0.0)


ACTIVATIONS = {"gelu": gelu, "relu": relu}


def patch_conv(x, kernel, bias):
    """Conv with kernel = stride = p, no padding. kernel: (p, p, cin, cout)."""
    p = kernel.shape[0]
    n, h, w, c = x.shape
    patches = x[:, : h // p * p, : w // p * p].reshape(n, h // p, p, w // p, p, c)
    return np.einsum("nhiwjc,ijcd->nhwd", patches, kernel) + bias


def depthwise_same(x, kernel, bias):
    """Depthwise conv, stride 1, "same" padding (extra pad at the end for even k).

    kernel: (k, k, c, 1) as in Keras.
    """
    k = kernel.shape[0]
    before = (k - 1) // 2
    after = k - 1 - before
    _, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (before, after), (before, after), (0, 0)))
    out = np.zeros_like(x)
    for i in range(k):
        for j in range(k):
            out += padded[:, i : i + h, j : j + w, :] * kernel[i, j, :, 0]
    return out + bias


def batchnorm(x, gamma, beta, mean, var, eps):
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def convmixer_forward(images, params, activation="gelu", eps=1e-5, mean=None, std=None):
    """images: (N, H, W, 3) in [0, 255] if mean/std given, else already normalised.

    params: {"stem": (kernel, bias, bn), "blocks": [(dw_k, dw_b, dw_bn, pw_k, pw_b, pw_bn)],
    "head": (kernel, bias) or None}; each bn is (gamma, beta, mean, var).
    Returns logits (or the pooled features without a head).
    """
    act = ACTIVATIONS[activation]
    x = np.asarray(images, np.float64)
    if mean is not None:
        x = (x / 255.0 - np.asarray(mean)) / np.asarray(std)
    kernel, bias, bn = params["stem"]
    x = batchnorm(act(patch_conv(x, kernel, bias)), *bn, eps)
    for dw_k, dw_b, dw_bn, pw_k, pw_b, pw_bn in params["blocks"]:
        x = x + batchnorm(act(depthwise_same(x, dw_k, dw_b)), *dw_bn, eps)
        x = batchnorm(act(np.einsum("nhwc,cd->nhwd", x, pw_k[0, 0]) + pw_b), *pw_bn, eps)
    pooled = x.mean(axis=(1, 2))
    if params.get("head") is None:
        return pooled
    head_k, head_b = params["head"]
    return pooled @ head_k + head_b
