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

import datetime
import json
import os
import shutil
import uuid
import warnings

import keras

from keras_convmixer import atomic
from keras_convmixer.artifacts import is_saved_model_dir, open_model, preset_entries
from keras_convmixer.savedmodel import ExportBackendError, export_saved_model, require_backend

FORMATS = ("savedmodel", "onnx", "keras")
# The ONNX graph's input and output names, as export.json documents them.
ONNX_INPUT, ONNX_OUTPUT = "images", "probabilities"


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
    blocker = atomic.file_in_the_way(output)
    if blocker == output:
        raise ExportTargetError(f"Export target {output!r} is a file, not a folder: choose a folder for --output.")
    if blocker:
        raise ExportTargetError(
            f"Export target {output!r} is under {blocker!r}, a file, not a folder: choose a folder for --output."
        )
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


# --------------------------------------------------------------------------- ONNX


def export_onnx(bundle, output, verbose=False):
    """``model.onnx``: float32 ``[N, S, S, 3]`` eval-transformed pixels -> ``probabilities``."""
    require_backend("ONNX", allowed=("tensorflow", "torch", "jax"))
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
    atomic.save_model(bundle.model, path, entries=preset_entries(bundle.config))  # the file alone predicts as the run
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
