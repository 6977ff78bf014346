"""The lazy TensorFlow import that the input pipelines and the host-side augmentation share.

TensorFlow is imported only when a pipeline is built, so importing the data and augment packages costs
nothing; when it only feeds data to JAX or torch, it is kept off the accelerators they use.
"""

_tf_ready = False


def import_tf():
    """TensorFlow, configured once to leave the accelerators to JAX or torch when it only feeds data."""
    global _tf_ready
    import tensorflow as tf

    if not _tf_ready:
        import keras

        _tf_ready = True
        if keras.backend.backend() != "tensorflow":
            try:
                tf.config.set_visible_devices([], "GPU")
            except RuntimeError:
                pass  # TF's runtime is already up; too late to change, and not ours to break
    return tf
