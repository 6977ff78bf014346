"""Fine-tuning: the classifier a config describes, the pretrained weights it starts from, and freezing.

``build_model`` builds the classifier, ``follow_weights`` applies the metadata of ``cfg["weights"]`` to
the settings that follow it, ``load_backbone`` ports those weights in (the head too when its classes
agree) and ``freeze_backbone`` turns the backbone into a fixed feature extractor.
"""

from keras_convmixer import structure
from keras_convmixer.config import weights_spec
from keras_convmixer.models import ConvMixer, get_model
from keras_convmixer.pretrained import load_resolved, resolve_weights
from keras_convmixer.recipes import apply_weights_meta


def build_model(cfg):
    """The classifier (logits out, raw [0, 255] pixels in) described by ``cfg``."""
    kwargs = dict(cfg["model_kwargs"], classes=cfg["num_classes"])
    if cfg["model"] == "custom":
        return ConvMixer(**kwargs, name="convmixer")
    return get_model(cfg["model"], **kwargs)


def _variant(cfg):
    return None if cfg["model"] == "custom" else cfg["model"]


def follow_weights(cfg):
    """Set the settings that follow the pretrained weights (``cfg["from_weights"]``) to their metadata.
    Reads the weights (downloading or converting them once; later calls hit the cache)."""

    resolved = resolve_weights(weights_spec(cfg["weights"]), variant=_variant(cfg))
    apply_weights_meta(cfg, resolved.meta)
    return resolved


def load_backbone(classifier, cfg):
    """Copy the pretrained weights of ``cfg["weights"]`` into ``classifier`` (the head too when its classes
    agree: the same count, and the same names where both sides name them); returns the record config.json
    keeps: ``{source, sha256, head_loaded}``."""

    source = weights_spec(cfg["weights"])
    resolved = resolve_weights(source, variant=_variant(cfg))
    # The same count of differently named classes (digits 0-4, then 5-9) is a new task: its head starts afresh.
    known = resolved.meta.get("class_names")
    same_classes = not known or not cfg.get("class_names") or list(known) == list(cfg["class_names"])
    report = load_resolved(classifier, resolved, load_head="auto" if same_classes else False)
    return dict(source=source, sha256=report["sha256"], head_loaded=bool(report["head_loaded"]))


def freeze_backbone(classifier):
    """Make the stem and every block non-trainable (a linear probe): their weights stay as they are and
    their BatchNorm layers normalise with the moving statistics, also in training."""
    frozen = structure.backbone_layers(classifier)
    if not frozen:
        raise ValueError(f"--freeze-backbone: {classifier.name} has no stem or block_<i> layers to freeze.")
    for layer in frozen:
        layer.trainable = False
    return frozen
