"""The SavedModel writer of ``export``: the ``serve``, ``serve_features`` and ``serve_preprocessed``
signatures (described in ``export``), from the TF or JAX backend.

The model part is exported by Keras (jax2tf under JAX); preprocessing and top-k are TensorFlow ops
wrapped around it, which avoids JAX's top_k composite that TF cannot load.
"""

import contextlib

import keras

from keras_convmixer.artifacts import logits_model

TOP_K = 5
# Under JAX the model part is exported for a fixed batch and the signatures
# loop over chunks of it: with a symbolic batch, the StableHLO that jax2tf
# writes for erf keeps dynamic shapes that TF 2.21 refuses to compile.
JAX_EXPORT_BATCH = 8


class ExportBackendError(RuntimeError):
    """The current Keras backend cannot write this format."""


def require_backend(fmt, allowed=("tensorflow", "jax")):
    backend = keras.backend.backend()
    if backend not in allowed:
        raise ExportBackendError(
            f"{fmt} export does not work from the {backend} backend: rerun with "
            f"KERAS_BACKEND={allowed[-1]} (or {' / '.join(allowed[:-1]) or allowed[-1]}); "
            "the .keras file is backend-independent."
        )


def export_saved_model(bundle, output, verbose=False):
    """Write a SavedModel with the ``serve``, ``serve_features`` and ``serve_preprocessed`` signatures."""
    require_backend("SavedModel")
    with _stablehlo_readable_by_tensorflow():
        return _write_saved_model(bundle, output, verbose)


def _write_saved_model(bundle, output, verbose):
    import tensorflow as tf

    from keras_convmixer.data.tf_pipeline import eval_transform

    model = bundle.model
    size, crop_pct, interpolation = bundle.image_size, bundle.crop_pct, bundle.interpolation
    k = min(TOP_K, bundle.num_classes)
    core = logits_model(model)

    def model_outputs(images):
        logits, features = core(images, training=False)
        return {"logits": logits, "features": features}

    archive = keras.export.ExportArchive()
    archive.track(model)
    if keras.backend.backend() == "tensorflow":
        any_batch_fn = model_outputs
    else:
        fixed_fn = archive.add_endpoint(
            "serve_fixed_batch",
            model_outputs,
            input_signature=[keras.InputSpec(shape=(JAX_EXPORT_BATCH, size, size, 3), dtype="float32")],
        )
        any_batch_fn = _batch_any_size(tf, fixed_fn, JAX_EXPORT_BATCH, size, bundle.num_classes, _feature_dim(core))
    model_fn = _empty_batch_safe(tf, any_batch_fn, size, bundle.num_classes, _feature_dim(core))
    archive.add_endpoint("serve_preprocessed", model_fn)

    # Rank unknown on purpose: a loaded signature does not check shapes and TF folds a
    # rank check away when the rank is declared, so the checks below run on the real input.
    image_spec = tf.TensorSpec(shape=None, dtype=tf.uint8, name="images")
    crop_spec = tf.TensorSpec(shape=(size, size, 3), dtype=tf.float32)

    def transform(images):
        return tf.map_fn(
            lambda image: eval_transform(image, size, crop_pct, interpolation), images, fn_output_signature=crop_spec
        )

    def check(images):
        rank_ok = tf.debugging.assert_equal(
            tf.rank(images), 4, message="images must be a uint8 batch of rank 4: [N, H, W, 3]"
        )
        with tf.control_dependencies([rank_ok]):
            channels_ok = tf.debugging.assert_equal(
                tf.shape(images)[-1], 3, message="images must have 3 (RGB) channels: uint8 [N, H, W, 3]"
            )
        with tf.control_dependencies([channels_ok]):
            return tf.ensure_shape(tf.identity(images), [None, None, None, 3])

    @tf.function(input_signature=[image_spec])
    def serve(images):
        logits = model_fn(transform(check(images)))["logits"]
        probabilities = tf.nn.softmax(logits, axis=-1)
        scores, classes = tf.math.top_k(probabilities, k=k)
        return {"probabilities": probabilities, "top5_classes": classes, "top5_scores": scores}

    @tf.function(input_signature=[image_spec])
    def serve_features(images):
        return {"features": model_fn(transform(check(images)))["features"]}

    archive.add_endpoint("serve", serve)
    archive.add_endpoint("serve_features", serve_features)
    archive.add_endpoint("serving_default", serve)
    archive.write_out(output, verbose=verbose)
    return {
        "serve": {"images": "uint8 [N, H, W, 3]", "returns": ["probabilities", "top5_classes", "top5_scores"]},
        "serve_features": {"images": "uint8 [N, H, W, 3]", "returns": ["features"]},
        "serve_preprocessed": {
            "images": f"float32 [N, {size}, {size}, 3] in [0, 255], eval-transformed",
            "returns": ["logits", "features"],
        },
    }


def _feature_dim(core):
    return int(core.outputs[1].shape[-1])


def _empty_batch_safe(tf, fn, size, num_classes, feature_dim):
    """``fn`` over any batch, with an empty batch answered by empty outputs without running the model:
    TensorFlow's graph optimiser breaks the model's BatchNorm on a 0-size batch (incompatible shapes)."""

    @tf.function(input_signature=[tf.TensorSpec(shape=(None, size, size, 3), dtype=tf.float32, name="images")])
    def run(images):
        def empty():
            return {"logits": tf.zeros([0, num_classes]), "features": tf.zeros([0, feature_dim])}

        return tf.cond(tf.shape(images)[0] > 0, lambda: fn(images), empty)

    return run


def _batch_any_size(tf, fixed_fn, batch, size, num_classes, feature_dim):
    """A tf.function over any batch size that runs ``fixed_fn`` on zero-padded chunks of ``batch``."""

    @tf.function(input_signature=[tf.TensorSpec(shape=(None, size, size, 3), dtype=tf.float32, name="images")])
    def run(images):
        n = tf.shape(images)[0]
        padded = (n + batch - 1) // batch * batch
        chunks = tf.reshape(tf.pad(images, [[0, padded - n], [0, 0], [0, 0], [0, 0]]), [-1, batch, size, size, 3])
        out = tf.map_fn(
            fixed_fn,
            chunks,
            fn_output_signature={
                "logits": tf.TensorSpec([batch, num_classes], tf.float32),
                "features": tf.TensorSpec([batch, feature_dim], tf.float32),
            },
        )
        return {
            "logits": tf.reshape(out["logits"], [-1, num_classes])[:n],
            "features": tf.reshape(out["features"], [-1, feature_dim])[:n],
        }

    return run


@contextlib.contextmanager
def _stablehlo_readable_by_tensorflow():
    """Under JAX, serialize StableHLO that the installed TensorFlow can read.

    jax2tf embeds the model as a StableHLO artifact targeted at consumers at
    most 4 weeks older than JAX (JAX 0.10.2: StableHLO 1.15, where ``erf`` in
    our exact GELU becomes a ``composite``). TF 2.21 reads 1.13.7, so the
    export loads but fails when called. Targeting JAX's 12-week window
    (1.13.7 for JAX 0.10.2) fixes it. Private JAX API: skipped if absent.
    """
    if keras.backend.backend() != "jax":
        yield
        return
    try:
        from jax._src.export import _export

        hlo = _export.hlo
        original = hlo.get_version_from_compatibility_requirement
        older = hlo.StablehloCompatibilityRequirement.WEEK_12
    except (ImportError, AttributeError):
        yield
        return
    hlo.get_version_from_compatibility_requirement = lambda requirement: original(older)
    try:
        yield
    finally:
        hlo.get_version_from_compatibility_requirement = original
