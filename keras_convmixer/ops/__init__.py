"""Custom ops: a depthwise convolution with fast JAX paths (XLA shift-and-add, Pallas)."""

from keras_convmixer.ops.depthwise import IMPLS, depthwise_conv2d, resolve_impl
from keras_convmixer.ops.tuning import AUTO_IMPL

__all__ = ["AUTO_IMPL", "IMPLS", "depthwise_conv2d", "resolve_impl"]
