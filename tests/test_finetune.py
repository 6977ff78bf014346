"""Fine-tuning in ``train()``: ``--weights`` (the backbone starts from a checkpoint, the head is new when the
class count differs, never reloaded on resume), ``--freeze-backbone`` and ``--backbone-lr-scale`` (checked
against ``torch.optim.AdamW`` with parameter groups), and transfer on real data: sklearn digits 0-4 help
digits 5-9."""

import hashlib
import json
import shutil

import keras
import numpy as np
import pytest
from PIL import Image

from keras_convmixer import finetune, recipes, training
from keras_convmixer.data.sources import digits_arrays
from keras_convmixer.models import ConvMixer
from keras_convmixer.optim import BACKBONE_VARIABLES, GroupedAdamW
from keras_convmixer.schedules import OneCycle
from tests.helpers import to_numpy

BACKEND = keras.backend.backend()
# Big enough that features learnt on five digits carry over to the other five; seconds per epoch.
MODEL = dict(model="custom", dim=64, depth=2, kernel_size=3, patch_size=2, image_size=8)
# In-memory arrays and device augmentation: the same path on every backend, no tf.data.
RUN = dict(
    MODEL,
    batch_size=32,
    in_memory=True,
    augment_on="device",
    crop_scale=(1.0, 1.0),
    label_smoothing=0.0,
    val_split=0.25,
    verbose=0,
)
# Not the default (ImageNet's) normalisation, so that a run that follows the weights is seen to.
SOURCE_MEAN, SOURCE_STD = [0.25, 0.5, 0.75], [0.2, 0.3, 0.4]


def _train(out, **settings):
    return training.train(recipes.resolve_config("demo", dict(RUN, output_dir=str(out), **settings)))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """sklearn's digits as two image folders: ``low`` (0-4), ``high`` (5-9), and ``few`` (7-9, three classes)."""
    root = tmp_path_factory.mktemp("digits")
    images, labels = digits_arrays()
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        for name, keep in (("low", label < 5), ("high", label >= 5), ("few", label >= 7)):
            if keep:
                folder = root / name / f"digit_{label}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def source(digits, tmp_path_factory):
    """A short run on digits 0-4; its best.keras is the pretrained checkpoint."""
    out = tmp_path_factory.mktemp("source") / "run"
    keras.utils.set_random_seed(0)
    metrics = _train(out, data=f"folder:{digits / 'low'}", epochs=3, lr=0.01, mean=SOURCE_MEAN, std=SOURCE_STD)
    assert metrics["val_top1"] > 0.8  # chance is 0.2: the features are worth transferring
    return out / "best.keras"


def _load(path):
    import keras_convmixer

    return keras_convmixer.load_model(str(path), compile=False)


def _layer_weights(model, names):
    return {f"{n}/{i}": to_numpy(w) for n in names for i, w in enumerate(model.get_layer(n).weights)}


def _backbone(model):
    names = [layer.name for layer in model.layers if layer.name == "stem" or layer.name.startswith("block_")]
    assert names == ["stem", *(f"block_{i}" for i in range(MODEL["depth"]))]
    return _layer_weights(model, names)


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- --backbone-lr-scale


def test_grouped_adamw_matches_torch_adamw_with_two_param_groups():
    torch = pytest.importorskip("torch")
    keras.utils.set_random_seed(1)
    model = ConvMixer(4, 1, 3, 2, input_shape=(8, 8, 3), classes=3)
    variables = model.trainable_variables
    lr, wd, scale, steps = 0.01, 0.05, 0.25, 4
    schedule = OneCycle(lr, 3 * steps, steps_per_epoch=3)  # the lr changes every step
    optimizer = GroupedAdamW(learning_rate=schedule, weight_decay=wd, epsilon=1e-8, lr_scale=scale)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])  # as train() does

    rng = np.random.default_rng(0)
    grads = [[rng.normal(0, 1, v.shape).astype("float32") for v in variables] for _ in range(steps)]

    def reference(backbone_scale):
        """torch.optim.AdamW in float64, one group per (backbone or not, decayed or not)."""
        params = [torch.tensor(to_numpy(v), dtype=torch.float64, requires_grad=True) for v in variables]
        groups = {}
        for v, p in zip(variables, params, strict=True):
            backbone = v.path.split("/")[0] == "stem" or v.path.startswith("block_")
            decayed = v.name not in ("bias", "gamma", "beta")
            groups.setdefault((backbone, decayed), []).append(p)
        opt = torch.optim.AdamW(
            [
                dict(params=ps, weight_decay=wd if decayed else 0.0, scale=backbone_scale if backbone else 1.0)
                for (backbone, decayed), ps in groups.items()
            ],
            lr=lr,
            eps=1e-8,
        )
        for t in range(steps):
            rate = float(to_numpy(schedule(t)))
            for group in opt.param_groups:
                group["lr"] = rate * group["scale"]
            for p, g in zip(params, grads[t], strict=True):
                p.grad = torch.tensor(g, dtype=torch.float64)
            opt.step()
        return [p.detach().numpy() for p in params]

    expected, unscaled = reference(scale), reference(1.0)
    for t in range(steps):
        optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads[t]], variables)

    scaled = sorted(v.path for v in variables if optimizer.scaled(v))
    assert scaled == sorted(v.path for v in variables if not v.path.startswith("head/"))
    error = max(np.abs(to_numpy(v) - e).max() for v, e in zip(variables, expected, strict=True))
    assert error < 1e-6
    # The groups matter: one learning rate for everything is far off the reference.
    assert max(np.abs(e - u).max() for e, u in zip(expected, unscaled, strict=True)) > 100 * max(error, 1e-7)
    restored = GroupedAdamW.from_config(optimizer.get_config())
    assert (restored.lr_scale, restored.scaled_variables) == (scale, BACKBONE_VARIABLES)


@pytest.mark.parametrize("scale", [0, 1.5, float("nan"), True])
def test_grouped_adamw_rejects_a_scale_outside_0_1(scale):
    with pytest.raises(ValueError, match=r"lr_scale must be a number in \(0, 1\]"):
        GroupedAdamW(lr_scale=scale)


# ----------------------------------------------------------------------------- --weights


def test_backbone_starts_from_the_checkpoint_and_the_head_from_the_data(source):
    """What train() does before its first step: the classifier is built for the data's classes, then loaded."""
    src = _load(source)
    for classes, head_loaded in ((5, True), (3, False)):
        cfg = recipes.resolve_config("demo", dict(RUN, weights=str(source)))
        cfg["num_classes"] = classes
        model = finetune.build_model(cfg)
        fresh_head = to_numpy(model.get_layer("head").kernel)
        record = finetune.load_backbone(model, cfg)
        assert record == dict(source=str(source), sha256=_sha256(source), head_loaded=head_loaded)
        for name, value in _backbone(src).items():
            np.testing.assert_array_equal(_backbone(model)[name], value, err_msg=name)
        head = to_numpy(model.get_layer("head").kernel)
        if head_loaded:
            np.testing.assert_array_equal(head, to_numpy(src.get_layer("head").kernel))
        else:
            assert head.shape == (MODEL["dim"], 3)
            np.testing.assert_array_equal(head, fresh_head)  # left as initialised


def test_freeze_backbone_trains_only_the_new_head_and_resume_keeps_the_run(source, digits, tmp_path):
    weights = tmp_path / "pretrained"  # a run directory: its best.keras and the config.json beside it
    weights.mkdir()
    for name in ("best.keras", "config.json"):
        shutil.copy(source.parent / name, weights / name)
    out = tmp_path / "probe"
    settings = dict(data=f"folder:{digits / 'few'}", weights=str(weights), freeze_backbone=True, lr=0.01)
    first = _train(out, epochs=1, **settings)

    config = json.loads((out / "config.json").read_text())
    assert config["weights"] == dict(source=str(weights), sha256=_sha256(source), head_loaded=False)
    assert config["freeze_backbone"] is True and config["num_classes"] == 3
    # The normalisation followed the weights; --image-size was given, so it stayed as given.
    assert config["from_weights"] == ["mean", "std", "crop_pct", "interpolation"]
    assert (config["mean"], config["std"]) == (SOURCE_MEAN, SOURCE_STD)
    assert config["model_kwargs"]["mean"] == SOURCE_MEAN

    src, probe = _load(source), _load(out / "last.keras")
    for name, value in _backbone(src).items():  # kernels, BN gamma/beta and moving statistics alike
        np.testing.assert_array_equal(_backbone(probe)[name], value, err_msg=name)
    assert probe.get_layer("head").kernel.shape == (MODEL["dim"], 3)

    # A resume loads the run's own checkpoint: the weights file is not read again (here it is gone).
    shutil.rmtree(weights)
    metrics = _train(out, epochs=1, **settings)
    assert metrics["epochs"] == 1 and metrics["optimizer_steps"] == first["optimizer_steps"]
    for name, value in _backbone(src).items():
        np.testing.assert_array_equal(_backbone(_load(out / "last.keras"))[name], value, err_msg=name)
    # Other weights are another run, refused in one line naming the setting.
    with pytest.raises(ValueError, match=r"other settings \(--weights ") as excinfo:
        _train(out, epochs=1, **dict(settings, weights=str(source)))
    assert "\n" not in str(excinfo.value)


def test_pretrained_on_digits_0_4_beats_scratch_on_5_9_after_one_epoch(source, digits, tmp_path):
    """A few steps on the new classes: features learnt on the others carry over, random ones do not."""
    target = dict(data=f"folder:{digits / 'high'}", epochs=1, steps_per_epoch=6, lr=0.003, schedule="cosine")
    keras.utils.set_random_seed(0)
    tuned = _train(tmp_path / "tuned", weights=str(source), **target)["val_top1"]
    keras.utils.set_random_seed(0)
    scratch = _train(tmp_path / "scratch", **target)["val_top1"]
    print(f"val top-1 after one epoch on digits 5-9: from digits 0-4 {tuned:.4f}, from scratch {scratch:.4f}")
    assert tuned > scratch + 0.05


def _trainable(model, names):
    return {f"{n}/{w.path}": to_numpy(w) for n in names for w in model.get_layer(n).trainable_weights}


def test_backbone_lr_scale_holds_inside_fit(source, digits, tmp_path):
    """The grouped optimizer inside model.fit's compiled train step, on every backend: an Adam step moves a weight
    by about lr at most, so three steps at lr 0.01 with scale 0.1 move no backbone weight by more than ~0.003
    (bounded here by 0.006), where the unscaled step moves some by ~0.03."""
    out = tmp_path / "run"
    lr, scale, steps = 0.01, 0.1, 3
    settings = dict(data=f"folder:{digits / 'few'}", weights=str(source), backbone_lr_scale=scale, lr=lr)
    metrics = _train(out, epochs=1, steps_per_epoch=steps, schedule="cosine", **settings)
    assert metrics["optimizer_steps"] == steps and np.isfinite(metrics["val_top1"])
    assert json.loads((out / "config.json").read_text())["backbone_lr_scale"] == scale
    names = ["stem", *(f"block_{i}" for i in range(MODEL["depth"]))]
    before, after = _trainable(_load(source), names), _trainable(_load(out / "last.keras"), names)
    moved = max(float(np.abs(after[k] - before[k]).max()) for k in before)
    assert 0 < moved <= 2 * steps * lr * scale, moved
