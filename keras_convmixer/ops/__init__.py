"""Custom ops: a depthwise convolution with a fast JAX Pallas path."""

from keras_convmixer.ops.depthwise import IMPLS, depthwise_conv2d, resolve_impl

__all__ = ["IMPLS", "depthwise_conv2d", "resolve_impl"]
