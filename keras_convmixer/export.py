"""Export a trained ConvMixer as a SavedModel (with a serving signature), ONNX or .keras.

SavedModel signatures (from the TF or JAX backend):

* ``serve(images)``: uint8 ``[N, H, W, 3]``, any H and W. Applies the run's eval
  transform (resize the shorter side to ``image_size / crop_pct``, centre crop)
  and returns ``probabilities [N, C]``, ``top5_classes [N, k]`` (int32) and
  ``top5_scores [N, k]`` with ``k = min(5, C)``. Also the ``serving_default``.
* ``serve_features(images)``: same input, returns ``features [N, dim]`` (pooled).
* ``serve_preprocessed(images)``: float32 ``[N, S, S, 3]`` already transformed
  pixels in [0, 255]; returns ``logits`` and ``features`` (used by evaluate).

Every signature takes an empty batch (N = 0) and returns empty outputs.
ONNX: ``model.onnx`` has one input, ``images``, and one output, ``probabilities``.

The model part is exported by Keras (jax2tf under JAX); preprocessing and
top-k are TensorFlow ops wrapped around it, which avoids JAX's top_k
composite that TF cannot load. Every export writes ``export.json`` (provenance
and input contract) into its output directory.

An export is a folder of its own: it is written to a temporary sibling and renamed into place, so
it never mixes with other files and a failed export leaves the old one intact. A non-empty target
is refused unless ``overwrite=True``, which replaces it whole.
"""

import contextlib
import datetime
import json
import os
import shutil
import uuid
import warnings

import keras

from keras_convmixer.artifacts import embed_preset, is_saved_model_dir, logits_model, open_model

FORMATS = ("savedmodel", "onnx", "keras")
TOP_K = 5
# Under JAX the model part is exported for a fixed batch and the signatures
# loop over chunks of it: with a symbolic batch, the StableHLO that jax2tf
# writes for erf keeps dynamic shapes that TF 2.21 refuses to compile.
JAX_EXPORT_BATCH = 8
# The ONNX graph's input and output names, as export.json documents them.
ONNX_INPUT, ONNX_OUTPUT = "images", "probabilities"


class ExportBackendError(RuntimeError):
    """The current Keras backend cannot write this format."""


class ExportTargetError(ValueError):
    """The output folder cannot take the export as asked (nothing was written)."""


def export_model(model_path, fmt, output=None, verbose=False, overwrite=False):
    """Export ``model_path`` (.keras, run dir) to the folder ``output``; returns the output dir.

    ``output`` defaults to ``<run dir or .keras dir>/export/<fmt>``. A non-empty ``output`` is refused unless
    ``overwrite`` is true; then it is replaced whole, once the new export is complete.
    """
    if fmt not in FORMATS:
        raise ValueError(f"Unknown format {fmt!r}: use one of {', '.join(FORMATS)}.")
    if os.path.isdir(model_path) and is_saved_model_dir(model_path):  # refused before anything loads its graph
        raise ValueError(f"{model_path!r} is already an exported SavedModel: export from its run dir or .keras file.")
    if output is not None:
        _check_target(os.path.abspath(os.fspath(output)), os.path.abspath(os.fspath(model_path)), overwrite)
    bundle = open_model(model_path)
    if output is None:
        base = bundle.source if bundle.kind == "run" else os.path.dirname(bundle.source)
        output = os.path.join(base, "export", fmt)
        _check_target(output, bundle.source, overwrite)
    output = os.path.abspath(os.fspath(output))
    writer = {"savedmodel": export_saved_model, "onnx": export_onnx, "keras": export_keras}[fmt]

    def write(folder):
        write_provenance(bundle, folder, fmt, writer(bundle, folder, verbose=verbose))

    _write_whole(output, write)
    return output


# --------------------------------------------------------------------------- the output folder


def _check_target(output, source, overwrite):
    """Refuse, before anything is written, a target that is a file, is not empty (without ``overwrite``),
    or holds the model being exported (``overwrite`` would delete it)."""
    if os.path.lexists(output) and not os.path.isdir(output):
        raise ExportTargetError(f"Export target {output!r} is a file, not a folder: choose a folder for --output.")
    if os.path.commonpath([output, source]) == output:
        raise ExportTargetError(
            f"Export target {output!r} holds the model being exported ({source}): choose another --output."
        )
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        held = "an earlier export" if os.path.isfile(os.path.join(output, "export.json")) else "files of its own"
        raise ExportTargetError(
            f"Export target {output!r} is not empty (it holds {held}): pass --overwrite to replace it whole, "
            "or choose a new --output; nothing was written."
        )


def _write_whole(output, write):
    """``write(folder)`` into a new sibling of ``output``, then swap it in: a failed export leaves ``output``
    as it was, and what ``output`` held is removed only once the new export is in place."""
    parent, name = os.path.split(output)
    os.makedirs(parent, exist_ok=True)
    stem = os.path.join(parent, f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    new, old = f"{stem}.new", f"{stem}.old"
    os.mkdir(new)
    try:
        write(new)
        if os.path.lexists(output):
            os.rename(output, old)
        try:
            os.rename(new, output)
        except BaseException:
            if os.path.lexists(old):
                os.rename(old, output)
            raise
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if os.path.islink(old):  # a link to a folder was the target: the link goes, what it pointed at stays
        os.remove(old)
    elif os.path.lexists(old):
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- SavedModel


def _require_backend(fmt, allowed=("tensorflow", "jax")):
    backend = keras.backend.backend()
    if backend not in allowed:
        raise ExportBackendError(
            f"{fmt} export does not work from the {backend} backend: rerun with "
            f"KERAS_BACKEND={allowed[-1]} (or {' / '.join(allowed[:-1]) or allowed[-1]}); "
            "the .keras file is backend-independent."
        )


def export_saved_model(bundle, output, verbose=False):
    """Write a SavedModel with the ``serve``, ``serve_features`` and ``serve_preprocessed`` signatures."""
    _require_backend("SavedModel")
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


# --------------------------------------------------------------------------- ONNX


def export_onnx(bundle, output, verbose=False):
    """``model.onnx``: float32 ``[N, S, S, 3]`` eval-transformed pixels -> ``probabilities``."""
    _require_backend("ONNX", allowed=("tensorflow", "torch", "jax"))
    backend = keras.backend.backend()
    needed = {"tensorflow": "tf2onnx", "jax": "jax2onnx", "torch": "onnxscript"}[backend]
    for package in ("onnx", needed):
        try:
            __import__(package)
        except ImportError:
            raise ExportBackendError(
                f"ONNX export from the {backend} backend needs {package}: pip install 'keras-convmixer[onnx]'."
            ) from None
    size = bundle.image_size
    serving = _onnx_serving_model(bundle.model)
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, "model.onnx")
    with warnings.catch_warnings():
        # Keras's tf2onnx patch probes ``hasattr(np, "object")``, which NumPy 2 answers with this warning.
        warnings.filterwarnings("ignore", message=r"In the future `np\.object` will be defined", category=FutureWarning)
        serving.export(
            path,
            format="onnx",
            input_signature=[keras.InputSpec(shape=(None, size, size, 3), dtype="float32")],
            verbose=verbose,
        )
    _name_onnx_io(path, ONNX_INPUT, ONNX_OUTPUT)
    return {
        "model.onnx": {
            ONNX_INPUT: f"float32 [N, {size}, {size}, 3] in [0, 255], eval-transformed",
            "returns": [ONNX_OUTPUT],
        }
    }


def _name_onnx_io(path, input_name, output_name):
    """Rename the graph's one input and one output: each converter picks its own names
    (``args_0``/``Identity:0`` from TF, ``input_0``/``softmax_out_0`` from JAX, a number from torch)."""
    import onnx

    proto = onnx.load(path)
    graph = proto.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [value.name for value in graph.input if value.name not in initializers]
    outputs = [value.name for value in graph.output]
    if len(inputs) != 1 or len(outputs) != 1:
        raise RuntimeError(f"Expected an ONNX graph with one input and one output, got {inputs} -> {outputs}.")
    used = _onnx_names(graph)
    renames = {}
    for old, new in ((inputs[0], input_name), (outputs[0], output_name)):
        if old == new:
            continue
        if new in used:  # an inner tensor already has the name: it moves aside first
            spare = next(f"{new}_{i}" for i in range(1, len(used) + 2) if f"{new}_{i}" not in used)
            renames[new] = spare
            used.add(spare)
        renames[old] = new
    _rename_onnx(graph, renames)
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


def _subgraphs(graph):
    for node in graph.node:
        for attribute in node.attribute:
            yield from ([attribute.g] if attribute.HasField("g") else [])
            yield from attribute.graphs


def _onnx_names(graph):
    names = {value.name for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer)}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    for sub in _subgraphs(graph):
        names |= _onnx_names(sub)
    return names


def _rename_onnx(graph, renames):
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        value.name = renames.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
    for sub in _subgraphs(graph):
        _rename_onnx(sub, renames)


def _onnx_serving_model(model):
    """``images -> probabilities`` with the input normalisation as plain constants.

    tf2onnx turns the Normalization layer's mean/variance (captured tensors)
    into extra graph inputs that onnxruntime then demands; the same arithmetic
    on NumPy constants is folded into the graph.
    """
    import numpy as np

    outputs = model.outputs[0]
    inputs = keras.Input(shape=model.input_shape[1:], name="images")
    if any(layer.name == "normalize" for layer in model.layers):
        normalize = model.get_layer("normalize")
        mean = np.asarray(keras.ops.convert_to_numpy(normalize.mean), "float32")
        scale = np.maximum(np.sqrt(np.asarray(keras.ops.convert_to_numpy(normalize.variance))), keras.config.epsilon())
        body = keras.Model(normalize.output, outputs)
        x = keras.ops.divide(keras.ops.subtract(inputs, mean), scale.astype("float32"))
    else:
        body = keras.Model(model.inputs, outputs)
        x = inputs
    x = body(x)
    probabilities = x if _head_is_softmax(model) else keras.layers.Softmax(name="probabilities")(x)
    return keras.Model(inputs, probabilities, name="convmixer_probabilities")


def _head_is_softmax(model):
    activation = getattr(model.get_layer("head"), "activation", None)
    return getattr(activation, "__name__", "") == "softmax"


# --------------------------------------------------------------------------- .keras


def export_keras(bundle, output, verbose=False):
    """``model.keras`` (as trained: raw [0, 255] pixels in, logits out) for Keras users."""
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, "model.keras")
    bundle.model.save(path)
    embed_preset(path, bundle.config)  # the file alone then predicts as the run does
    return {
        "model.keras": {
            "input": f"float32 [N, {bundle.image_size}, {bundle.image_size}, 3] in [0, 255]",
            "returns": ["model output (logits for training runs)"],
        }
    }


# --------------------------------------------------------------------------- provenance


def write_provenance(bundle, output, fmt, outputs):
    """``export.json``: what was exported, from where, and how to feed it."""
    import importlib.metadata

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    config = bundle.config
    meta = {
        "format": fmt,
        "model": config.get("model"),
        "model_kwargs": config.get("model_kwargs"),
        "num_classes": bundle.num_classes,
        "class_names": bundle.class_names,
        "input": {
            "image_size": bundle.image_size,
            "crop_pct": bundle.crop_pct,
            "interpolation": bundle.interpolation,
            "pixels": "RGB in [0, 255]; mean/std normalisation is inside the model",
        },
        "outputs": outputs,
        "source": bundle.source,
        "run_config": config,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "exported_with": {
            "backend": keras.backend.backend(),
            "keras": keras.__version__,
            "tensorflow": version("tensorflow"),
            "jax": version("jax") if keras.backend.backend() == "jax" else None,
            "keras_convmixer": version("keras-convmixer"),
        },
    }
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "export.json"), "w") as f:
        json.dump(meta, f, indent=2, default=str)
    return meta
