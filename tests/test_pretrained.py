"""weights="imagenet" / "hf://..." / a path, through the real huggingface_hub client and a local Hub server.

The checkpoints are made by real timm (random weights, BatchNorm statistics from a train-mode batch, then
perturbed) and saved with safetensors as timm's Hub files are; logits are compared with timm's own. Images are
28x28 (4x4 patches for the 768/32) so that the 32-block model stays cheap on CPU.
"""

import hashlib
import json
import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import keras_convmixer as kc
from keras_convmixer import presets
from tests.helpers import ROOT, to_numpy
from tests.hub_server import HubServer, point_hub_at
from tests.vision_reference import vision_or_skip

pytest.importorskip("huggingface_hub")
pytest.importorskip("safetensors")

RELEASED_REPO = "timm/convmixer_768_32.in1k"
TINY_REPO = "someone/tiny-convmixer"
CORRUPT_REPO = "someone/corrupt-convmixer"
TINY = dict(dim=16, depth=2, kernel_size=3, patch_size=2)
TINY_CLASSES = 5
SIZE = 28


def _images(n, size, seed):
    """Structured images in [0, 255]: gradients, stripes and a bright square, not pure noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        fx, fy, phase = rng.uniform(1, 4, 3)
        channels = [
            0.5 + 0.5 * np.sin(2 * np.pi * (fx * xx + phase)),
            np.clip(xx * rng.uniform(0.5, 1) + yy * rng.uniform(0, 0.5), 0, 1),
            0.5 + 0.5 * np.cos(2 * np.pi * fy * yy),
        ]
        image = np.stack(channels, -1)
        x0, y0 = rng.integers(0, size // 2, 2)
        image[y0 : y0 + size // 4, x0 : x0 + size // 4] = rng.uniform(0.6, 1, 3)
        out.append(image)
    return (255 * np.stack(out)).astype("float32")


def _timm_checkpoint(torch, model, images, seed):
    """Give ``model`` non-identity BatchNorm parameters and statistics; return (safetensors bytes, logits,
    pre-logit features) for ``images``."""
    from safetensors.torch import save

    torch.manual_seed(seed)
    mean = torch.tensor(presets.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(presets.IMAGENET_STD).view(1, 3, 1, 1)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2) / 255.0 - mean) / std

    # A random 32-block ConvMixer is chaotic: statistics that do not fit the activations (or ReLU channels that
    # are nearly constant) blow the logits up to 1e7, where a float32 comparison says little. So each BN gets
    # the statistics of its own input on these images, perturbed, with a variance floor, in one forward pass.
    def calibrate(bn, args):
        c, var = bn.num_features, args[0].var((0, 2, 3))
        bn.running_mean.copy_(args[0].mean((0, 2, 3)) + 0.1 * torch.randn(c) * var.sqrt())
        bn.running_var.copy_(var * torch.empty(c).uniform_(0.8, 1.25) + 0.1)
        bn.weight.copy_(torch.empty(c).uniform_(0.8, 1.2))
        bn.bias.copy_(0.1 * torch.randn(c))

    model.eval()
    with torch.no_grad():
        hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        model(x)
        for hook in hooks:
            hook.remove()
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model(x)
        state = save({k: v.contiguous() for k, v in model.state_dict().items()})
        # The float64 result, to measure float32 rounding by: torch's own float32 is this far off it.
        exact = model.double()(x.double()).numpy()
    return dict(data=state, logits=logits.numpy(), features=features.numpy(), exact=exact)


@pytest.fixture(scope="module")
def checkpoints():
    torch, _, timm = vision_or_skip()
    from timm.models.convmixer import ConvMixer as TimmConvMixer

    images = _images(3, SIZE, seed=1)
    torch.manual_seed(0)  # timm initialises from torch's global generator
    released = timm.create_model("convmixer_768_32", pretrained=False)
    tiny = TimmConvMixer(num_classes=TINY_CLASSES, **TINY)
    big = _timm_checkpoint(torch, released, images, seed=0)
    small = _timm_checkpoint(torch, tiny, images[:, :16, :16], seed=1)
    return dict(
        images=images,
        released=big["data"],
        logits=big["logits"],
        exact=big["exact"],
        tiny=small["data"],
        tiny_images=images[:, :16, :16],
        tiny_logits=small["logits"],
        tiny_features=small["features"],
    )


@pytest.fixture(scope="module")
def hub(checkpoints):
    server = HubServer()
    server.add(RELEASED_REPO, "model.safetensors", checkpoints["released"])
    server.add(TINY_REPO, "model.safetensors", checkpoints["tiny"])
    # Same length as the real file (so huggingface_hub's size check passes), one byte of a tensor changed.
    corrupt = bytearray(checkpoints["tiny"])
    corrupt[-1] ^= 0xFF
    server.add(
        CORRUPT_REPO, "model.safetensors", corrupt, advertised_sha256=hashlib.sha256(checkpoints["tiny"]).hexdigest()
    )
    with server:
        yield server


@pytest.fixture(scope="module")
def homes(tmp_path_factory):
    root = tmp_path_factory.mktemp("homes")
    return root / "hf", root / "keras"


@pytest.fixture
def online(monkeypatch, hub, homes):
    point_hub_at(monkeypatch, hub.url, *homes)
    return hub


@pytest.fixture(scope="module")
def imagenet_download(hub, homes, checkpoints):
    """ConvMixer768_32(weights="imagenet") through the server, once for the module: (logits, requests made)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        point_hub_at(monkeypatch, hub.url, *homes)
        before = len(hub.requests)
        model = kc.ConvMixer768_32(weights="imagenet", input_shape=(SIZE, SIZE, 3), classifier_activation=None)
        logits = to_numpy(model(checkpoints["images"]))
        mean = to_numpy(model.get_layer("normalize").mean)
    return dict(logits=logits, requests=hub.requests[before:], mean=mean)


def _assert_matches_timm(logits, checkpoints):
    """Within a few times torch's own float32 error of timm's float64 logits: 32 ReLU blocks amplify float32
    rounding (torch's float32 is ~1e-3 off here), while a wrong mapping is off by the logits' whole scale."""
    exact = checkpoints["exact"]
    torch_error = float(np.abs(checkpoints["logits"] - exact).max())
    error = float(np.abs(logits - exact).max())
    print(f"768/32 float32 vs timm float64: ours {error:.2e}, torch float32 {torch_error:.2e}")
    assert error <= max(4 * torch_error, 1e-5), (error, torch_error)
    assert float(np.abs(exact).max()) > 0.1 and error < 0.05 * float(np.abs(exact).max())


def test_imagenet_downloads_converts_and_matches_timm(imagenet_download, checkpoints, homes):
    _assert_matches_timm(imagenet_download["logits"], checkpoints)
    files = [(method, path) for method, path in imagenet_download["requests"] if "/resolve/" in path]
    assert {path for _, path in files} == {f"/{RELEASED_REPO}/resolve/main/model.safetensors"}
    assert {method for method, _ in files} == {"HEAD", "GET"}
    np.testing.assert_allclose(imagenet_download["mean"].ravel(), 255 * np.asarray(presets.IMAGENET_MEAN), rtol=1e-6)
    # The weights are cached under KERAS_HOME as the source's tensors (not as a second Keras model), with the
    # source's sha256.
    sha = hashlib.sha256(checkpoints["released"]).hexdigest()
    cache = homes[1] / "models" / "convmixer"
    entries = json.loads((cache / "index.json").read_text())["entries"]
    # Keyed by repo, revision, file and the endpoint it came from (a mirror's repo of the same name is another file).
    (entry,) = [e for k, e in entries.items() if k.startswith(f"hf://{RELEASED_REPO}@main/model.safetensors at http")]
    assert entry["sha256"] == sha and entry["arch"]["activation"] == "relu" and entry["arch"]["classes"] == 1000
    from safetensors.numpy import load, load_file

    cached, source = load_file(cache / entry["file"]), load(checkpoints["released"])
    assert set(cached) == {k for k in source if not k.endswith("num_batches_tracked")}
    for name, value in cached.items():
        np.testing.assert_array_equal(value, source[name], err_msg=name)


# Blocks torch (and timm/torchvision) for the whole process: any import of them fails.
_NO_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision', 'timm'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, _Block())
"""


def test_cache_hit_needs_no_network_and_no_torch(imagenet_download, checkpoints, homes, tmp_path):
    images = tmp_path / "images.npy"
    np.save(images, checkpoints["images"])
    dead = HubServer()  # a port where nothing answers any more
    dead.stop()
    code = _NO_TORCH + (
        "import numpy as np, keras, keras_convmixer as kc\n"
        f"m = kc.ConvMixer768_32(weights='imagenet', input_shape=({SIZE}, {SIZE}, 3), classifier_activation=None)\n"
        f"np.save({str(tmp_path / 'logits.npy')!r}, keras.ops.convert_to_numpy(m(np.load({str(images)!r}))))\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    # A torch-backend Keras needs torch itself; the cache path is checked under another backend there.
    backend = "jax" if keras.backend.backend() == "torch" else keras.backend.backend()
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "PYTHONPATH": ROOT,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "HF_ENDPOINT": dead.url,
        "HF_HOME": str(homes[0]),
        "KERAS_HOME": str(homes[1]),
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
    _assert_matches_timm(np.load(tmp_path / "logits.npy"), checkpoints)


def _blobs(hf_home):
    return {name for _, _, files in os.walk(hf_home) for name in files}


def test_checksum_mismatch_is_one_line_and_the_file_is_not_kept(online, homes, checkpoints):
    advertised = hashlib.sha256(checkpoints["tiny"]).hexdigest()
    for _ in range(2):  # the second call must not pick up a bad file left by the first
        with pytest.raises(ValueError) as err:
            kc.ConvMixer(**TINY, classes=TINY_CLASSES, weights=f"hf://{CORRUPT_REPO}")
        message = str(err.value)
        assert "\n" not in message
        assert CORRUPT_REPO in message and "model.safetensors" in message and advertised in message
    assert advertised not in _blobs(homes[0])
    index = homes[1] / "models" / "convmixer" / "index.json"
    assert not index.exists() or CORRUPT_REPO not in index.read_text()


def test_offline_without_cache_is_one_line_naming_repo_file_and_where(monkeypatch, hub, tmp_path):
    point_hub_at(monkeypatch, hub.url, tmp_path / "hf", tmp_path / "keras", offline=True)
    before = len(hub.requests)
    with pytest.raises(OSError) as err:  # what keras.utils.get_file raises for a file it cannot fetch
        kc.ConvMixer768_32(weights="imagenet")
    message = str(err.value)
    assert "\n" not in message
    assert RELEASED_REPO in message and "HF_HUB_OFFLINE" in message
    assert f"{hub.url}/{RELEASED_REPO}/resolve/main/model.safetensors" in message
    assert "weights='/path/to/model.safetensors'" in message
    assert not [path for _, path in hub.requests[before:] if "/resolve/" in path]


def test_no_network_fails_within_2_seconds_in_one_line(monkeypatch, tmp_path, capfd):
    dead = HubServer()  # a port on 127.0.0.1 that refuses connections once the server is gone
    dead.stop()
    point_hub_at(monkeypatch, dead.url, tmp_path / "hf", tmp_path / "keras")
    kc.ConvMixer(**TINY, classes=TINY_CLASSES)  # Keras loaded, so only the weights are timed
    capfd.readouterr()
    start = time.monotonic()
    with pytest.raises(OSError) as err:
        kc.ConvMixer768_32(weights="imagenet")
    elapsed = time.monotonic() - start
    message = str(err.value)
    # The probe is bounded at 1.5 s; building ConvMixer-768/32 first takes the rest (0.15 s in all on a quiet
    # box, 2.4 s once on a loaded 2-core CI run). The bound tells it from huggingface_hub's 30 s of retries.
    assert elapsed < 8.0, f"took {elapsed:.1f} s"
    assert "\n" not in message and "Connection refused" in message and "not cached" in message
    assert f"{dead.url}/{RELEASED_REPO}/resolve/main/model.safetensors" in message
    assert "Retrying" not in capfd.readouterr().err  # huggingface_hub never got to retry


def test_other_hub_repo_matches_timm(online, checkpoints):
    model = kc.ConvMixer(
        **TINY,
        classes=TINY_CLASSES,
        weights=f"hf://{TINY_REPO}@main",
        classifier_activation=None,
        input_shape=(16, 16, 3),
    )
    reference = checkpoints["tiny_logits"]
    np.testing.assert_allclose(to_numpy(model(checkpoints["tiny_images"])), reference, rtol=0, atol=1e-4)
    # An unnamed shape gets the normalisation of timm's ImageNet checkpoints.
    np.testing.assert_allclose(
        to_numpy(model.get_layer("normalize").mean).ravel(), 255 * np.asarray(presets.IMAGENET_MEAN), rtol=1e-6
    )


def test_include_top_false_loads_the_backbone(online, checkpoints):
    model = kc.ConvMixer(**TINY, include_top=False, pooling="avg", weights=f"hf://{TINY_REPO}", input_shape=(16, 16, 3))
    reference = checkpoints["tiny_features"]
    np.testing.assert_allclose(to_numpy(model(checkpoints["tiny_images"])), reference, rtol=0, atol=1e-4)


def test_local_checkpoint_path_and_a_new_head(tmp_path, monkeypatch, checkpoints):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    path = tmp_path / "model.safetensors"
    path.write_bytes(checkpoints["tiny"])
    model = kc.ConvMixer(
        **TINY, classes=TINY_CLASSES, weights=str(path), classifier_activation=None, input_shape=(16, 16, 3)
    )
    reference = checkpoints["tiny_logits"]
    np.testing.assert_allclose(to_numpy(model(checkpoints["tiny_images"])), reference, rtol=0, atol=1e-4)

    # Fine-tuning on 3 classes: the backbone is the checkpoint's, the head stays new.
    fresh = kc.ConvMixer(**TINY, classes=3, include_preprocessing=True)
    head_before = [to_numpy(w) for w in fresh.get_layer("head").weights]
    info = kc.load_pretrained(fresh, str(path))
    assert info["head_loaded"] is False and info["sha256"] == hashlib.sha256(checkpoints["tiny"]).hexdigest()
    for name in ("stem", "block_0", "block_1"):
        for ours, theirs in zip(fresh.get_layer(name).weights, model.get_layer(name).weights, strict=True):
            np.testing.assert_array_equal(to_numpy(ours), to_numpy(theirs))
    for before, after in zip(head_before, fresh.get_layer("head").weights, strict=True):
        np.testing.assert_array_equal(before, to_numpy(after))
    with pytest.raises(ValueError, match=r"Cannot load the head .* 5 classes but the model has 3"):
        kc.load_pretrained(fresh, str(path), load_head=True)
    # The same tensors under another activation compute another function.
    with pytest.raises(ValueError, match=r"trained with activation='gelu' but the model uses 'relu'"):
        kc.load_pretrained(kc.ConvMixer(**TINY, classes=3, activation="relu"), str(path))


def test_architecture_mismatch_names_both(online):
    model = kc.ConvMixer(16, 3, 3, 2, classes=TINY_CLASSES)
    with pytest.raises(ValueError) as err:
        kc.load_pretrained(model, f"hf://{TINY_REPO}")
    message = str(err.value)
    assert "\n" not in message
    assert "ConvMixer-16/2 (kernel 3, patch 2)" in message and "ConvMixer-16/3 (kernel 3, patch 2)" in message


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: kc.ConvMixer768_32(weights="imagenet", classes=10), r"include_top=True needs classes=1000"),
        (
            lambda: kc.ConvMixer256_8(weights="imagenet"),
            r"ConvMixer1536_20, ConvMixer768_32, ConvMixer1024_20 only \(ConvMixer256_8 has none\)",
        ),
        (lambda: kc.ConvMixer(768, 32, 7, 7, weights="imagenet"), r"trained with activation='relu'"),
        (lambda: kc.ConvMixer(8, 1, 3, 2, weights="hf://no-slash"), r"is not 'hf://owner/repo'"),
        (lambda: kc.ConvMixer(8, 1, 3, 2, weights=3), r"weights must be None, 'imagenet'"),
        (lambda: kc.load_pretrained(kc.ConvMixer(8, 1, 3, 2), "imagenet", load_head="yes"), r"load_head must be"),
        (
            lambda: kc.ConvMixer(16, 2, 3, 2, name="convmixer_768_32", weights="imagenet"),
            r"this architecture \(dim 16, depth 2, kernel 3, patch 2\) is none of the released ones",
        ),
    ],
    ids=["classes", "variant", "activation", "hf-spec", "type", "load-head", "named-like-a-release"],
)
def test_argument_mistakes_are_one_line_before_any_download(call, match, monkeypatch, tmp_path):
    dead = HubServer()
    dead.stop()
    point_hub_at(monkeypatch, dead.url, tmp_path / "hf", tmp_path / "keras", offline=True)
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


def test_pretrained_table_matches_timm():
    _, _, timm = vision_or_skip()
    assert set(presets.PRETRAINED) == {"convmixer_1536_20", "convmixer_768_32", "convmixer_1024_20"}
    for key, row in presets.PRETRAINED.items():
        cfg = timm.models.get_pretrained_cfg(row["hub_id"].split("/")[1])
        assert row["hub_id"] == cfg.hf_hub_id
        assert (row["mean"], row["std"], row["crop_pct"]) == (cfg.mean, cfg.std, cfg.crop_pct)
        assert (row["interpolation"], row["image_size"], row["classes"]) == (
            cfg.interpolation,
            cfg.input_size[-1],
            cfg.num_classes,
        )
        assert row["license"] == cfg.license
        assert presets.canonical_name(cfg.architecture) == key
    assert presets.released_variants() == ["ConvMixer1536_20", "ConvMixer768_32", "ConvMixer1024_20"]
