"""Hostile and unusual images: pixel limit before decode, aspect-ratio-safe resize, 8/16-bit modes.

The hostile cases are the ones of issue 12: a 3,958-byte PNG of 1 x 2,000,000 pixels that the old
resize-then-crop turned into 64,000,000 x 32 pixels (10 GB), a 17 KB 12000^2 paletted PNG that
decoded with only a warning, and a 16-bit PNG that was clipped to white.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from device_runtime.errors import ImageError
from device_runtime.limits import MAX_IMAGE_PIXELS, MAX_SIDE
from device_runtime.preprocess import RESAMPLE_FILTERS, check_spec, load_image, preprocess, to_rgb

SPEC = {"resize": 36, "crop": 32, "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3],
        "interpolation": "bilinear"}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_paletted_png(path: Path, side: int) -> Path:
    """A valid side x side 8-bit paletted PNG of one colour, streamed (never held in memory)."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (side + 1)  # filter byte + indices
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 3, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                     + _png_chunk(b"PLTE", bytes([10, 20, 30]))
                     + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))
    return path


def test_tall_thin_png_preprocesses_within_a_small_memory_budget(tmp_path):
    # 1 x 2,000,000 pixels, grey 200 around the middle; resized naively it is 64M x 32 x 3 bytes
    path = tmp_path / "thin.png"
    image = Image.new("L", (1, 2_000_000), 0)
    image.paste(200, (0, 900_000, 1, 1_100_000))
    image.save(path, optimize=True)
    assert path.stat().st_size < 10_000
    # a separate process under a 1.5 GiB address-space limit: the old transform needs ~6 GB
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1536 * 2**20, 1536 * 2**20))
        import numpy as np
        from device_runtime.preprocess import load_image, preprocess
        spec = {SPEC!r}
        array = preprocess(load_image({str(path)!r}), spec)
        expected = (200 / 255 - np.array(spec["mean"])) / np.array(spec["std"])
        assert array.shape == (3, 32, 32), array.shape
        np.testing.assert_allclose(array, np.broadcast_to(expected[:, None, None], array.shape),
                                   atol=1e-4)
        print("ok")
    """)
    env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd()),
           "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_huge_paletted_png_is_refused_before_decoding_without_a_warning(tmp_path):
    path = write_paletted_png(tmp_path / "bomb.png", 12000)
    assert path.stat().st_size < 200_000 and 12000 * 12000 > MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning is not a refusal
        with pytest.raises(ImageError) as caught:
            load_image(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: image of 12000 x 12000 pixels is larger than")
    assert "refused before decoding" in message and "\n" not in message


def test_image_at_the_pixel_limit_still_loads(tmp_path):
    side = 1000
    path = write_paletted_png(tmp_path / "ok.png", side)
    assert side * side <= MAX_IMAGE_PIXELS
    assert load_image(path).getpixel((500, 500)) == (10, 20, 30)


def test_16_bit_png_gives_the_pixels_of_its_8_bit_twin(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 200, (40, 50), dtype=np.uint16)
    Image.fromarray(grey * 257).save(tmp_path / "deep.png")        # 16-bit greyscale PNG
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "twin.png")
    deep, twin = load_image(tmp_path / "deep.png"), load_image(tmp_path / "twin.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    np.testing.assert_array_equal(np.asarray(deep), np.asarray(twin))
    assert np.asarray(deep).max() < 255  # not clipped to white
    np.testing.assert_array_equal(preprocess(deep, SPEC), preprocess(twin, SPEC))


@pytest.mark.parametrize("mode, make, expected", [
    ("I", lambda: Image.new("I", (6, 4), 128 * 257), (128, 128, 128)),
    ("F", lambda: Image.new("F", (6, 4), 0.5), (128, 128, 128)),
    ("LA", lambda: Image.new("LA", (6, 4), (90, 0)), (90, 90, 90)),
    ("RGBA", lambda: Image.new("RGBA", (6, 4), (10, 20, 30, 0)), (10, 20, 30)),
    ("CMYK", lambda: Image.new("CMYK", (6, 4), (0, 0, 0, 0)), (255, 255, 255)),
    ("1", lambda: Image.new("1", (6, 4), 1), (255, 255, 255)),
    ("La", lambda: Image.new("LA", (6, 4), (90, 255)).convert("La"), (90, 90, 90)),
])
def test_every_mode_becomes_8_bit_rgb(mode, make, expected):
    image = make()
    assert image.mode == mode
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.getpixel((3, 2)) == expected


def test_paletted_png_with_transparency_loads_as_its_colours(tmp_path):
    image = Image.new("P", (6, 4), 1)
    image.putpalette([0, 0, 0, 40, 50, 60] + [0] * 762)
    image.save(tmp_path / "p.png", transparency=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(tmp_path / "p.png").getpixel((0, 0)) == (40, 50, 60)


def test_float_image_with_nan_is_an_image_error(tmp_path):
    path = tmp_path / "nan.tif"
    Image.fromarray(np.full((4, 4), np.nan, np.float32)).save(path)
    with pytest.raises(ImageError, match="not finite"):
        load_image(path)


@pytest.mark.parametrize("interpolation", sorted(RESAMPLE_FILTERS))
@pytest.mark.parametrize("size", [(53, 37), (37, 53), (100, 100), (36, 90)])
def test_crop_before_scaling_matches_resize_then_crop(interpolation, size):
    """The box resample equals the old transform (resize the shorter side, then centre crop)."""
    # a smooth photo-like image: on white noise bicubic's 8-bit intermediate clips either way
    y, x = np.mgrid[0:size[1], 0:size[0]] / 7.0
    rgb = np.stack([np.sin(x) * np.cos(y / 2), np.cos(x / 3 + y), np.sin(x / 2 - y / 3)], -1)
    image = Image.fromarray(np.rint(127.5 + 120 * rgb).astype(np.uint8))
    spec = dict(SPEC, interpolation=interpolation)
    width, height = image.size
    resize = spec["resize"]
    scaled = ((resize, int(round(height * resize / width))) if width <= height
              else (int(round(width * resize / height)), resize))
    old = image.resize(scaled, RESAMPLE_FILTERS[interpolation]) if scaled != image.size else image
    top, left = int(round((old.size[1] - 32) / 2.0)), int(round((old.size[0] - 32) / 2.0))
    old = np.asarray(old.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 255.0
    old = ((old - spec["mean"]) / spec["std"]).transpose(2, 0, 1)
    # Pillow's 8-bit two-pass resample rounds its intermediate: a grey level or two apart
    np.testing.assert_allclose(preprocess(image, spec), old, atol=2.01 / 255 / min(spec["std"]))


@pytest.mark.parametrize("change, words", [
    ({"resize": "32"}, "resize must be an integer"),
    ({"resize": 32.9}, "resize must be an integer"),
    ({"resize": float("inf")}, "resize must be an integer"),
    ({"resize": True}, "resize must be an integer"),
    ({"resize": 10**5}, f"resize <= {MAX_SIDE}"),
    ({"crop": 0}, "1 <= crop"),
    ({"interpolation": ["bilinear"]}, "interpolation must be one of"),
    ({"mean": [3e38, 0, 0]}, "mean must be within"),
    ({"mean": [1e300, 0, 0]}, "mean must be within"),
    ({"std": [1e-30, 1, 1]}, "std within"),
    ({"mean": "abc"}, "mean must be 3 numbers"),
])
def test_unusable_spec_is_a_value_error(change, words):
    with pytest.raises(ValueError, match=words.replace("+", r"\+")):
        check_spec({**SPEC, **change})
