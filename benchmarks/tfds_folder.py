"""An image folder's JPEGs written as a prepared TFDS dataset, to time the TFDS stream on the same files.

``prepare(root)`` writes ``root``'s class folders, bytes unchanged, as ``tfds:bench_folder_jpegs`` (TFRecord
files) in ``<root>.tfds``, once, and returns that data dir. TFDS registers a builder by its class, so the
folder is named in a module global while it is prepared.
"""

import os

import tensorflow_datasets as tfds

_ROOT = None


def _source(root):
    from keras_convmixer import data

    return data.load_source(f"folder:{root}", val_split=0)  # the classes and files training would list


class BenchFolderJpegs(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=_source(_ROOT).class_names),
            }
        )
        return self.dataset_info_from_configs(features=features, supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        split = _source(_ROOT).train
        for path, label in zip(split.paths, split.labels, strict=True):
            with open(path, "rb") as f:  # the JPEG's bytes, not re-encoded
                yield os.path.relpath(path, _ROOT), {"image": f.read(), "label": int(label)}


def prepare(root):
    global _ROOT
    root = os.path.abspath(root)
    data_dir = f"{root}.tfds"
    _ROOT = root
    tfds.builder("bench_folder_jpegs", data_dir=data_dir).download_and_prepare()
    return data_dir
