"""The frozen run config and the run record beside it (Keras-free)."""

import json

import pytest

from keras_convmixer import recipes
from keras_convmixer.config import Config, RunRecord, run_json, view, weights_spec


def _config(**overrides):
    return Config(recipes.resolve_config("cifar10", dict(output_dir="x", **overrides)))


def test_a_config_reads_like_the_resolved_dict_and_cannot_be_changed():
    resolved = recipes.resolve_config("cifar10", {"output_dir": "x"})
    config = Config(resolved)
    assert config == resolved and config.as_dict() == resolved and config.lr == 0.05 == config["lr"]
    assert config.mean == (0.4914, 0.4822, 0.4465)  # lists read as tuples
    with pytest.raises(AttributeError, match="frozen"):
        config.lr = 1.0
    with pytest.raises(TypeError):
        config["lr"] = 1.0
    with pytest.raises(TypeError):
        config.model_kwargs["dropout"] = 0.5
    with pytest.raises(AttributeError, match="no setting 'lrr'"):
        config.lrr  # noqa: B018
    with pytest.raises(ValueError, match="'num_classes' is not a setting"):
        Config(dict(resolved, num_classes=10))  # what a run finds belongs in its record


def test_replace_checks_and_keeps_the_derived_keys_in_step():
    config = _config()
    smaller = config.replace(image_size=64, mean=[0.5, 0.5, 0.5])
    assert smaller.model_kwargs["input_shape"] == (64, 64, 3) and smaller.model_kwargs["mean"] == (0.5, 0.5, 0.5)
    assert config.image_size == 32  # the original stands
    with pytest.raises(ValueError, match="^--image-size 33 is not divisible by the patch size 2"):
        config.replace(image_size=33)


def test_config_json_is_the_settings_with_the_run_record_beside_them():
    config = _config(weights="some/run.keras")
    assert config.weights == "some/run.keras"
    record = RunRecord(backend="jax", strategy_used="none", precision_used="float32", num_classes=2)
    record.class_names = ["cat", "dog"]
    assert view(config, record)["num_classes"] == 2 and view(config, record)["weights"] == "some/run.keras"
    plain = run_json(config, record)
    assert plain == {**config.as_dict(), **dict(backend="jax", strategy_used="none", precision_used="float32")} | {
        "num_classes": 2,
        "class_names": ["cat", "dog"],
    }
    record.weights = {"source": "some/run.keras", "sha256": "ab" * 32, "head_loaded": False}
    loaded = run_json(config, record)
    assert loaded["weights"] == record.weights and weights_spec(loaded["weights"]) == "some/run.keras"
    json.dumps(loaded)
    assert config.weights == "some/run.keras"  # the setting keeps its type
