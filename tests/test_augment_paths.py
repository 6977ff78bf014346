"""The CIFAR-10 recipe's whole training augmentation on its two paths against the official script's.

Device: ``DeviceAugment(cfg, crop=True)``, what ``--in-memory --augment-on device`` runs in the train step.
Host: ``host_image_map(cfg)`` in tf.data, what the default path runs per image. Reference: torchvision's
``Compose([RandomResizedCrop(32, scale=(1, 1), ratio=(1, 1)), RandomHorizontalFlip(), RandAugment(n, 12)])``
on PIL images, the official CIFAR-10 script's transform. The per-op tests elsewhere check each piece
alone; these check the pieces as the recipe assembles them (crop, flip, op choice, sign, magnitude,
rounding and dtype between them), by the distribution of what comes out.
"""

import keras
import numpy as np
import pytest

from keras_convmixer.augment import DeviceAugment, host_image_map
from keras_convmixer.recipes import resolve_config
from tests.helpers import to_numpy
from tests.test_augment_randaugment import structured_images
from tests.vision_reference import vision_or_skip

SIZE = 16  # the recipe's crop keeps the whole image: any size shows the same rules, and 16 is fast
N = 1000


def recipe(randaug_n):
    return resolve_config(
        "cifar10", dict(image_size=SIZE, randaug_n=randaug_n, output_dir="unused", seed=5, augment_on="host")
    )


def device_outputs(cfg, image, n=N):
    layer = DeviceAugment(cfg, crop=True)
    batch = np.repeat(image[None], n, axis=0)  # uint8, as the in-memory arrays arrive
    layer.build(batch.shape)
    state = [v.value for v in layer.non_trainable_variables]

    def run(state, x):
        return layer.stateless_call([], state, x, training=True)[0]

    if keras.backend.backend() == "jax":
        import jax

        run = jax.jit(run)
    return to_numpy(run(state, keras.ops.convert_to_tensor(batch)))


def host_outputs(cfg, image, n=N):
    tf = pytest.importorskip("tensorflow")
    tf.random.set_seed(11)
    ds = tf.data.Dataset.from_tensor_slices(np.repeat(image[None], n, axis=0)).map(host_image_map(cfg))
    return next(iter(ds.batch(n))).numpy()


def torchvision_outputs(image, num_ops, n=N):
    torch, torchvision, _ = vision_or_skip()
    from PIL import Image

    T = torchvision.transforms
    transform = T.Compose(
        [
            T.RandomResizedCrop(SIZE, scale=(1.0, 1.0), ratio=(1.0, 1.0)),
            T.RandomHorizontalFlip(),
            T.RandAugment(num_ops=num_ops, magnitude=12),
        ]
    )
    torch.manual_seed(0)
    pil = Image.fromarray(image)
    return np.stack([np.asarray(transform(pil)) for _ in range(n)]).astype(np.float32)


def one_op_candidates(image):
    """Every (flip, op, sign) output of one image, by torchvision's own op functions."""
    _, torchvision, _ = vision_or_skip()
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.autoaugment import _apply_op

    space = torchvision.transforms.RandAugment(1, 12)._augmentation_space(31, image.shape[:2])
    keys, outs = [], []
    for flip in (0, 1):
        start = Image.fromarray(image[:, ::-1] if flip else image)
        for op, (name, (table, signed)) in enumerate(space.items()):
            m = float(table[12].item()) if table.ndim else 0.0
            for sign in (1, -1) if signed else (1,):
                keys.append((flip, op, sign))
                outs.append(np.asarray(_apply_op(start, name, sign * m, InterpolationMode.NEAREST, None)))
    return keys, np.stack(outs).astype(np.float32)


def identify(outputs, outs):
    dist = np.abs(outputs.reshape(len(outputs), 1, -1) - outs.reshape(1, len(outs), -1)).max(axis=2)
    unmatched = int((dist.min(axis=1) != 0).sum())
    assert unmatched == 0, f"{unmatched} outputs match no (flip, op, sign) exactly"
    return dist.argmin(axis=1)


def test_one_op_recipe_draws_flip_op_and_sign_as_torchvision():
    stats = pytest.importorskip("scipy.stats")
    image = structured_images(1, SIZE, SIZE, seed=4)[0]
    keys, outs = one_op_candidates(image)
    assert len({o.tobytes() for o in outs}) == len(keys)  # each output names its flip, op and sign
    cfg = recipe(randaug_n=1)
    found = {
        "device": identify(device_outputs(cfg, image), outs),
        "host": identify(host_outputs(cfg, image), outs),
        "torchvision": identify(torchvision_outputs(image, 1), outs),
    }
    counts = np.stack([np.bincount(f, minlength=len(keys)) for f in found.values()])
    # The three paths draw from one distribution...
    assert stats.chi2_contingency(counts[:, counts.sum(0) > 0]).pvalue > 1e-4, counts
    # ... and it is torchvision's: flip 1/2, each of the 14 ops 1/14, a signed op's sign 1/2.
    signed = {op for _, op, s in keys if s == -1}
    expected = np.array([0.5 / 14 / (2 if op in signed else 1) for _, op, _ in keys])
    for path, row in zip(found, counts, strict=True):
        assert stats.chisquare(row, expected * row.sum()).pvalue > 1e-4, (path, row)


def summary(outputs, image):
    """Per-output statistics that move with the ops' strength: mean |change| against the image and its
    mirror (whichever is nearer), the share of black fill pixels, and the mean intensity."""
    image = image.astype(np.float32)
    change = np.minimum(
        np.abs(outputs - image).mean(axis=(1, 2, 3)), np.abs(outputs - image[:, ::-1]).mean(axis=(1, 2, 3))
    )
    fill = (outputs == 0).all(axis=-1).mean(axis=(1, 2))
    return {"change": change, "fill": fill, "mean": outputs.mean(axis=(1, 2, 3))}


def test_two_op_recipe_changes_images_on_the_device_as_torchvision():
    stats = pytest.importorskip("scipy.stats")
    image = structured_images(1, SIZE, SIZE, seed=6)[0]
    cfg = recipe(randaug_n=2)  # the recipe's own n2 m12
    assert (cfg["randaug_n"], cfg["randaug_m"], cfg["randaug_scale"]) == (2, 12, "torchvision")
    ref = summary(torchvision_outputs(image, 2), image)
    # The device path only: the host path's draws match the device's in the one-op test above, and
    # tracing its tf.data map again would double this test's time.
    outputs = device_outputs(cfg, image)
    assert outputs.dtype == np.float32 and outputs.shape == (N, SIZE, SIZE, 3)
    np.testing.assert_array_equal(outputs, np.round(outputs))  # whole values, as PIL's uint8
    ours = summary(outputs, image)
    for name in ref:
        p = stats.ks_2samp(ours[name], ref[name]).pvalue
        assert p > 1e-4, f"{name}: KS p={p:.1e}, ours {ours[name].mean():.3f} vs torchvision {ref[name].mean():.3f}"
