"""The frozen run config and the run record beside it (Keras-free)."""

import json

import pytest

from keras_convmixer import recipes, settings
from keras_convmixer.config import DERIVED_KEYS, Config, RunRecord, run_json, view, weights_spec


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


# ----------------------------------------------------------------------------- the settings round trip

# Every setting away from the demo recipe's value (but the few that other settings pin), as a user types them.
EVERY_SETTING = (
    "--recipe cifar10 --output-dir runs/x --model custom --dim 16 --depth 2 --kernel-size 7 --patch-size 4 "
    "--activation relu --dropout 0.25 --initializer keras --weights some/run.keras --freeze-backbone "
    "--data digits --data-dir tfds --download --val-split 300 --val-source test --split-seed 3 --in-memory "
    "--augment-on device --image-size 24 --crop-pct 0.875 --interpolation bicubic --mean 0.5,0.4,0.3 "
    "--std 0.2,0.25,0.3 --epochs 3 --batch-size 16 --lr 0.003 --weight-decay 0.01 --epsilon 1e-6 "
    "--clip-norm 2 --schedule cosine --lr-breakpoints official --warmup-epochs 0.5 --wd-exclude-bias-bn "
    "--precision mixed_bfloat16 --seed 7 --crop-scale 0.3,0.9 --crop-ratio 0.5,2 --train-interpolation bicubic "
    "--hflip 0.25 --randaug-n 1 --randaug-m 5 --randaug-mstd 0.5 --randaug-scale timm --color-jitter 0.4 "
    "--reprob 0.1 --mixup 0.2 --cutmix 0.3 --mix-prob 0.5 --switch-prob 0.25 --smoothing 0.05 --strategy none "
    "--logical-cpus 2 --coordinator host:1234 --steps-per-epoch 5 --val-steps 2 --verbose 1"
).split()
# Pinned: keras_cv needs --augment-on host (--in-memory needs device); several processes need JAX;
# --freeze-backbone refuses a --backbone-lr-scale.
PINNED = {"augment_impl", "num_processes", "process_id", "backbone_lr_scale"}


def _printed(capsys, argv):
    from keras_convmixer.cli.train import main  # Keras-free: --print-config loads no framework

    assert main([*argv, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def _settings(resolved):
    return {k: v for k, v in resolved.items() if k in settings.BY_NAME or k in DERIVED_KEYS}


def test_every_setting_survives_print_config_then_config(tmp_path, capsys):
    printed = _printed(capsys, EVERY_SETTING)
    cifar10 = recipes.resolve_config("cifar10", {"output_dir": "out"})
    same = sorted(k for k in settings.BY_NAME if printed[k] == cifar10[k] and k not in PINNED)
    assert same == [], "settings the test leaves at the recipe's value: " + ", ".join(same)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(printed))
    assert _printed(capsys, ["--config", str(path)]) == printed


def test_a_run_dirs_config_json_reads_back_as_the_settings_of_its_run(tmp_path, capsys):
    # config.json as a run writes it (run_json), with everything the run recorded beside its settings.
    printed = _printed(capsys, EVERY_SETTING)
    record = RunRecord(backend="jax", strategy_used="none", precision_used="mixed_bfloat16", num_classes=10)
    record.class_names = [str(i) for i in range(10)]
    record.weights = {"source": "some/run.keras", "sha256": "ab" * 32, "head_loaded": True}
    saved = run_json(Config(printed), record)
    assert saved["weights"] != printed["weights"] and set(saved) > set(printed)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved))
    assert _settings(_printed(capsys, ["--config", str(path)])) == _settings(printed)
