"""A run's settings, frozen, and the record of what the run found and used, kept apart.

``Config`` holds what ``recipes.resolve_config`` resolved: the settings of ``settings.SETTINGS``, the
``recipe``, and what is derived from them (``from_weights``, ``model_kwargs``). Training never writes
into it; what a run learns on the way (the backend, the strategy and precision it got, the classes of
the data, the pretrained weights it loaded) goes into a ``RunRecord``. ``run_json`` joins the two into the
flat config.json that the readers of a run directory (evaluate, predict, export, ``--weights RUN``) and
``--config`` read. Neither Keras nor a backend is imported here.
"""

import copy
import dataclasses
import types
from collections.abc import Mapping

from keras_convmixer import recipes
from keras_convmixer.settings import BY_NAME

# Keys of a resolved config that are not settings: which recipe, and what follows from the settings.
DERIVED_KEYS = ("recipe", "from_weights", "model_kwargs")
# What a run records beside its settings in config.json (``RunRecord``'s fields, weights aside).
RECORD_KEYS = ("backend", "strategy_used", "precision_used", "num_classes", "class_names")


def _freeze(value):
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value):
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


class Config(Mapping):
    """The resolved settings of one run, read-only: ``config["lr"]`` or ``config.lr``. Lists read as
    tuples; ``as_dict()`` gives the JSON-able dict back. Change it with ``replace``."""

    __slots__ = ("_values",)

    def __init__(self, resolved):
        unknown = sorted(k for k in resolved if k not in BY_NAME and k not in DERIVED_KEYS)
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a setting of a training config.")
        object.__setattr__(self, "_values", {k: _freeze(v) for k, v in resolved.items()})

    def __getitem__(self, key):
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)

    def __getattr__(self, name):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"Config has no setting {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError("Config is frozen: use config.replace(...)")

    def __eq__(self, other):  # equal to the JSON-able dict it was made from, lists and all
        if isinstance(other, Config):
            other = other.as_dict()
        return isinstance(other, Mapping) and self.as_dict() == dict(other)

    __hash__ = None

    def __repr__(self):
        return f"Config({self.as_dict()!r})"

    def as_dict(self):
        return {k: _thaw(v) for k, v in self._values.items()}

    def replace(self, **changes):
        """A new Config with ``changes``, checked again (``model_kwargs`` follows them)."""
        values = {**self.as_dict(), **copy.deepcopy(changes)}
        recipes.check_config(values)
        values["model_kwargs"] = recipes.model_kwargs(values)
        return Config(values)

    def with_weights_meta(self, meta):
        """The settings listed in ``from_weights`` set to the pretrained weights' ``meta``
        (``recipes.apply_weights_meta``), checked."""
        return Config(recipes.apply_weights_meta(self.as_dict(), meta))


@dataclasses.dataclass
class RunRecord:
    """What a run found and used, filled in as training learns it."""

    backend: str
    strategy_used: str = None
    precision_used: str = None
    num_classes: int = None
    class_names: list = None
    # {source, sha256, head_loaded} of the pretrained weights the run started from (None: none loaded now).
    weights: dict = None

    def as_dict(self):
        return dataclasses.asdict(self)


def run_json(config, record):
    """The flat config.json of a run: its settings, with what it used beside them. ``weights`` holds the
    record of the loaded weights where the run loaded some, as it always has (the readers take its
    ``source``)."""
    out = config.as_dict()
    fields = record.as_dict()
    weights = fields.pop("weights")
    out.update({k: v for k, v in fields.items() if v is not None})
    if weights is not None:
        out["weights"] = weights
    return out


def view(config, record):
    """One dict with the settings and what the run found (``num_classes``, ``class_names``), for the code
    that reads both, such as the model builder and the weight loader; the weights stay the setting."""
    fields = {k: v for k, v in record.as_dict().items() if k != "weights" and v is not None}
    return {**config.as_dict(), **fields}


def weights_spec(value):
    """The ``--weights`` setting of a config.json ``weights`` entry: the spec, or the ``source`` of a record."""
    return value.get("source") if isinstance(value, Mapping) else value
