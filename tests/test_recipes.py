"""Recipes, config resolution and every config check, without Keras."""

import json
import os
import subprocess
import sys

import keras
import pytest

from keras_convmixer import recipes, settings
from keras_convmixer.presets import CIFAR10_MEAN, IMAGENET_MEAN, MODEL_CONFIGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = keras.backend.backend()
OTHER_BACKEND_STRATEGY = "mirrored" if BACKEND != "tensorflow" else "data-parallel"
OTHER_BACKEND = "tensorflow" if BACKEND != "tensorflow" else "jax"

# Imports the module, resolves a config (which checks the data folder) and reports what it loaded.
_PROBE = """
import json, sys
from keras_convmixer import recipes
cfg = recipes.resolve_config("cifar10", {"data": "folder:" + sys.argv[1], "output_dir": "unused"})
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"keras", "tensorflow", "jax", "torch"})
print(json.dumps({"heavy": heavy, "backend": recipes.keras_backend(), "model": cfg["model"]}))
"""


def test_recipes_import_and_resolve_without_keras_and_find_the_backend_as_keras_does(tmp_path):
    home = tmp_path / "keras-home"
    home.mkdir()
    (home / "keras.json").write_text(json.dumps({"backend": "jax", "floatx": "float32"}))
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env.update(KERAS_HOME=str(home), PYTHONPATH=ROOT)
    reports = []
    for extra in ({}, {"KERAS_BACKEND": "torch"}):  # keras.json, then the variable that overrides it
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, str(tmp_path)],
            env={**env, **extra},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        reports.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert [r["heavy"] for r in reports] == [[], []]
    assert [r["backend"] for r in reports] == ["jax", "torch"]
    assert reports[0]["model"] == "convmixer_256_8"


def test_recipe_values_then_overrides():
    cfg = recipes.resolve_config("cifar10", {"lr": 0.1, "epochs": None, "output_dir": "x"})
    assert cfg["recipe"] == "cifar10" and cfg["lr"] == 0.1
    assert cfg["epochs"] == 25  # None leaves the recipe's value
    assert cfg["crop_scale"] == [1.0, 1.0] and cfg["randaug_scale"] == "torchvision"
    assert cfg["mean"] == list(CIFAR10_MEAN)
    # A named model brings its architecture.
    row = MODEL_CONFIGS["convmixer_256_8"]
    assert (cfg["dim"], cfg["depth"], cfg["kernel_size"], cfg["patch_size"]) == (
        row["dim"],
        row["depth"],
        row["kernel_size"],
        row["patch_size"],
    )
    assert cfg["model_kwargs"] == dict(
        input_shape=[32, 32, 3],
        classifier_activation=None,
        dropout=0.0,
        initializer="torch",
        mean=[0.4914, 0.4822, 0.4465],
        std=[0.2471, 0.2435, 0.2616],
    )
    json.dumps(cfg)  # the record in config.json


def test_model_names_and_custom_models():
    cfg = recipes.resolve_config("demo", {"model": "ConvMixer-768-32", "image_size": 224, "output_dir": "x"})
    assert cfg["model"] == "convmixer_768_32" and cfg["activation"] == "relu"
    assert cfg["mean"] == list(IMAGENET_MEAN)  # the model's own normalisation
    assert recipes.describe_model(cfg) == "ConvMixer-768/32 (dim 768, depth 32, kernel 7, patch 7, relu)"
    demo = recipes.resolve_config("demo", {"output_dir": "x"})
    assert demo["model_kwargs"]["dim"] == 96 and demo["mean"] == list(IMAGENET_MEAN)
    assert recipes.describe_model(demo) == "a custom ConvMixer-96/4 (dim 96, depth 4, kernel 3, patch 4)"
    assert recipes.recipe_value("imagenet", "patch_size") == 7 and recipes.recipe_value("demo", "patch_size") == 4
    assert recipes.resolve_config("demo", {})["output_dir"].startswith("runs" + os.sep)


@pytest.mark.parametrize(
    "recipe, overrides, message",
    [
        ("nope", {}, "Unknown recipe 'nope'. Available: imagenet, cifar10, demo."),
        ("demo", {"learning_rate": 1}, "Unknown config key 'learning_rate'."),
        ("demo", {"model": "convmixer_9_9"}, "Unknown model"),
        ("cifar10", {"dim": 128}, "--dim sets the architecture of --model custom, not of the named model"),
        ("demo", {"dim": None, "model": "custom", "depth": 2}, None),  # the demo's own dim stays
        ("imagenet", {"model": "custom"}, "--model custom needs --dim, --depth, --kernel-size and --patch-size."),
        (
            "demo",
            {"image_size": 30},
            "--image-size 30 is not divisible by the patch size 4: use a multiple of 4 (e.g. 28)",
        ),
        ("demo", {"lr": -1}, "--lr -1 is out of range: it must be in (0, inf)"),
        ("demo", {"lr": float("nan")}, "--lr nan is out of range"),
        ("demo", {"epochs": 2.5}, "--epochs must be a whole number, got 2.5."),
        ("demo", {"epochs": True}, "--epochs must be a number, got True."),
        ("demo", {"hflip": 1.5}, "--hflip 1.5 is out of range: it must be in [0, 1]"),
        ("demo", {"crop_pct": 0}, "--crop-pct 0 is out of range: it must be in (0, 1]"),
        ("demo", {"crop_ratio": (2, 1)}, "--crop-ratio 2.0,1.0 must be two numbers with 0 < low <= high."),
        ("demo", {"val_split": 2.5}, "--val-split 2.5 must be a fraction in [0, 1) or a whole number of images."),
        ("demo", {"process_id": 1}, "--process-id 1 must be in [0, --num-processes 1)."),
        ("demo", {"strategy": "ring"}, "--strategy must be one of auto, none, mirrored"),
        ("demo", {"precision": "fp8"}, "--precision must be one of auto, float32, mixed_float16, mixed_bfloat16"),
        ("demo", {"augment_on": "gpu"}, "--augment-on must be one of host, device, got 'gpu'."),
        ("demo", {"augment_impl": "x"}, "--augment-impl must be one of convmixer, keras_cv"),
        ("demo", {"randaug_scale": "x"}, "--randaug-scale must be one of timm, torchvision"),
        ("demo", {"initializer": "x"}, "--initializer must be one of torch, keras"),
        ("demo", {"train_interpolation": "area"}, "--train-interpolation must be one of bilinear, bicubic, random"),
        ("demo", {"interpolation": "lanczos"}, "--interpolation must be one of bilinear, bicubic, nearest, area"),
        ("demo", {"schedule": "step"}, "--schedule must be one of onecycle, cosine"),
        (
            "demo",
            {"strategy": OTHER_BACKEND_STRATEGY},
            f"needs KERAS_BACKEND={OTHER_BACKEND} (this run uses {BACKEND})",
        ),
        ("demo", {"augment_impl": "keras_cv", "augment_on": "device"}, "keras_cv runs only in the tf.data map"),
        ("demo", {"in_memory": True}, "--in-memory feeds arrays without tf.data: it needs --augment-on device."),
        ("demo", {"data": "s3:bucket"}, "unknown data source 's3:bucket'"),
    ],
)
def test_every_mistake_is_one_line_naming_the_flag(recipe, overrides, message):
    if message is None:
        assert recipes.resolve_config(recipe, overrides)["dim"] == 96
        return
    with pytest.raises(ValueError) as err:
        recipes.resolve_config(recipe, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_multi_process_needs_jax_and_streams_folders_and_tfds_or_holds_data_in_memory(tmp_path):
    two = {"num_processes": 2, "coordinator": "127.0.0.1:1234"}
    if BACKEND != "jax":
        with pytest.raises(ValueError, match="needs KERAS_BACKEND=jax"):
            recipes.resolve_config("demo", two)
        return
    (tmp_path / "a").mkdir()
    folder = f"folder:{tmp_path}"
    for overrides, message in (
        ({}, "--num-processes 2 streams image folders and TFDS: a digits source needs --in-memory."),
        ({"data": folder, "augment_on": "host"}, "streams its data with the augmentation on the device"),
        ({"data": "tfds:cifar10", "augment_on": "host"}, "add --augment-on device"),
        ({"data": folder, "augment_on": "device", "batch_size": 33}, "--batch-size 33 is global: it must split"),
        ({"in_memory": True, "augment_on": "device", "batch_size": 33}, "--batch-size 33 is global"),
    ):
        with pytest.raises(ValueError) as err:
            recipes.resolve_config("demo", {**two, **overrides})
        assert message in str(err.value) and "\n" not in str(err.value)
    for fine in (
        {"data": folder, "augment_on": "device"},
        {"data": "tfds:cifar10", "augment_on": "device"},
        {"in_memory": True, "augment_on": "device"},
    ):
        assert recipes.resolve_config("demo", {**two, **fine})["num_processes"] == 2


def test_a_missing_data_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="Data folder '.*missing' does not exist."):
        recipes.resolve_config("demo", {"data": f"folder:{tmp_path / 'missing'}"})


# ----------------------------------------------------------------------------- fine-tuning settings


def test_fine_tuning_defaults_and_checks():
    cfg = recipes.resolve_config("demo")
    assert (cfg["weights"], cfg["freeze_backbone"], cfg["backbone_lr_scale"], cfg["from_weights"]) == (
        None,
        False,
        1.0,
        [],
    )
    for value in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"^--backbone-lr-scale {value} is out of range: it must be in \(0, 1\]"):
            recipes.resolve_config("demo", {"backbone_lr_scale": value})
    with pytest.raises(ValueError, match="^--backbone-lr-scale 0.5 has no effect with --freeze-backbone"):
        recipes.resolve_config("demo", {"backbone_lr_scale": 0.5, "freeze_backbone": True})
    with pytest.raises(ValueError, match="^--weights imagenet needs --model with released ImageNet weights"):
        recipes.resolve_config("demo", {"weights": "imagenet"})  # the demo's custom model has none
    with pytest.raises(ValueError, match=r"^--weights 'hf://' is not 'hf://owner/repo'"):
        recipes.resolve_config("demo", {"weights": "hf://"})


def test_settings_follow_the_weights_unless_given():
    # A path's metadata is read at training time; resolve_config records what may follow it.
    cfg = recipes.resolve_config("demo", {"weights": "some/run", "crop_pct": 0.9})
    assert cfg["from_weights"] == ["mean", "std", "interpolation", "image_size"]
    recipes.apply_weights_meta(
        cfg, dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=0.8, interpolation="bicubic", image_size=32)
    )
    assert (cfg["mean"], cfg["std"], cfg["crop_pct"], cfg["interpolation"], cfg["image_size"]) == (
        [0.5] * 3,
        [0.25] * 3,
        0.9,  # given, so kept
        "bicubic",
        32,
    )
    assert cfg["model_kwargs"]["input_shape"] == [32, 32, 3] and cfg["model_kwargs"]["mean"] == [0.5] * 3
    # A size from the weights must still fit the patch size (4 for the demo).
    with pytest.raises(ValueError, match="^--image-size 30 is not divisible by the patch size 4"):
        recipes.apply_weights_meta(cfg, {"image_size": 30})


def test_imagenet_weights_set_the_published_eval_transform():
    # The released 768/32 was evaluated at 224 px, crop 0.96, bicubic, ImageNet mean/std (REFERENCE.md).
    cfg = recipes.resolve_config("cifar10", {"weights": "imagenet", "model": "convmixer_768_32"})
    assert (cfg["image_size"], cfg["crop_pct"], cfg["interpolation"]) == (224, 0.96, "bicubic")
    assert cfg["mean"] == [0.485, 0.456, 0.406] and cfg["std"] == [0.229, 0.224, 0.225]  # not the recipe's CIFAR ones
    given = recipes.resolve_config("cifar10", {"weights": "imagenet", "model": "convmixer_768_32", "image_size": 112})
    assert given["image_size"] == 112 and given["model_kwargs"]["input_shape"] == [112, 112, 3]


# ----------------------------------------------------------------------------- what each recipe changes


def test_a_recipe_lists_only_what_it_changes_from_base():
    for name, recipe in recipes.RECIPES.items():
        restated = sorted(k for k, v in recipe.items() if k in settings.BASE and settings.BASE[k] == v)
        assert not restated, f"recipe {name} restates BASE values: {restated}"
        assert set(recipe) <= set(settings.BY_NAME), name
        assert set(settings.REQUIRED_SETTINGS) <= set(recipe), name


# The paper's timm command and the official CIFAR script (REFERENCE.md), written out here, not read from RECIPES.
PAPER = dict(
    imagenet=dict(
        batch_size=640, lr=0.01, epsilon=1e-3, weight_decay=2e-5, wd_exclude_bias_bn=True, epochs=150, clip_norm=1.0,
        crop_scale=[0.08, 1.0], crop_ratio=[0.75, 4 / 3], train_interpolation="random", hflip=0.5, randaug_n=2,
        randaug_m=9.0, randaug_mstd=0.5, randaug_scale="timm", color_jitter=0.0, mixup_alpha=0.5, cutmix_alpha=0.5,
        mix_prob=1.0, switch_prob=0.5, label_smoothing=0.1, reprob=0.25, crop_pct=0.96, interpolation="bicubic",
        mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], image_size=224, schedule="onecycle",
    ),
    cifar10=dict(
        model="convmixer_256_8", batch_size=512, epochs=25, lr=0.05, weight_decay=0.005, wd_exclude_bias_bn=False,
        epsilon=1e-8, clip_norm=None, label_smoothing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0, crop_scale=[1.0, 1.0],
        crop_ratio=[1.0, 1.0], hflip=0.5, randaug_n=2, randaug_m=12.0, randaug_scale="torchvision", color_jitter=0.0,
        reprob=0.0, mean=[0.4914, 0.4822, 0.4465], std=[0.2471, 0.2435, 0.2616], image_size=32, schedule="onecycle",
    ),
)  # fmt: skip


@pytest.mark.parametrize("recipe", sorted(PAPER))
def test_the_paper_recipes_resolve_to_the_published_settings(recipe):
    cfg = recipes.resolve_config(recipe, {"output_dir": "x"})
    assert {k: cfg[k] for k in PAPER[recipe]} == PAPER[recipe]


def test_normalisation_flags_and_agreeing_architecture_are_accepted():
    cfg = recipes.resolve_config("cifar10", {"mean": [0.5, 0.5, 0.5], "output_dir": "x"})
    assert (
        cfg["mean"] == [0.5] * 3 and cfg["std"] == [0.2471, 0.2435, 0.2616] and cfg["model_kwargs"]["mean"] == [0.5] * 3
    )
    # The demo's custom model has no normalisation of its own: ImageNet's, each of mean and std on its own.
    assert recipes.resolve_config("demo", {"std": [1, 1, 1]})["mean"] == [0.485, 0.456, 0.406]
    # A printed config restates the named model's architecture; only another value is refused.
    same = recipes.resolve_config("cifar10", {"dim": 256, "depth": 8, "kernel_size": 5, "patch_size": 2})
    assert same["dim"] == 256
    with pytest.raises(ValueError, match=r"^--depth sets the architecture of --model custom, .* \(depth 8\)\.$"):
        recipes.resolve_config("cifar10", {"depth": 9})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"std": [0.2, 0.0, 0.2]}, "--std must be three positive numbers (R,G,B), got [0.2, 0.0, 0.2]."),
        ({"mean": [0.5, 0.5]}, "--mean must be three finite numbers (R,G,B), got [0.5, 0.5]."),
        ({"mean": [0.5, float("nan"), 0.5]}, "--mean must be three finite numbers"),
        ({"mean": [123.7, 116.3, 103.5]}, "--mean [123.7, 116.3, 103.5] must be fractions of 1 (e.g. 0.485"),
        ({"std": [0.2, -0.1, 0.2]}, "--std must be three positive numbers"),
        ({"in_memory": "yes"}, "--in-memory must be true or false, got 'yes'."),
        ({"mixup_alpha": -1}, "--mixup -1 is out of range: it must be in [0, inf)."),
    ],
)
def test_normalisation_and_flag_named_mistakes(overrides, message):
    with pytest.raises(ValueError) as err:
        recipes.resolve_config("demo", overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_numbers_take_their_settings_type():
    cfg = recipes.resolve_config("demo", {"epochs": 3.0, "warmup_epochs": 1, "randaug_m": 9})
    assert [(cfg[k], type(cfg[k])) for k in ("epochs", "warmup_epochs", "randaug_m")] == [
        (3, int),
        (1.0, float),
        (9.0, float),
    ]
