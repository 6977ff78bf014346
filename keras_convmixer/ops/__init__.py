"""Custom ops: a depthwise convolution with fast JAX paths (XLA shift-and-add, Pallas)."""

from keras_convmixer.ops.depthwise import AUTO_IMPL, IMPLS, depthwise_conv2d, resolve_impl

__all__ = ["AUTO_IMPL", "IMPLS", "depthwise_conv2d", "resolve_impl"]
