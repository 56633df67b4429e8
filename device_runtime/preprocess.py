"""Image decoding and the evaluation transform, shared by host and device.

The host training code imports :func:`preprocess` for its evaluation transform, so the pixels a
pack was validated on and the pixels the device sees come from the same function (Pillow + numpy,
no torchvision). The transform: resize the shorter side to ``spec["resize"]`` (keep aspect),
centre crop ``spec["crop"]``, scale to [0, 1], normalise with ``mean``/``std``, HWC -> CHW.

Images come from outside, so :func:`load_image` reads the size from the header and refuses more
than ``limits.MAX_IMAGE_PIXELS`` before decoding, and :func:`preprocess` computes the crop region
in source coordinates first and resamples only that region (a 1 x 2,000,000 image costs a 32 x 32
resample, not a 64,000,000 x 32 one). Every Pillow mode becomes 8-bit RGB by one rule
(:func:`to_rgb`), so a 16-bit PNG gives the pixels of its 8-bit twin instead of clipping to white.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from collections.abc import Iterable, Mapping

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageError
from .limits import DEFAULT_INTERPOLATION, INTERPOLATIONS, MAX_IMAGE_PIXELS, MAX_SIDE, MEAN_RANGE, STD_RANGE
from .text import printable

__all__ = ["load_image", "to_rgb", "preprocess", "preprocess_batch", "check_spec", "RESAMPLE_FILTERS",
           "source_box", "neutral_batch"]

# the one map from a spec's ``interpolation`` name (limits.INTERPOLATIONS) to Pillow's resample filter
RESAMPLE_FILTERS = {name: Image.Resampling[name.upper()] for name in INTERPOLATIONS}


def _reason(exc: BaseException) -> str:
    """A short one-line reason for an image failure."""
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _refuse_size(label, width: int, height: int, limit: int = MAX_IMAGE_PIXELS) -> None:
    if width * height > limit:
        raise ImageError(
            f"{label}: image of {width} x {height} pixels is larger than the "
            f"{limit:,} pixels the runtime decodes (refused before decoding)"
        )


def load_image(path, *, max_pixels: int | None = None, label: str | None = None) -> Image.Image:
    """Open, check the size, fully decode, apply the EXIF orientation and convert to RGB.

    ``path`` is a file name or a binary file object (``label`` then names it in messages);
    ``max_pixels`` lowers the pixel limit (``MAX_IMAGE_PIXELS``) for this image, e.g. a server's.
    Raises :class:`ImageError` ("FILE: cannot read image (reason)") for a missing, truncated,
    corrupt or non-image file, and ("FILE: image of W x H pixels is larger than ...") for an image
    with more than the limit of pixels, decided from the header alone. Decoding happens
    here, so later steps never meet a bad file.
    """
    label = label or str(path)
    limit = MAX_IMAGE_PIXELS if max_pixels is None else min(int(max_pixels), MAX_IMAGE_PIXELS)
    try:
        with warnings.catch_warnings():
            # our own limit is lower and refuses; Pillow's warning would only be noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
        with opened:
            _refuse_size(label, *opened.size, limit)
            opened.load()
            upright = ImageOps.exif_transpose(opened)
            return to_rgb(upright)
    except ImageError:
        raise
    except Image.DecompressionBombError:  # above Pillow's hard limit: refused by Pillow's header check
        raise ImageError(
            f"{label}: image is larger than the {limit:,} pixels the runtime decodes "
            "(refused before decoding)"
        ) from None
    except Exception as exc:  # Pillow raises many types for corrupt data; all are bad input
        reason = _reason(exc)
        if not isinstance(path, (str, os.PathLike)):  # Pillow names a file object by its repr
            reason = reason.replace(repr(path), repr(label))
        raise ImageError(f"{label}: cannot read image ({reason})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB.

    * 16- and 32-bit integer greyscale (``I;16*``, ``I``): 0..65535 maps to 0..255 (value / 257,
      rounded; ``I`` is clipped to 0..65535), so a 16-bit PNG equals its 8-bit twin;
    * float greyscale (``F``): 0.0..1.0 maps to 0..255 (clipped); NaN or infinity is refused;
    * alpha (``RGBA``, ``LA``, ``PA``, ``P`` with transparency, premultiplied ``La``/``RGBa``) is
      dropped, keeping the stored colour as ``Image.convert("RGB")`` and torchvision do;
    * everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``) by Pillow.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "F" or mode == "I" or mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float32)
        if mode == "F":
            if not np.isfinite(values).all():
                raise ValueError("float image has pixels that are not finite")
            values = np.clip(values, 0.0, 1.0) * np.float32(255.0)
        else:
            values = np.clip(values, 0.0, 65535.0) * np.float32(1.0 / 257.0)
        grey = Image.fromarray(np.rint(values).astype(np.uint8), "L")
        return grey.convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow asks for this route; alpha is then dropped
    elif mode == "La":
        image = image.convert("LA")
    return image.convert("RGB")


def _int_field(spec: Mapping, name: str) -> int:
    value = spec.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"preprocess {name} must be an integer, got {printable(repr(value), 60)}")
    return value


def _vector(spec: Mapping, name: str) -> np.ndarray:
    value = spec.get(name)
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"preprocess {name} must be 3 numbers, got {printable(repr(value), 60)}")
    with np.errstate(over="ignore"):  # 1e300 becomes inf here and is refused below
        return np.asarray(value, dtype=np.float32).reshape(1, 1, 3)


def _spec_values(spec: Mapping) -> tuple[int, int, np.ndarray, np.ndarray, int]:
    """Parsed spec; ValueError naming the problem for anything :func:`preprocess` cannot use."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"preprocess spec must be a map, got {type(spec).__name__}")
    resize, crop = _int_field(spec, "resize"), _int_field(spec, "crop")
    if not 1 <= crop <= resize <= MAX_SIDE:
        raise ValueError(
            f"preprocess needs 1 <= crop <= resize <= {MAX_SIDE}, got crop={crop}, resize={resize}"
        )
    mean, std = _vector(spec, "mean"), _vector(spec, "std")
    if not (np.isfinite(mean).all() and np.isfinite(std).all()
            and ((mean >= MEAN_RANGE[0]) & (mean <= MEAN_RANGE[1])).all()
            and ((std >= STD_RANGE[0]) & (std <= STD_RANGE[1])).all()):
        raise ValueError(
            f"preprocess mean must be within {MEAN_RANGE[0]:g}..{MEAN_RANGE[1]:g} and std within "
            f"{STD_RANGE[0]:g}..{STD_RANGE[1]:g}, got {printable(spec['mean'], 80)}, "
            f"{printable(spec['std'], 80)}"
        )
    name = spec.get("interpolation", DEFAULT_INTERPOLATION)
    if not isinstance(name, str) or name not in RESAMPLE_FILTERS:
        raise ValueError(
            f"interpolation must be one of {list(INTERPOLATIONS)}, got {printable(repr(name), 60)}"
        )
    return resize, crop, mean, std, RESAMPLE_FILTERS[name]


def check_spec(spec: Mapping) -> None:
    """Raise ValueError if ``spec`` is not a usable preprocessing spec (checked once, at load)."""
    _spec_values(spec)


def _resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """Size after scaling the shorter side to ``resize`` (never materialised for big images)."""
    if width <= height:
        return resize, int(round(height * resize / width))
    return int(round(width * resize / height)), resize


def source_box(width: int, height: int, resize: int, crop: int) -> tuple[float, ...]:
    """The (left, top, right, bottom) region of a ``width`` x ``height`` source that becomes the
    centre crop after resizing the shorter side: the crop computed before scaling."""
    new_w, new_h = _resized_size(width, height, resize)
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)


def preprocess(image: Image.Image, spec: Mapping) -> np.ndarray:
    """One image -> float32 array (3, crop, crop), normalised as ``spec`` says.

    Only the source region that becomes the crop is resampled (``Image.resize(box=...)``), with
    the same filter positions as resizing the whole image and then cropping.
    """
    resize, crop, mean, std, resample = _spec_values(spec)
    image = to_rgb(image)
    width, height = image.size
    _refuse_size("image", width, height)
    if _resized_size(width, height, resize) == (width, height):  # no scaling: an exact crop
        left, top = (int(v) for v in source_box(width, height, resize, crop)[:2])
        image = image.crop((left, top, left + crop, top + crop))
    else:
        image = image.resize((crop, crop), resample, box=source_box(width, height, resize, crop))
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    pixels = (pixels - mean) / std
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)


def preprocess_batch(images: Iterable[Image.Image], spec: Mapping) -> np.ndarray:
    """Several images -> float32 array (N, 3, crop, crop)."""
    arrays = [preprocess(image, spec) for image in images]
    if not arrays:
        crop = _spec_values(spec)[1]
        return np.zeros((0, 3, crop, crop), dtype=np.float32)
    return np.stack(arrays)


def neutral_batch(spec: Mapping) -> np.ndarray:
    """One mid-grey image, preprocessed as ``spec`` says: the probe a new pack must score finitely.

    Read-only and cached per spec: every pack load runs the probe, and its resize is not free.
    """
    try:
        key = json.dumps(dict(spec), sort_keys=True)
    except (TypeError, ValueError):  # not a plain spec: let _spec_values say what is wrong
        return _neutral_batch(spec)
    return _cached_neutral_batch(key)


@functools.lru_cache(maxsize=8)
def _cached_neutral_batch(key: str) -> np.ndarray:
    return _neutral_batch(json.loads(key))


def _neutral_batch(spec: Mapping) -> np.ndarray:
    crop = _spec_values(spec)[1]
    batch = preprocess(Image.new("RGB", (crop, crop), (128, 128, 128)), spec)[None]
    batch.flags.writeable = False
    return batch
