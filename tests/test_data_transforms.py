"""One image without TensorFlow (keras_convmixer.data.transforms): decoding, header sizes, the eval transform."""

import numpy as np
import pytest
from PIL import Image

from keras_convmixer import data
from keras_convmixer.data import transforms
from tests.data_images import AWKWARD_SIZES, batches, make_folder, one_line, smooth_image
from tests.vision_reference import vision_or_skip


def test_gray_rgba_palette_become_rgb(tmp_path):
    _, special = make_folder(tmp_path)
    gray = np.asarray(Image.open(special["gray"]))
    rgba = np.asarray(Image.open(special["rgba"]))
    pal_im = Image.open(special["palette"])
    pal = np.array(pal_im.getpalette()[:12], dtype=np.uint8).reshape(4, 3)
    expected = {
        "gray": np.repeat(gray[..., None], 3, axis=-1),
        "rgba": rgba[..., :3],
        "palette": pal[np.asarray(pal_im)],
    }
    for key, path in special.items():
        np.testing.assert_array_equal(data.read_image(path), expected[key], err_msg=key)
    pytest.importorskip("tensorflow")
    for key, path in special.items():
        # The tf.data decoder agrees: a 16x16 image at image_size 16 passes the eval transform unchanged.
        split = data.Split("files", labels=np.array([0], np.int32), paths=(str(path),), size=1)
        images, _ = batches(data.make_dataset(split, image_size=16, batch_size=1, training=False))
        np.testing.assert_array_equal(images[0], expected[key].astype(np.float32), err_msg=key)


def test_read_image_errors_name_the_file(tmp_path):
    root, _ = make_folder(tmp_path)
    with pytest.raises(ValueError) as excinfo:
        data.read_image(root / "cat" / "corrupt.jpg")
    assert "corrupt.jpg" in one_line(excinfo)
    with pytest.raises(FileNotFoundError):
        data.read_image(root / "cat" / "missing.jpg")
    with pytest.raises(ValueError) as excinfo:
        data.read_image(root / "ant" / "gray.png", max_pixels=-3)
    assert "max_pixels" in one_line(excinfo)


@pytest.mark.parametrize("crop_pct", [0.875, 0.96, 1.0])
@pytest.mark.parametrize("image_size", [7, 24, 224])
def test_eval_geometry_matches_torchvision(image_size, crop_pct):
    torch, torchvision, _ = vision_or_skip()
    tv = torchvision.transforms
    resize = tv.Resize(int(image_size / crop_pct), antialias=True)
    crop = tv.CenterCrop(image_size)
    for h, w in AWKWARD_SIZES:
        # Where the crop lands, read back from a tensor numbered row by row.
        numbered = torch.arange(h * w, dtype=torch.float64).reshape(1, h, w)
        resized = resize(numbered)
        new_h, new_w, top, left = data.eval_geometry(h, w, image_size, crop_pct)
        assert (new_h, new_w) == tuple(resized.shape[1:]), (h, w)
        # Without resampling, torchvision's crop of an index grid of the resized size says where it starts.
        grid = torch.arange(new_h * new_w, dtype=torch.float64).reshape(1, new_h, new_w)
        corner = int(crop(grid)[0, 0, 0])
        assert (top, left) == divmod(corner, new_w), (h, w)
        assert 0 <= top <= new_h - image_size and 0 <= left <= new_w - image_size


@pytest.mark.parametrize(
    "image_size,crop_pct,interpolation",
    [(24, 0.875, "bicubic"), (32, 0.96, "bilinear"), (48, 1.0, "bicubic"), (20, 1.0, "nearest")],
)
def test_pil_eval_transform_matches_torchvision(image_size, crop_pct, interpolation):
    _, torchvision, _ = vision_or_skip()
    tv = torchvision.transforms
    mode = getattr(tv.InterpolationMode, interpolation.upper())
    reference = tv.Compose([tv.Resize(int(image_size / crop_pct), interpolation=mode), tv.CenterCrop(image_size)])
    for h, w in [(37, 50), (61, 40), (33, 33), (image_size, image_size)]:
        image = smooth_image(np.random.default_rng(h * w), h, w)
        want = np.asarray(reference(Image.fromarray(image)), dtype=np.float32)
        got = data.transforms.eval_transform(image, image_size, crop_pct, interpolation)
        assert got.dtype == np.float32 and got.shape == (image_size, image_size, 3)
        np.testing.assert_array_equal(got, want, err_msg=f"{h}x{w}")


def test_eval_transform_arguments_are_checked():
    image = np.zeros((4, 4, 3), np.uint8)
    cases = [
        (dict(image_size=4, interpolation="lanczos7"), "interpolation"),
        (dict(image_size=4, crop_pct=1.5), "crop_pct"),
        (dict(image_size=4, crop_pct=0), "crop_pct"),
        (dict(image_size=0), "image_size"),
        (dict(image_size=2.5), "image_size"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ValueError) as excinfo:
            transforms.eval_transform(image, **kwargs)
        assert name in one_line(excinfo), kwargs
    for bad in (np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.float32)):
        with pytest.raises(ValueError) as excinfo:
            transforms.eval_transform(bad, 4)
        assert "image" in one_line(excinfo)
    for args, name in (((0, 5, 4, 1.0), "height"), ((5, -1, 4, 1.0), "width"), ((5, 5, 4, "x"), "crop_pct")):
        with pytest.raises(ValueError) as excinfo:
            data.eval_geometry(*args)
        assert name in one_line(excinfo)


@pytest.mark.parametrize(
    "fmt,kwargs,mode",
    [
        ("JPEG", {}, "RGB"),
        ("PNG", {}, "RGB"),
        ("GIF", {}, "P"),
        ("BMP", {}, "RGB"),
        ("WEBP", {"lossless": False}, "RGB"),  # VP8
        ("WEBP", {"lossless": True}, "RGB"),  # VP8L
        ("WEBP", {"lossless": False}, "RGBA"),  # VP8X (extended, for the alpha)
    ],
)
def test_sizes_read_from_headers_match_pil_and_the_decoder(tmp_path, fmt, kwargs, mode):
    rng = np.random.default_rng(3)
    height, width = 13, 29
    array = rng.integers(0, 256, (height, width, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    im = Image.fromarray(array)
    if mode == "P":
        im = im.convert("P")
    path = tmp_path / f"image.{fmt.lower()}"
    im.save(path, format=fmt, **kwargs)
    with Image.open(path) as ref:  # the independent reference
        assert ref.size == (width, height)
    assert transforms.image_header(str(path)) == (fmt, (height, width))  # the scan's reader
    tf = pytest.importorskip("tensorflow")
    from keras_convmixer.data import tf_pipeline

    contents = tf.io.read_file(str(path))
    got = [int(v) for v in tf_pipeline._encoded_size(contents)]  # the pipeline's reader
    assert got == [height, width]
    assert tuple(tf.io.decode_image(contents, expand_animations=False).shape[:2]) == (height, width)
