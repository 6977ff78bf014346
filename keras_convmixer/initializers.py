"""PyTorch's default initialisation as serializable Keras initialisers.

ConvMixer's published results were trained from PyTorch's defaults, which
differ a lot from Keras's ``glorot_uniform``/``zeros``: ``nn.Conv2d`` and
``nn.Linear`` draw weights with ``kaiming_uniform_(a=sqrt(5))`` and biases
from the same range, U(+-1/sqrt(fan_in)), where fan_in counts the inputs of one
output unit (in_channels / groups * kh * kw; in_features for Linear).

Keras hands an initialiser nothing but the shape it fills, so:

* ``TorchKernelUniform(layout)`` reads fan_in from a kernel shape, given the
  Keras layout it is for (a depthwise kernel's channel axis is not an input
  of each output, unlike a Conv2D's);
* ``TorchUniform(fan_in)`` is told fan_in, as a bias vector does not carry it.
"""

import math

import keras

# The scheme names live below this module: the settings table offers them without importing Keras.
from keras_convmixer.vocabulary import INITIALIZERS

KERNEL_LAYOUTS = ("conv", "depthwise", "dense")


def validate_initializer(initializer):
    """Return ``initializer`` if it is a known scheme name, else raise a one-line ValueError."""
    if not isinstance(initializer, str) or initializer not in INITIALIZERS:
        raise ValueError(f"initializer must be one of {INITIALIZERS}, got {initializer!r}.")
    return initializer


def _check_fan_in(fan_in):
    if isinstance(fan_in, bool) or not isinstance(fan_in, int) or fan_in < 1:
        raise ValueError(f"fan_in must be a positive integer, got {fan_in!r}.")
    return fan_in


class _TorchRandom(keras.initializers.RandomUniform):
    """Keras's seed handling (int, ``SeedGenerator``, ``None``, serialisation) for our bounds."""

    def _draw(self, shape, bound, dtype):
        return keras.random.uniform(shape, minval=-bound, maxval=bound, dtype=dtype, seed=self.seed)

    def _seed_config(self):
        return {"seed": super().get_config()["seed"]}


@keras.saving.register_keras_serializable(package="keras_convmixer")
class TorchUniform(_TorchRandom):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for any shape: PyTorch's bias initialisation.

    ``fan_in`` must be the fan_in of the weight the bias belongs to.
    As with Keras's own random initialisers, one instance with a fixed or no
    ``seed`` returns the same values at every call: give each variable its own.
    """

    def __init__(self, fan_in, seed=None):
        self.fan_in = _check_fan_in(fan_in)
        bound = 1.0 / math.sqrt(self.fan_in)
        super().__init__(minval=-bound, maxval=bound, seed=seed)

    def __call__(self, shape, dtype=None):
        return self._draw(shape, self.maxval, dtype)

    def get_config(self):
        return {"fan_in": self.fan_in, **self._seed_config()}


@keras.saving.register_keras_serializable(package="keras_convmixer")
class TorchKernelUniform(_TorchRandom):
    """PyTorch's ``kaiming_uniform_(a=sqrt(5))`` for a Keras kernel: U(+-1/sqrt(fan_in)).

    ``layout`` says how fan_in is read from the Keras kernel shape:

    * ``"conv"``: ``Conv2D`` kernel (kh, kw, in, out), fan_in = kh * kw * in;
    * ``"depthwise"``: ``DepthwiseConv2D`` kernel (kh, kw, channels, multiplier),
      fan_in = kh * kw, as for ``nn.Conv2d(..., groups=channels)``;
    * ``"dense"``: ``Dense`` kernel (in, out), fan_in = in.
    """

    def __init__(self, layout="conv", seed=None):
        if layout not in KERNEL_LAYOUTS:
            raise ValueError(f"layout must be one of {KERNEL_LAYOUTS}, got {layout!r}.")
        self.layout = layout
        super().__init__(seed=seed)

    def fan_in(self, shape):
        shape = tuple(int(d) for d in shape)
        rank = {"conv": 4, "depthwise": 4, "dense": 2}[self.layout]
        if len(shape) != rank:
            raise ValueError(
                f"A {self.layout!r} kernel has rank {rank}, got shape {shape}: "
                "pick the layout of the layer it initialises."
            )
        # Channels (depthwise) and outputs (all layouts) are not inputs of one output unit.
        spatial_and_inputs = shape[:-2] if self.layout == "depthwise" else shape[:-1]
        return max(1, math.prod(spatial_and_inputs))

    def __call__(self, shape, dtype=None):
        return self._draw(shape, 1.0 / math.sqrt(self.fan_in(shape)), dtype)

    def get_config(self):
        return {"layout": self.layout, **self._seed_config()}


def conv_initializers(initializer, fan_in):
    """``Conv2D`` keyword arguments for the scheme; ``fan_in`` = kh * kw * in_channels."""
    if validate_initializer(initializer) == "keras":
        return {}
    return {"kernel_initializer": TorchKernelUniform("conv"), "bias_initializer": TorchUniform(fan_in)}


def depthwise_initializers(initializer, kernel_size):
    """``DepthwiseConv2D`` keyword arguments for the scheme."""
    if validate_initializer(initializer) == "keras":
        return {}
    fan_in = int(kernel_size) ** 2
    return {"depthwise_initializer": TorchKernelUniform("depthwise"), "bias_initializer": TorchUniform(fan_in)}


def dense_initializers(initializer, in_features):
    """``Dense`` keyword arguments for the scheme."""
    if validate_initializer(initializer) == "keras":
        return {}
    return {"kernel_initializer": TorchKernelUniform("dense"), "bias_initializer": TorchUniform(int(in_features))}
