"""Top-k class names and scores for image files and folders, streamed in batches.

A ``.keras`` file or run dir is preprocessed with PIL and NumPy (the eval
transform of ``keras_convmixer.data.transforms``), so predicting needs no
TensorFlow under the JAX or torch backend. An exported SavedModel applies its
own in-graph transform through its ``serve`` signature.

Files are decoded, transformed and predicted ``batch_size`` at a time, so memory
stays bounded whatever the number of files. A file that cannot be read is left
out and named (with the reason) in one warning line and in ``audit``, as the
training scan does; the other files are still predicted.
"""

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from keras_convmixer.artifacts import open_model
from keras_convmixer.progress import Progress

DEFAULT_BATCH_SIZE = 32
# Named in the warning line; the rest are counted there and all of them are in ``audit``.
NAMED_FAILURES = 10

logger = logging.getLogger(__name__)


def list_images(paths):
    """Expand files and folders into a list of image files.

    A folder is searched recursively (a folder of class sub-folders, as training reads, included) in the
    training scan's order: sorted, depth first, hidden entries skipped, each file once through links.
    """
    from keras_convmixer.data import IMAGE_EXTENSIONS
    from keras_convmixer.data.folders import walk_images

    files = []
    for path in paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            found, _ = walk_images(path, set(), set())
            if not found:
                raise FileNotFoundError(
                    f"Folder {path!r} has no image files ({', '.join(IMAGE_EXTENSIONS)}), sub-folders included."
                )
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"Image path {path!r} does not exist.")
    return files


def preprocess(images_uint8, image_size, crop_pct=1.0, interpolation="bilinear"):
    """The eval transform on a list of uint8 HWC images of any sizes -> float32 ``[N, S, S, 3]``."""
    from keras_convmixer.data.transforms import eval_transform

    out = [eval_transform(im, image_size, crop_pct, interpolation) for im in images_uint8]
    return np.stack(out).astype("float32") if out else np.zeros((0, image_size, image_size, 3), "float32")


def softmax(logits):
    logits = np.asarray(logits, dtype="float64")
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)).astype("float32")


def predict(model_path, images, top_k=5, *, batch_size=DEFAULT_BATCH_SIZE, trust_savedmodel=False, audit=None):
    """Top-k class names and scores for image files and folders: a list of dicts, one per readable file,
    in the order of ``list_images``.

    Files that cannot be read are left out, named in one warning line and recorded in ``audit`` (a
    ``keras_convmixer.data.DecodeAudit``, when given); if none can be read, ``ValueError``. A SavedModel
    needs ``trust_savedmodel=True`` (see ``keras_convmixer.artifacts.open_model``).
    """
    from keras_convmixer.data import DecodeAudit

    for name, value in (("top_k", top_k), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be at least 1, got {value!r}.")
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    files = list_images(images)
    if not files:
        raise ValueError("images is empty: pass at least one image file or folder.")
    audit = DecodeAudit() if audit is None else audit
    readable = _header_scan(files, audit)  # files bad from their first bytes fail before the (slow) model load
    bundle = open_model(model_path, trust_savedmodel=trust_savedmodel)
    k = min(int(top_k), bundle.num_classes)
    results = []
    for kept, probabilities in _stream(bundle, readable, int(batch_size), audit):
        results += [_top_k(path, probs, bundle.class_names, k) for path, probs in zip(kept, probabilities, strict=True)]
    _report(audit, files, results)
    return results


def _header_scan(files, audit):
    from keras_convmixer.data import MAX_PIXELS
    from keras_convmixer.data.folders import scan_files

    ok, _, failures = scan_files(files, "header", MAX_PIXELS)
    for path, reason in failures:
        audit.add(path, reason)
    if not ok.any():
        _none_readable(audit, len(files))
    return [path for path, good in zip(files, ok, strict=True) if good]


def _stream(bundle, files, batch_size, audit):
    """``(readable paths, probabilities)`` for each batch of ``files``, decoded in threads (PIL releases the GIL)."""
    decode = _savedmodel_decoder() if bundle.saved_model is not None else _host_decoder(bundle)
    progress = Progress("predicted image files", len(files), logger)
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            kept, arrays = [], []
            for path, (array, reason) in zip(chunk, pool.map(decode, chunk), strict=True):
                if reason is None:
                    kept.append(path)
                    arrays.append(array)
                else:
                    audit.add(path, reason)
            if kept:
                yield kept, _probabilities(bundle, arrays, batch_size)
            progress.advance(len(chunk), items=len(chunk))


def _host_decoder(bundle):
    """A file -> ``(eval-transformed float32 [S, S, 3], None)`` or ``(None, reason)``: the full-size pixels
    are dropped as soon as the crop is made."""
    from keras_convmixer.data import MAX_PIXELS
    from keras_convmixer.data.transforms import eval_transform, pil_decode

    size, crop_pct, interpolation = bundle.image_size, bundle.crop_pct, bundle.interpolation

    def decode(path):
        image, reason = pil_decode(path, MAX_PIXELS)
        return (None, reason) if reason else (eval_transform(image, size, crop_pct, interpolation), None)

    return decode


def _savedmodel_decoder():
    """A file -> ``(uint8 [H, W, 3], None)`` or ``(None, reason)``: the SavedModel transforms in its graph."""
    from keras_convmixer.data import MAX_PIXELS
    from keras_convmixer.data.transforms import pil_decode

    return lambda path: pil_decode(path, MAX_PIXELS)


def _probabilities(bundle, arrays, batch_size):
    if bundle.saved_model is None:
        # Zero-padded to one batch shape: a batch shortened by skipped files would retrace (TF) or recompile (JAX).
        x = np.zeros((batch_size, *arrays[0].shape), "float32")
        x[: len(arrays)] = arrays
        return softmax(bundle.logits(x, batch_size=batch_size)[: len(arrays)])
    import tensorflow as tf

    # ``serve`` takes one [N, H, W, 3] batch: images of one size go together, each call a batch.
    serve = bundle.saved_model.signatures["serve"]
    out = np.zeros((len(arrays), bundle.num_classes), "float32")
    by_shape = {}
    for i, array in enumerate(arrays):
        by_shape.setdefault(array.shape, []).append(i)
    for indices in by_shape.values():
        batch = tf.constant(np.stack([arrays[i] for i in indices]))
        out[indices] = serve(images=batch)["probabilities"].numpy()
    return out


def _top_k(path, probs, names, k):
    order = np.argsort(-probs, kind="stable")[:k]
    return {"file": path, "top_k": [{"class": names[i], "index": int(i), "score": float(probs[i])} for i in order]}


def _listed(failures):
    shown = "; ".join(f"{path}: {reason}" for path, reason in list(failures.items())[:NAMED_FAILURES])
    more = f"; and {len(failures) - NAMED_FAILURES} more" if len(failures) > NAMED_FAILURES else ""
    return shown + more


def _none_readable(audit, total):
    failures = audit.failures
    path, reason = next(iter(failures.items()))
    more = f" (and {len(failures) - 1} more: {_listed(dict(list(failures.items())[1:]))})" if len(failures) > 1 else ""
    raise ValueError(f"none of the {total} image files could be read: cannot decode image {path}: {reason}{more}")


def _report(audit, files, results):
    if not results:
        _none_readable(audit, len(files))
    recorded = audit.failures
    failures = {path: recorded[path] for path in dict.fromkeys(files) if path in recorded}  # in file order
    if failures:
        logger.warning(
            "Left out %d of %d image file%s that could not be read: %s",
            len(failures),
            len(files),
            "s" if len(files) != 1 else "",
            _listed(failures),
        )
