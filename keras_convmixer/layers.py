"""ConvMixer's two building blocks as serializable Keras layers.

Order inside every unit is conv -> activation -> BatchNorm, as in the paper.
Sublayer names are fixed ("conv", "bn", "depthwise", "dw_bn", "pointwise",
"pw_bn") because weight conversion maps checkpoint tensors onto them.
"""

import math

import keras
from keras import layers, ops

from keras_convmixer.initializers import (
    conv_initializers,
    depthwise_initializers,
    validate_initializer,
)
from keras_convmixer.ops.depthwise import depthwise_conv2d, resolve_impl, validate_impl

# PyTorch's BatchNorm2d defaults, expressed in Keras's momentum convention.
# Converted checkpoints only reproduce PyTorch's logits with these.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

_SQRT_HALF = 1.0 / math.sqrt(2.0)


def gelu_erf(x):
    """Exact GELU, as PyTorch's ``nn.GELU()``.

    Written with ``erf`` rather than ``keras.activations.gelu`` because the
    latter exports from TensorFlow as an ``Erfc`` op that onnxruntime rejects.
    """
    return 0.5 * x * (1.0 + ops.erf(x * _SQRT_HALF))


def get_activation(activation):
    """Resolve an activation name; ``"gelu"`` means the exact (erf) form."""
    if callable(activation):
        return activation
    if activation == "gelu":
        return gelu_erf
    try:
        return keras.activations.get(activation)
    except ValueError:
        raise ValueError(
            f"Unknown activation {activation!r}: use 'gelu', 'relu' or any name keras.activations.get accepts."
        ) from None


def _serialize_activation(activation):
    if activation is gelu_erf:
        return "gelu"
    if callable(activation):
        return keras.activations.serialize(activation)
    return activation


def _spatial_size_error(name, size, patch_size):
    return ValueError(
        f"Input {name} {size} is not divisible by the patch size {patch_size}: "
        f"use a multiple of {patch_size} (e.g. {size - size % patch_size or patch_size})."
    )


@keras.saving.register_keras_serializable(package="keras_convmixer")
class PatchEmbed(layers.Layer):
    """Patch embedding: ``Conv2D(dim, p, stride p) -> activation -> BN``.

    ``initializer="torch"`` (default) draws the conv's kernel and bias as
    PyTorch's ``nn.Conv2d`` does, U(+-1/sqrt(in_channels * p * p)), which the
    published results were trained from; ``"keras"`` keeps Keras's
    ``glorot_uniform``/``zeros``. BatchNorm starts at gamma=1, beta=0 either way.
    """

    def __init__(
        self,
        dim,
        patch_size,
        activation="gelu",
        bn_momentum=BN_MOMENTUM,
        bn_epsilon=BN_EPSILON,
        initializer="torch",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.patch_size = int(patch_size)
        self.initializer = validate_initializer(initializer)
        self.activation = _serialize_activation(activation)
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        self._act = get_activation(activation)
        self.conv = layers.Conv2D(
            self.dim,
            self.patch_size,
            strides=self.patch_size,
            data_format="channels_last",
            dtype=self.dtype_policy,
            name="conv",
            # The bias's fan_in counts input channels: RGB until build() sees the input.
            **conv_initializers(self.initializer, fan_in=3 * self.patch_size**2),
        )
        self.bn = layers.BatchNormalization(
            momentum=bn_momentum, epsilon=bn_epsilon, dtype=self.dtype_policy, name="bn"
        )

    def build(self, input_shape):
        for axis, name in ((1, "height"), (2, "width")):
            size = input_shape[axis]
            if size is not None and size % self.patch_size:
                raise _spatial_size_error(name, size, self.patch_size)
        if self.initializer == "torch" and input_shape[-1] is not None:
            fan_in = int(input_shape[-1]) * self.patch_size**2
            self.conv.bias_initializer = conv_initializers("torch", fan_in)["bias_initializer"]
        self.conv.build(input_shape)
        self.bn.build(self.compute_output_shape(input_shape))

    def call(self, inputs, training=None):
        return self.bn(self._act(self.conv(inputs)), training=training)

    def compute_output_shape(self, input_shape):
        p = self.patch_size

        def shrink(size):
            return None if size is None else size // p

        return (input_shape[0], shrink(input_shape[1]), shrink(input_shape[2]), self.dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            dim=self.dim,
            patch_size=self.patch_size,
            activation=self.activation,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            initializer=self.initializer,
        )
        return config


@keras.saving.register_keras_serializable(package="keras_convmixer")
class ConvMixerBlock(layers.Layer):
    """One ConvMixer block.

    ``x = x + BN(act(DepthwiseConv(k, "same")(x)))`` then
    ``x = BN(act(Conv2D(1x1)(x)))``; the residual wraps only the depthwise part.

    ``depthwise_impl`` picks how the depthwise convolution runs (see
    ``keras_convmixer.ops.depthwise``): ``"keras"`` calls the ``depthwise``
    sublayer, ``"xla"`` (JAX: shifted multiply-adds with hand-written gradients)
    and ``"fast"`` (JAX: the Pallas kernel) run on that sublayer's kernel and
    bias, and ``"auto"`` takes the implementation measured fastest on this
    backend and platform. Weights and names are the same, so checkpoints are
    interchangeable.

    ``initializer="torch"`` (default) draws both convs' kernels and biases as
    PyTorch's ``nn.Conv2d`` does, U(+-1/sqrt(fan_in)) with fan_in = k * k for
    the depthwise conv (``groups=dim``) and ``dim`` for the pointwise one;
    ``"keras"`` keeps Keras's ``glorot_uniform``/``zeros``.
    """

    def __init__(
        self,
        dim,
        kernel_size,
        activation="gelu",
        bn_momentum=BN_MOMENTUM,
        bn_epsilon=BN_EPSILON,
        depthwise_impl="auto",
        initializer="torch",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.kernel_size = int(kernel_size)
        self.initializer = validate_initializer(initializer)
        # "fast" where it cannot run fails here, not at the first call.
        resolve_impl(validate_impl(depthwise_impl))
        self.depthwise_impl = depthwise_impl
        self.activation = _serialize_activation(activation)
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        self._act = get_activation(activation)
        policy = self.dtype_policy
        self.depthwise = layers.DepthwiseConv2D(
            self.kernel_size,
            padding="same",
            data_format="channels_last",
            dtype=policy,
            name="depthwise",
            **depthwise_initializers(self.initializer, self.kernel_size),
        )
        self.dw_bn = layers.BatchNormalization(momentum=bn_momentum, epsilon=bn_epsilon, dtype=policy, name="dw_bn")
        self.pointwise = layers.Conv2D(
            self.dim,
            1,
            data_format="channels_last",
            dtype=policy,
            name="pointwise",
            **conv_initializers(self.initializer, fan_in=self.dim),
        )
        self.pw_bn = layers.BatchNormalization(momentum=bn_momentum, epsilon=bn_epsilon, dtype=policy, name="pw_bn")

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is not None and channels != self.dim:
            raise ValueError(
                f"ConvMixerBlock(dim={self.dim}) got an input with {channels} channels; the residual needs them equal."
            )
        for sublayer in (self.depthwise, self.dw_bn, self.pointwise, self.pw_bn):
            sublayer.build(input_shape)

    def call(self, inputs, training=None):
        impl = resolve_impl(self.depthwise_impl)
        if impl == "keras":
            depthwise_out = self.depthwise(inputs)
        else:
            # The sublayer's own kernel and bias variables, run by the chosen implementation.
            dw = self.depthwise
            depthwise_out = depthwise_conv2d(inputs, dw.kernel, dw.bias, impl=impl)
        mixed = self.dw_bn(self._act(depthwise_out), training=training)
        x = inputs + mixed
        return self.pw_bn(self._act(self.pointwise(x)), training=training)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            dim=self.dim,
            kernel_size=self.kernel_size,
            activation=self.activation,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            depthwise_impl=self.depthwise_impl,
            initializer=self.initializer,
        )
        return config
