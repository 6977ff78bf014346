"""Input pipelines: image sources, tf.data datasets and a TensorFlow-free in-memory loader.

``load_source`` (``sources``) describes a source without decoding pixels; ``make_dataset``
(``tf_pipeline``) turns a split into a batched ``tf.data.Dataset``; ``load_in_memory``
(``in_memory``) decodes a source once into uint8 arrays with PIL and NumPy. ``folders`` lists and
checks folders of images; ``transforms`` decodes one image and holds the eval transform, without
TensorFlow. Importing this package imports no TensorFlow.
"""

from keras_convmixer.data.folders import DecodeAudit
from keras_convmixer.data.in_memory import InMemoryData, load_in_memory
from keras_convmixer.data.sources import Source, Split, load_source, parse_source, stratified_split
from keras_convmixer.data.tf_pipeline import CACHE_BUDGET_BYTES, make_dataset
from keras_convmixer.data.transforms import IMAGE_EXTENSIONS, INTERPOLATIONS, MAX_PIXELS, eval_geometry, read_image

__all__ = [
    "CACHE_BUDGET_BYTES",
    "DecodeAudit",
    "IMAGE_EXTENSIONS",
    "INTERPOLATIONS",
    "InMemoryData",
    "MAX_PIXELS",
    "Source",
    "Split",
    "eval_geometry",
    "load_in_memory",
    "load_source",
    "make_dataset",
    "parse_source",
    "read_image",
    "stratified_split",
]
