"""Resume reconciliation (keras_convmixer.resume) on config.json files as runs wrote them."""

import pytest

from keras_convmixer import recipes, resume
from keras_convmixer.config import Config, RunRecord, run_json


def _saved(config):
    return run_json(config, RunRecord(backend="jax", strategy_used="none", precision_used="float32", num_classes=10))


def test_a_run_begun_before_lr_breakpoints_existed_continues_on_the_official_schedule(tmp_path):
    config = Config(recipes.resolve_config("demo", {"output_dir": str(tmp_path)}))
    assert config.lr_breakpoints == "steps"  # today's default
    old = {k: v for k, v in _saved(config).items() if k != "lr_breakpoints"}
    resumed, _ = resume.reconcile(config, old, str(tmp_path), "jax", starting=False)
    assert resumed.lr_breakpoints == "official"
    # A run that recorded the setting keeps what it recorded, and another value is another run.
    same, _ = resume.reconcile(config, _saved(config), str(tmp_path), "jax", starting=False)
    assert same.lr_breakpoints == "steps"
    with pytest.raises(ValueError, match="--lr-breakpoints"):
        resume.reconcile(config.replace(lr_breakpoints="official"), _saved(config), str(tmp_path), "jax", False)
