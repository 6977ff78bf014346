"""Image folders and helpers shared by the tests of ``keras_convmixer.data`` (not tests)."""

import io
import struct
import zlib

import keras
import numpy as np
from PIL import Image

CLASS_COUNTS = {"ant": 5, "bee": 10, "cat": 15}  # unequal on purpose: stratification must follow them
# Odd, portrait, landscape, square, already the right size, and smaller than the crop (height, width).
AWKWARD_SIZES = [(37, 50), (61, 40), (33, 33), (224, 224), (427, 640), (640, 427), (5, 301), (299, 7), (1, 1)]


def save(array, path, **kwargs):
    Image.fromarray(array).save(path, **kwargs)
    return path


def smooth_image(rng, h, w):
    """A smooth random RGB image: resampling errors stay small, a one-pixel shift does not."""
    small = rng.integers(0, 256, (h // 4 + 2, w // 4 + 2, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


def make_folder(tmp_path):
    """Class folders of small JPEGs plus a gray PNG, an RGBA PNG, a palette PNG, a corrupt file and a non-image.

    Returns ``(root, {"gray"|"rgba"|"palette": path})``; 33 images decode.
    """
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for name, count in CLASS_COUNTS.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            save(rng.integers(0, 256, (9 + i % 3, 12, 3), dtype=np.uint8), root / name / f"{i:03d}.jpg")
    special = {
        "gray": save(rng.integers(0, 256, (16, 16), dtype=np.uint8), root / "ant" / "gray.png"),
        "rgba": save(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), root / "bee" / "rgba.png"),
    }
    palette = Image.fromarray(rng.integers(0, 4, (16, 16), dtype=np.uint8), mode="P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30] + [0] * 756)
    palette.save(root / "cat" / "palette.png")
    special["palette"] = root / "cat" / "palette.png"
    (root / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    (root / "cat" / "notes.txt").write_text("not an image, not counted")
    return root, special


def encoded(array, fmt, **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def make_damaged(tmp_path):
    """300 readable 8x8 images in two classes, and 4 JPEGs plus 1 PNG cut in half after a valid header.

    Returns ``(root, sorted damaged paths)``.
    """
    rng = np.random.default_rng(7)
    root = tmp_path / "damaged"
    bad = []
    for c, name in enumerate(("cats", "dogs")):
        (root / name).mkdir(parents=True)
        for i in range(152):
            fmt = "PNG" if i % 10 == 0 else "JPEG"
            path = root / name / f"{i:03d}.{fmt.lower()[:3].replace('jpe', 'jpg')}"
            data = encoded(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), fmt)
            if i in ((3, 77) if c == 0 else (40, 41, 150)):
                data = data[: len(data) // 2]
                bad.append(str(path))
            path.write_bytes(data)
    return root, sorted(bad)


def png_of_zeros(path, width, height):
    """A black 1-bit PNG of ``width`` x ``height`` (a multiple of 500), written without holding its pixels."""

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    compressor = zlib.compressobj(1)
    rows = bytes(1 + (width + 7) // 8) * 500  # each row: a filter byte, then the packed bits
    idat = b"".join(compressor.compress(rows) for _ in range(height // 500)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def batches(ds):
    """All ``(images, labels)`` of a dataset, concatenated, as NumPy."""
    xs, ys = zip(*[(keras.ops.convert_to_numpy(x), keras.ops.convert_to_numpy(y)) for x, y in ds], strict=True)
    return np.concatenate(xs), np.concatenate(ys)


def one_line(excinfo):
    """The message of a raised error, checked to be one non-empty line."""
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message
