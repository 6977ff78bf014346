"""The small NumPy-like namespaces every augmentation is written against, and the random rules they share.

Each op is written once: ``keras_namespace()`` runs it on the backend's tensors (inside the train step),
``tf_namespace()`` on TensorFlow's (inside ``tf.data``, under any Keras backend). TensorFlow is imported
lazily, only by ``tf_namespace``.
"""

import functools
import math
import types

from keras import ops

from keras_convmixer.tf_import import import_tf

# The ops keras.ops and TensorFlow both offer under the name the augmentations call them by; the rest are
# mapped one by one in each namespace.
_SAME_NAMED = (
    "cast",
    "floor",
    "round",
    "minimum",
    "maximum",
    "where",
    "abs",
    "cos",
    "sin",
    "exp",
    "sqrt",
    "reshape",
    "expand_dims",
    "zeros_like",
    "ones_like",
    "logical_or",
    "logical_and",
    "equal",
)


def _same_named(module):
    return {name: getattr(module, name) for name in _SAME_NAMED}


def keras_namespace():
    """``keras.ops`` under the names the ops use (the device path)."""

    def batch_size(x):
        return ops.shape(x)[0]

    def segment_sum(data, ids, count):
        return ops.segment_sum(data, ids, num_segments=count)

    def take_rows(x, idx):
        return ops.take(x, idx, axis=0)

    return types.SimpleNamespace(
        name="keras",
        int32="int32",
        float32="float32",
        **_same_named(ops),
        clip=ops.clip,
        sum=ops.sum,
        min=ops.min,
        max=ops.max,
        cumsum=ops.cumsum,
        stack=ops.stack,
        concatenate=ops.concatenate,
        arange=ops.arange,
        take=ops.take,
        floor_divide=ops.floor_divide,
        convert=ops.convert_to_tensor,
        searchsorted=ops.searchsorted,
        batch_size=batch_size,
        segment_sum=segment_sum,
        take_rows=take_rows,
    )


@functools.lru_cache(maxsize=1)
def tf_namespace():
    """The same functions as TensorFlow ops (the host path, in ``tf.data`` under any Keras backend)."""
    tf = import_tf()

    # Named functions, not lambdas: tf.data's autograph reads their source.
    def reduce(fn):
        def reduced(x, axis=None, keepdims=False):
            return fn(x, axis=axis, keepdims=keepdims)

        return reduced

    def cumsum(x, axis=None):
        return tf.cumsum(x, axis=axis)

    def stack(xs, axis=0):
        return tf.stack(xs, axis=axis)

    def concatenate(xs, axis=0):
        return tf.concat(xs, axis)

    def arange(*args, dtype=None):
        return tf.range(*args, dtype=dtype or tf.int32)

    def searchsorted(sequence, values):
        return tf.searchsorted(sequence, values)

    def batch_size(x):
        return tf.shape(x)[0]

    return types.SimpleNamespace(
        name="tf",
        int32=tf.int32,
        float32=tf.float32,
        **_same_named(tf),
        clip=tf.clip_by_value,
        sum=reduce(tf.reduce_sum),
        min=reduce(tf.reduce_min),
        max=reduce(tf.reduce_max),
        cumsum=cumsum,
        stack=stack,
        concatenate=concatenate,
        arange=arange,
        take=tf.gather,
        floor_divide=tf.math.floordiv,
        convert=tf.convert_to_tensor,
        searchsorted=searchsorted,
        batch_size=batch_size,
        segment_sum=tf.math.unsorted_segment_sum,
        take_rows=tf.gather,
    )


def box_muller(u1, u2):
    """Standard normals from two uniforms in [0, 1) (keras.ops).

    The device paths draw every random number in one ``keras.random.uniform`` call: on JAX each call
    compiles its own generator (seconds on a CPU), so normals are made from uniforms.
    """
    return ops.sqrt(-2.0 * ops.log(1.0 - u1)) * ops.cos((2.0 * math.pi) * u2)


def first_fit(xp, h, w, fits):
    """The box of the first attempt that fits, per row: ``h``, ``w``, ``fits`` are (B, attempts).

    Returns float ``(h, w, found)``, each (B,); ``h`` and ``w`` are 0 where no attempt fits. This is the
    ``for attempt in range(10): ... if fits: return`` loop of timm's crop and erasing, vectorised
    (argmax's tie-break is not guaranteed on every backend, so the first hit is found by a running count).
    """
    fits_f = xp.where(fits, 1.0, 0.0)
    first = xp.logical_and(fits, xp.equal(xp.cumsum(fits_f, axis=1), 1.0))
    found = xp.max(fits_f, axis=1) > 0.0
    return xp.sum(xp.where(first, h, 0.0), axis=1), xp.sum(xp.where(first, w, 0.0), axis=1), found


def random_corner(xp, u, size, extent):
    """``random.randint(0, size - extent)`` from a uniform ``u`` in [0, 1): a start offset along one side."""
    return xp.minimum(xp.floor(u * (size - extent + 1.0)), size - extent)
