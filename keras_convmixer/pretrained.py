"""Pretrained weights for ``weights=`` and fine-tuning: the Hugging Face Hub, local checkpoints and saved models.

``resolve_weights(spec)`` turns ``"imagenet"``, ``"hf://owner/repo[@revision]"`` or a local path into a Keras
``.weights.h5`` of the whole source model (head included) plus its architecture and evaluation metadata.
Hub files are downloaded with ``huggingface_hub`` (so ``HF_HOME``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` apply),
checked against the sha256 the Hub advertises, converted in memory and cached under
``<KERAS_HOME or ~/.keras>/models/convmixer/`` with a JSON index; later calls read the cache with no network
and no torch. ``load_pretrained(model, spec)`` copies the stem, every block and, when it fits, the head into a
model built by ``ConvMixer``.

This module imports neither Keras nor huggingface_hub until a function needs them.
"""

import contextlib
import dataclasses
import hashlib
import logging
import os
import re

from keras_convmixer import presets, rundir
from keras_convmixer.errors import first_line

logger = logging.getLogger(__name__)

INDEX = "index.json"
_HF_PREFIX = "hf://"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pth.tar", ".pt", ".bin", ".ckpt", ".tar")
_IMAGENET_CLASSES = "imagenet-1k"  # stands for the 1000 packaged names in the index, which would be bulky
_ARCH_KEYS = ("dim", "depth", "kernel_size", "patch_size")


@dataclasses.dataclass(frozen=True)
class PretrainedWeights:
    """A resolved weights source.

    ``source`` is the spec as given; ``sha256`` that of the source file; ``path`` a Keras ``.weights.h5`` of the
    full source model (loadable by ``source_model(arch, meta)``); ``arch`` its dim, depth, kernel_size,
    patch_size, activation and classes (None without a head); ``variant`` the registry key its shape matches
    (or None); ``meta`` its mean, std, crop_pct, interpolation, image_size and class_names (or None).
    """

    source: str
    sha256: str
    path: str
    arch: dict
    variant: str | None
    meta: dict


def cache_dir():
    """Where converted weights are cached: ``$KERAS_HOME/models/convmixer`` (``~/.keras`` without KERAS_HOME)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "models", "convmixer")


def pretrained_variants():
    """The builders that ``weights="imagenet"`` works for."""
    return [presets.public_name(key) for key in presets.PRETRAINED]


def imagenet_variant(variant):
    """The registry key of a variant with released ImageNet weights, or one line naming the ones that have them."""
    key = presets.canonical_name(variant) if variant is not None else None
    if key not in presets.PRETRAINED:
        named = f"{presets.public_name(key)} has none" if key else "no variant was named"
        raise ValueError(
            f"weights='imagenet' exists for {', '.join(pretrained_variants())} only ({named}): "
            "pass weights=None, a local path or 'hf://owner/repo'."
        )
    return key


def variant_for_arch(dim, depth, kernel_size, patch_size, activation=None):
    """The variant with released weights whose architecture this is, or None."""
    for key in presets.PRETRAINED:
        row = presets.MODEL_CONFIGS[key]
        same = all(row[k] == v for k, v in zip(_ARCH_KEYS, (dim, depth, kernel_size, patch_size), strict=True))
        if same and (activation is None or row["activation"] == activation):
            return key
    return None


# ----------------------------------------------------------------------------- resolving a spec


def resolve_weights(spec, variant=None):
    """Resolve ``spec`` into a ``PretrainedWeights`` (downloading and converting on first use).

    ``spec`` is ``"imagenet"`` (needs ``variant``), ``"hf://owner/repo"`` or ``"hf://owner/repo@revision"``
    (a timm-format ``model.safetensors``), or a local path: a timm/official checkpoint
    (``.safetensors``/``.pth``/``.pth.tar``), a ``.keras`` model, or a converted folder / run directory.
    """
    if not isinstance(spec, (str, os.PathLike)) or not os.fspath(spec):
        raise ValueError(f"weights must be 'imagenet', 'hf://owner/repo' or a path, got {spec!r}.")
    text = os.fspath(spec)
    if text == "imagenet":
        key = imagenet_variant(variant)
        row = presets.PRETRAINED[key]
        return _resolve_hub(text, row["hub_id"], None, row["filename"], variant=key)
    if text.startswith(_HF_PREFIX):
        repo, _, revision = text[len(_HF_PREFIX) :].partition("@")
        if not _REPO_ID.match(repo) or (revision == "" and "@" in text):
            raise ValueError(f"weights {text!r} is not 'hf://owner/repo' or 'hf://owner/repo@revision'.")
        return _resolve_hub(text, repo, revision or None, "model.safetensors", variant=None)
    return _resolve_local(text)


def _hub_row(repo):
    """The PRETRAINED row and variant of a released repo, or (None, None)."""
    for key, row in presets.PRETRAINED.items():
        if row["hub_id"] == repo:
            return row, key
    return None, None


def _hand_url(repo, revision, filename):
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo, filename, revision=revision)


def _by_hand(repo, revision, filename):
    return (
        f"download {_hand_url(repo, revision, filename)} by hand and pass weights='/path/to/{filename}' "
        "(or train.py --weights /path/to/" + filename + ")"
    )


def _resolve_hub(source, repo, revision, filename, variant):
    from huggingface_hub import constants

    # The endpoint is part of the key: a mirror's repo of the same name is another file. A revision is pinned
    # to its first download (the released weights never change); name a commit, or clear the cache, for newer.
    key = f"{_HF_PREFIX}{repo}@{revision or 'main'}/{filename} at {constants.ENDPOINT}"
    cached = _cached(source, key)
    if cached is not None:
        return cached

    from huggingface_hub import get_hf_file_metadata, hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    where = f"{filename} of {repo}" + (f"@{revision}" if revision else "")
    advertised = None
    if not constants.HF_HUB_OFFLINE:
        # The Hub's HEAD answer carries the LFS object's sha256 (X-Linked-Etag); hf_hub_download does not check it.
        with contextlib.suppress(Exception):  # no network etc.: hf_hub_download then says what is wrong
            advertised = get_hf_file_metadata(_hand_url(repo, revision, filename)).etag
    try:
        local = hf_hub_download(repo, filename, revision=revision)
    except LocalEntryNotFoundError as err:  # offline (HF_HUB_OFFLINE or no connection) and not in the HF cache
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _reason(err)
        raise ValueError(
            f"Cannot get {where} ({reason}, and it is not cached): {_by_hand(repo, revision, filename)}."
        ) from None
    except (EntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise ValueError(f"Cannot download {where}: {_reason(err)}; {_by_hand(repo, revision, filename)}.") from None

    sha = _sha256(local)
    blob = os.path.realpath(local)
    if not _is_sha256(advertised) and _is_sha256(os.path.basename(blob)):
        advertised = os.path.basename(blob)  # offline: the HF cache names an LFS blob after its sha256
    if not _is_sha256(advertised):
        logger.warning("%s: the Hub advertised no sha256 for it, so the download is not checked.", where)
    elif sha != advertised:
        # Remove the pointer and the blob so that neither this nor huggingface_hub's next call uses the file.
        for path in {local, blob}:
            with contextlib.suppress(OSError):
                os.remove(path)
        raise ValueError(
            f"{where} failed its checksum: the Hub advertises sha256 {advertised} but the download has {sha} "
            f"(file removed): retry, or {_by_hand(repo, revision, filename)}."
        )

    row, row_variant = _hub_row(repo)
    from keras_convmixer import convert

    try:
        model, arch = convert.build_from_checkpoint(local, variant=variant or row_variant, image_size=None)
    except (convert.CheckpointError, ValueError) as err:
        raise ValueError(
            f"{where} is not a timm-format ConvMixer checkpoint ({first_line(err)}): "
            f"{_by_hand(repo, revision, filename)}."
        ) from None
    meta = _hub_meta(row, arch)
    name = variant or row_variant or repo.split("/")[-1]
    return _store(source, key, sha, model, arch, meta, name)


def _reason(err):
    text = first_line(err)
    return text[:200] if text else type(err).__name__


def _hub_meta(row, arch):
    if row is not None:
        meta = {k: row[k] for k in ("mean", "std", "crop_pct", "interpolation", "image_size")}
        meta["class_names"] = _IMAGENET_CLASSES if arch["classes"] == row["classes"] == 1000 else None
        return meta
    return dict(_preset_meta(arch["variant"]), class_names=None)


def _preset_meta(variant):
    """The evaluation metadata of a named shape, or that of timm's ImageNet ConvMixers for any other."""
    preset = presets.eval_preset(variant or next(iter(presets.PRETRAINED)))
    return {
        "mean": preset["mean"],
        "std": preset["std"],
        "crop_pct": preset["crop_pct"],
        "interpolation": preset["interpolation"],
        "image_size": preset["image_size"],
    }


def _resolve_local(path):
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Weights {path!r} do not exist: pass 'imagenet', 'hf://owner/repo' or the path of a checkpoint, "
            ".keras file or run directory."
        )
    if os.path.isdir(path):
        return _resolve_saved(path, folder=True)
    if path.endswith(".weights.h5"):
        raise ValueError(
            f"{path!r} is a bare .weights.h5 that does not say its architecture: pass it to ConvMixer(weights=...) "
            "with the same architecture and class count, or give the .keras file or run directory instead."
        )
    if path.endswith(".keras"):
        return _resolve_saved(path, folder=False)
    if not path.endswith(_CHECKPOINT_SUFFIXES):
        raise ValueError(
            f"Weights {path!r}: unknown file type; expected a .safetensors/.pth/.pth.tar checkpoint, "
            "a .keras file or a run directory."
        )
    sha = _sha256(path)
    key = f"sha256:{sha}"
    cached = _cached(path, key)
    if cached is not None:
        return cached
    from keras_convmixer import convert

    try:
        model, arch = convert.build_from_checkpoint(path, image_size=None)
    except convert.CheckpointError as err:
        raise ValueError(f"{path!r} is not a ConvMixer checkpoint: {first_line(err)}") from None
    meta = dict(_preset_meta(arch["variant"]), class_names=None)
    name = os.path.basename(path).split(".")[0] or "checkpoint"
    return _store(path, key, sha, model, arch, meta, name)


def _resolve_saved(path, folder):
    """A .keras file or a run directory / converted folder (config.json + model file)."""
    from keras_convmixer import artifacts

    if folder:
        present = [name for name in rundir.MODEL_FILES if os.path.isfile(os.path.join(path, name))]
        if not os.path.isfile(os.path.join(path, rundir.CONFIG)) or not present:
            raise ValueError(
                f"Weights folder {path!r} is not a run directory or converted folder "
                f"(config.json and one of {', '.join(rundir.MODEL_FILES)})."
            )
        model_file = os.path.join(path, present[0])
    else:
        model_file = path
    sha = _sha256(model_file)
    key = f"sha256:{sha}"
    cached = _cached(path, key)
    if cached is not None:
        return cached
    try:
        bundle = artifacts.open_model(path)
        arch = model_arch(bundle.model)
    except (ValueError, OSError) as err:
        raise ValueError(f"Weights {path!r} do not hold a ConvMixer: {first_line(err)}") from None
    config = bundle.config
    arch["variant"] = _variant_of(arch)
    meta = _preset_meta(arch["variant"])
    for name in ("mean", "std", "crop_pct", "interpolation", "image_size"):
        if config.get(name) is not None:
            meta[name] = config[name]
    names = config.get("class_names")
    meta["class_names"] = list(names) if names and not all(re.fullmatch(r"class_\d+", n) for n in names) else None
    # Re-built in the canonical layout, so that every cached file loads into source_model(arch, meta).
    source = source_model(arch, meta)
    _copy_layers(bundle.model, source, arch["depth"], head=arch["classes"] is not None)
    name = os.path.basename(os.path.normpath(path)).split(".")[0] or "model"
    return _store(path, key, sha, source, arch, meta, name)


def _variant_of(arch):
    for key, row in presets.MODEL_CONFIGS.items():
        if all(row[k] == arch[k] for k in _ARCH_KEYS):
            return key
    return None


# ----------------------------------------------------------------------------- the cache


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_sha256(value):
    return isinstance(value, str) and bool(_SHA256.match(value))


def _read_index():
    path = os.path.join(cache_dir(), INDEX)
    if not os.path.isfile(path):
        return {}
    try:
        entries = rundir.read_json(path).get("entries")
    except OSError as err:  # a damaged index only costs a new conversion
        logger.warning("Ignoring the weights cache index: %s", first_line(err))
        return {}
    return entries if isinstance(entries, dict) else {}


def _cached(source, key):
    entry = _read_index().get(key)
    if not isinstance(entry, dict):
        return None
    path = os.path.join(cache_dir(), str(entry.get("file")))
    if not os.path.isfile(path) or not _is_sha256(entry.get("sha256")):
        return None
    try:
        meta = dict(entry["meta"])
        arch = {k: entry["arch"][k] for k in (*_ARCH_KEYS, "activation", "classes")}
    except (KeyError, TypeError, ValueError):  # a damaged entry only costs a new conversion
        return None
    if meta.get("class_names") == _IMAGENET_CLASSES:
        from keras_convmixer.imagenet import class_names

        meta["class_names"] = class_names()
    return PretrainedWeights(os.fspath(source), entry["sha256"], path, arch, entry.get("variant"), meta)


def _store(source, key, sha, model, arch, meta, name):
    directory = cache_dir()
    os.makedirs(directory, exist_ok=True)
    file = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-{sha[:16]}.weights.h5"
    rundir.save_weights(model, os.path.join(directory, file))
    arch = {k: arch[k] for k in (*_ARCH_KEYS, "activation", "classes")}
    variant = _variant_of(arch)
    meta = {k: (list(v) if isinstance(v, tuple) else v) for k, v in meta.items()}
    entries = _read_index()
    entries[key] = dict(file=file, sha256=sha, arch=arch, variant=variant, meta=meta)
    rundir.write_json(os.path.join(directory, INDEX), {"entries": entries})
    logger.info("Cached the converted weights of %s as %s.", source, os.path.join(directory, file))
    return _cached(source, key)


# ----------------------------------------------------------------------------- loading into a model


def model_arch(model):
    """dim, depth, kernel_size, patch_size, activation and classes (None without a head) of a ConvMixer."""
    names = {layer.name: layer for layer in model.layers}
    if "stem" not in names or "block_0" not in names:
        raise ValueError(f"Model {model.name!r} is not a ConvMixer built by ConvMixer() (no 'stem'/'block_0' layer).")
    stem, block = names["stem"], names["block_0"]
    depth = sum(1 for name in names if re.fullmatch(r"block_\d+", name))
    head = names.get("head")
    return dict(
        dim=int(stem.dim),
        depth=depth,
        kernel_size=int(block.kernel_size),
        patch_size=int(stem.patch_size),
        activation=block.activation if isinstance(block.activation, str) else str(block.activation),
        classes=int(head.units) if head is not None else None,
    )


def source_model(arch, meta=None):
    """The model a cached ``.weights.h5`` loads into: the source's architecture, any input size, logits."""
    from keras_convmixer.models import ConvMixer

    meta = meta or {}
    return ConvMixer(
        *(arch[k] for k in _ARCH_KEYS),
        activation=arch["activation"],
        include_top=arch["classes"] is not None,
        classes=arch["classes"] or 1,
        classifier_activation=None,
        input_shape=(None, None, 3),
        mean=tuple(meta.get("mean") or presets.IMAGENET_MEAN),
        std=tuple(meta.get("std") or presets.IMAGENET_STD),
        name="convmixer_source",
    )


def _copy_layers(source, target, depth, head):
    for name in ("stem", *(f"block_{i}" for i in range(depth)), *(("head",) if head else ())):
        target.get_layer(name).set_weights(source.get_layer(name).get_weights())


def _describe(arch):
    return f"ConvMixer-{arch['dim']}/{arch['depth']} (kernel {arch['kernel_size']}, patch {arch['patch_size']})"


def check_architecture(weights, model_arch_, model_name):
    """One line naming both architectures when the weights do not fit the model."""
    if any(weights.arch[k] != model_arch_[k] for k in _ARCH_KEYS):
        raise ValueError(
            f"Weights {weights.source!r} are {_describe(weights.arch)} but the model {model_name!r} is "
            f"{_describe(model_arch_)}: build the model with the weights' architecture."
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
    arch = model_arch(model)
    if variant is None and isinstance(spec, (str, os.PathLike)) and os.fspath(spec) == "imagenet":
        variant = variant_for_arch(*(arch[k] for k in _ARCH_KEYS)) or _name_variant(model.name)
    weights = resolve_weights(spec, variant)
    return load_resolved(model, weights, load_head=load_head)


def _name_variant(name):
    try:
        return presets.canonical_name(name)
    except ValueError:
        return None


def load_resolved(model, weights, *, load_head="auto"):
    """``load_pretrained`` for an already resolved ``PretrainedWeights``."""
    arch = model_arch(model)
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
    source = source_model(weights.arch, weights.meta)
    source.load_weights(weights.path)
    _copy_layers(source, model, arch["depth"], head=head_loaded)
    return dict(source=weights.source, sha256=weights.sha256, head_loaded=bool(head_loaded), meta=weights.meta)
