"""Pretrained weights for ``weights=`` and fine-tuning: the Hugging Face Hub, local checkpoints and saved models.

``resolve_weights(spec)`` turns ``"imagenet"``, ``"hf://owner/repo[@revision]"`` or a local path into a
``PretrainedWeights``: a cached file of the source's tensors in timm's names, its architecture and its evaluation
metadata. Hub files are downloaded with ``huggingface_hub`` (so ``HF_HOME``, ``HF_ENDPOINT`` and
``HF_HUB_OFFLINE`` apply) and checked against the sha256 the Hub advertises; every source is read once into the
cache (``cache``), and later calls read the cache with no network and no torch. ``load_resolved`` ports those
tensors into a model that already exists (the stem, every block and, when it fits, the head), so loading never
builds a second model. A spec is checked by ``vocabulary.parse_spec``, the one check the settings share.

A leaf under the model builder: it imports neither ``models`` nor Keras nor huggingface_hub until a function
needs them.
"""

import dataclasses
import logging
import os
import re

from keras_convmixer import cache, convert, hub, presets, rundir, structure
from keras_convmixer.atomic import read_json
from keras_convmixer.errors import first_line
from keras_convmixer.vocabulary import HF_PREFIX, parse_spec

logger = logging.getLogger(__name__)

_EVAL_KEYS = ("mean", "std", "crop_pct", "interpolation", "image_size")
_NUMBERED = re.compile(r"class_\d+")


@dataclasses.dataclass(frozen=True)
class PretrainedWeights:
    """A resolved weights source.

    ``source`` is the spec as given; ``sha256`` that of the source file; ``path`` the cached ``.safetensors`` of
    its tensors in timm's names (head included when it has one); ``arch`` its dim, depth, kernel_size,
    patch_size, activation and classes (None without a head); ``variant`` the registry key its shape matches
    (or None); ``meta`` its mean, std, crop_pct, interpolation, image_size and class_names (or None).
    """

    source: str
    sha256: str
    path: str
    arch: dict
    variant: str | None
    meta: dict


# ----------------------------------------------------------------------------- what the weights bring


def _meta(variant, classes, config=None):
    """The evaluation metadata of weights of this variant (None: an unnamed shape) and head: the variant's eval
    transform (``presets.eval_transform``), overridden by what a saved model's ``config`` records."""
    transform = presets.eval_transform(variant)
    meta = {k: transform[k] for k in _EVAL_KEYS}
    config = config or {}
    meta.update({k: config[k] for k in _EVAL_KEYS if config.get(k) is not None})
    names = config.get("class_names")
    named = names and not all(_NUMBERED.fullmatch(n) for n in names)
    meta["class_names"] = list(names) if named else presets.default_class_names(variant, classes)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in meta.items()}


def declared_meta(spec, arch):
    """The metadata ``spec`` brings into a model of architecture ``arch``, known before any tensor is read (so
    that the model's normalisation can follow it): a checkpoint's is its variant's; a saved model's, what its
    config.json records. None for a bare ``.weights.h5``."""
    spec = parse_spec(spec)
    if spec.kind == "keras_weights":
        return None
    config = None
    if spec.kind == "path":
        path = _existing(spec.text)
        if os.path.isdir(path) or path.endswith(".keras"):
            config = saved_config(path)
    return _meta(presets.variant_of(arch), arch.get("classes"), config)


def _existing(path):
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Weights {path!r} do not exist: pass 'imagenet', 'hf://owner/repo' or the path of a checkpoint, "
            ".keras file or run directory."
        )
    return path


def imagenet_for(arch, *, include_top, classes, name):
    """The registry key whose released weights fit a model of ``arch`` (dim, depth, kernel_size, patch_size,
    activation) named ``name``, or one line saying why none does, before anything is downloaded."""
    variant = presets.variant_of(arch)
    if variant not in presets.PRETRAINED:
        presets.imagenet_variant(presets.variant_named(name))  # raises, naming the variants that have weights
        raise ValueError(
            f"weights='imagenet': this architecture (dim {arch['dim']}, depth {arch['depth']}, kernel "
            f"{arch['kernel_size']}, patch {arch['patch_size']}) is none of the released ones "
            f"({', '.join(presets.released_variants())})."
        )
    trained = presets.MODEL_CONFIGS[variant]["activation"]
    if arch["activation"] != trained:
        raise ValueError(
            f"weights='imagenet' for {presets.public_name(variant)} were trained with activation={trained!r}, "
            f"got activation={arch['activation']!r}."
        )
    released = presets.PRETRAINED[variant]["classes"]
    if include_top and classes != released:
        raise ValueError(
            f"weights='imagenet' with include_top=True needs classes={released}, got classes={classes!r}: pass "
            "include_top=False for the backbone alone (then add your own head)."
        )
    return variant


# ----------------------------------------------------------------------------- resolving a spec


def resolve_weights(spec, variant=None):
    """Resolve ``spec`` into a ``PretrainedWeights`` (downloading and reading it into the cache on first use).

    ``spec`` is ``"imagenet"`` (needs ``variant``), ``"hf://owner/repo"`` or ``"hf://owner/repo@revision"``
    (a timm-format ``model.safetensors``), or a local path: a timm/official checkpoint
    (``.safetensors``/``.pth``/``.pth.tar``), a ``.keras`` model, or a converted folder / run directory.
    """
    spec = parse_spec(spec)
    if spec.kind == "imagenet":
        key = presets.imagenet_variant(variant)
        row = presets.PRETRAINED[key]
        return _resolve_hub(spec.text, row["hub_id"], None, row["filename"], variant=key)
    if spec.kind == "hub":
        return _resolve_hub(spec.text, spec.repo, spec.revision, "model.safetensors", variant=None)
    return _resolve_local(spec.text)


def _resolve_hub(source, repo, revision, filename, variant):
    from huggingface_hub import constants

    # The endpoint is part of the key: a mirror's repo of the same name is another file. A revision is pinned
    # to its first download (the released weights never change); name a commit, or clear the cache, for newer.
    key = f"{HF_PREFIX}{repo}@{revision or 'main'}/{filename} at {constants.ENDPOINT}"
    cached = _cached(source, key)
    if cached is not None:
        return cached
    where = f"{filename} of {repo}" + (f"@{revision}" if revision else "")
    local, sha = hub.download(repo, revision, filename, where)
    variant = variant or presets.released_repo(repo)
    try:
        return _from_checkpoint(source, key, sha, local, variant, variant or repo.split("/")[-1])
    except (convert.CheckpointError, ValueError) as err:
        raise ValueError(
            f"{where} is not a timm-format ConvMixer checkpoint ({first_line(err)}): "
            f"{hub.by_hand(repo, revision, filename)}."
        ) from None


def _from_checkpoint(source, key, sha, path, variant, name):
    state = convert.read_checkpoint(path)
    arch = convert.convert_backbone_config(state, variant=variant)
    meta = _meta(arch["variant"], arch["classes"])
    return _store(source, key, name, state, sha, arch, meta)


def _resolve_local(path):
    path = _existing(path)
    if os.path.isdir(path) or path.endswith(".keras"):
        return _resolve_saved(path)
    if path.endswith(".weights.h5"):
        raise ValueError(
            f"{path!r} is a bare .weights.h5 that does not say its architecture: pass it to ConvMixer(weights=...) "
            "with the same architecture and class count, or give the .keras file or run directory instead."
        )
    if not path.endswith(convert.CHECKPOINT_SUFFIXES):
        raise ValueError(
            f"Weights {path!r}: unknown file type; expected a .safetensors/.pth/.pth.tar checkpoint, "
            "a .keras file or a run directory."
        )
    sha = cache.sha256(path)
    key = f"sha256:{sha}"
    cached = _cached(path, key)
    if cached is not None:
        return cached
    name = os.path.basename(path).split(".")[0] or "checkpoint"
    try:
        return _from_checkpoint(path, key, sha, path, None, name)
    except convert.CheckpointError as err:
        raise ValueError(f"{path!r} is not a ConvMixer checkpoint: {first_line(err)}") from None


def saved_config(path):
    """The config.json of a run directory, or the one beside a ``.keras`` file; ``{}`` where there is none."""
    path = os.fspath(path)
    config_file = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), rundir.CONFIG)
    return read_json(config_file) if os.path.isfile(config_file) else {}


def _resolve_saved(path):
    """A .keras file or a run directory / converted folder (config.json + model file)."""
    model_file = path
    if os.path.isdir(path):
        present = [name for name in rundir.MODEL_FILES if os.path.isfile(os.path.join(path, name))]
        if not os.path.isfile(os.path.join(path, rundir.CONFIG)) or not present:
            raise ValueError(
                f"Weights folder {path!r} is not a run directory or converted folder "
                f"(config.json and one of {', '.join(rundir.MODEL_FILES)})."
            )
        model_file = os.path.join(path, present[0])
    sha = cache.sha256(model_file)
    key = f"sha256:{sha}"
    cached = _cached(path, key)
    if cached is not None:
        return cached
    from keras_convmixer import load_model  # registers our layers first

    try:
        model = load_model(model_file, compile=False)
        arch = structure.model_arch(model)
    except Exception as err:  # zip/h5/config errors and foreign models all mean "no ConvMixer here"
        raise ValueError(f"Weights {path!r} do not hold a ConvMixer: {first_line(err)}") from None
    arch["variant"] = presets.variant_of(arch)
    meta = _meta(arch["variant"], arch["classes"], saved_config(path))
    state = convert.export_state(model, head=arch["classes"] is not None)
    name = os.path.basename(os.path.normpath(path)).split(".")[0] or "model"
    return _store(path, key, name, state, sha, arch, meta)


# ----------------------------------------------------------------------------- the cache

_ARCH_KEYS = (*presets.SHAPE_KEYS, "activation", "classes")


def _cached(source, key):
    entry = cache.lookup(key)
    if entry is None:
        return None
    try:
        arch = {k: entry["arch"][k] for k in _ARCH_KEYS}
        meta = dict(entry["meta"])
    except (KeyError, TypeError, ValueError):  # a damaged entry only costs a new conversion
        return None
    if meta.get("class_names") is None:  # the default names are not copied into the index
        meta["class_names"] = presets.default_class_names(entry["variant"], arch["classes"])
    return PretrainedWeights(os.fspath(source), entry["sha256"], entry["path"], arch, entry["variant"], meta)


def _store(source, key, name, state, sha, arch, meta):
    arch = {k: arch[k] for k in _ARCH_KEYS}
    variant = presets.variant_of(arch)
    default = presets.default_class_names(variant, arch["classes"])
    meta = dict(meta, class_names=None if meta.get("class_names") == default else meta.get("class_names"))
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    cache.store(key, name, state, sha256=sha, arch=arch, variant=variant, meta=meta)
    logger.info("Read the weights of %s into the cache.", source)
    return _cached(source, key)


# ----------------------------------------------------------------------------- loading into a model


def check_architecture(weights, model_arch, model_name):
    """One line naming both architectures when the weights do not fit the model."""
    if any(weights.arch[k] != model_arch[k] for k in presets.SHAPE_KEYS):
        raise ValueError(
            f"Weights {weights.source!r} are {structure.describe(weights.arch)} but the model {model_name!r} is "
            f"{structure.describe(model_arch)}: build the model with the weights' architecture."
        )


def load_pretrained(model, spec, *, variant=None, load_head="auto"):
    """Copy pretrained weights into a model built by ``ConvMixer`` (or a builder).

    The stem and every block always; the head when ``load_head`` is True (an error if it does not fit), or
    ``"auto"`` and its shape agrees; never with ``False``. ``variant`` names the variant for ``"imagenet"``
    (default: the one whose architecture the model has).

    Returns ``dict(source, sha256, head_loaded, meta)``.
    """
    if load_head not in ("auto", True, False):
        raise ValueError(f"load_head must be 'auto', True or False, got {load_head!r}.")
    if variant is None and parse_spec(spec).kind == "imagenet":
        variant = presets.variant_of(structure.model_arch(model))
        if variant not in presets.PRETRAINED:
            variant = presets.variant_named(model.name)
    return load_resolved(model, resolve_weights(spec, variant), load_head=load_head)


def load_for_builder(model, spec, *, variant, classes, load_head):
    """What ``ConvMixer(weights=spec)`` does once its model is built: resolve, check that the head agrees with
    ``classes`` (None: no head asked for), load."""
    weights = resolve_weights(spec, variant)
    check_architecture(weights, structure.model_arch(model), model.name)
    if classes is not None and weights.arch["classes"] != classes:
        raise ValueError(
            f"weights {weights.source!r} have a {weights.arch['classes'] or 'no'}-class head but classes={classes!r}: "
            f"pass classes={weights.arch['classes']}, or include_top=False for the backbone alone."
        )
    return load_resolved(model, weights, load_head=load_head)


def load_resolved(model, weights, *, load_head="auto"):
    """``load_pretrained`` for an already resolved ``PretrainedWeights``."""
    arch = structure.model_arch(model)
    check_architecture(weights, arch, model.name)
    if arch["activation"] != weights.arch["activation"]:
        # The same tensors under another activation compute another function: refuse, as weights="imagenet" does.
        raise ValueError(
            f"Weights {weights.source!r} were trained with activation={weights.arch['activation']!r} but the model "
            f"uses {arch['activation']!r}: build it with activation={weights.arch['activation']!r}."
        )
    fits = arch["classes"] is not None and arch["classes"] == weights.arch["classes"]
    if load_head is True and not fits:
        raise ValueError(
            f"Cannot load the head of {weights.source!r}: it has "
            f"{weights.arch['classes'] if weights.arch['classes'] is not None else 'no'} classes but the model has "
            f"{arch['classes'] if arch['classes'] is not None else 'no head'}; pass load_head='auto' or False."
        )
    head_loaded = fits and load_head is not False
    convert.load_state_dict(model, convert.read_checkpoint(weights.path), head=head_loaded)
    return dict(source=weights.source, sha256=weights.sha256, head_loaded=bool(head_loaded), meta=weights.meta)
