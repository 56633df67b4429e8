"""Image decoding and the evaluation transform, shared by host and device.

The host training code imports :func:`preprocess` for its evaluation transform, so the pixels a
pack was validated on and the pixels the device sees come from the same function (Pillow + numpy,
no torchvision). The transform: resize the shorter side to ``spec["resize"]`` (keep aspect),
centre crop ``spec["crop"]``, scale to [0, 1], normalise with ``mean``/``std``, HWC -> CHW.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageError

__all__ = ["load_image", "preprocess", "preprocess_batch", "check_spec", "INTERPOLATIONS"]

INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


def _reason(exc: BaseException) -> str:
    """A short one-line reason for an image failure."""
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def load_image(path, *, max_pixels: int | None = None, label: str | None = None) -> Image.Image:
    """Open, fully decode, apply the EXIF orientation and convert to RGB.

    ``path`` is a file name or a binary file object (``label`` then names it in messages).
    ``max_pixels`` refuses an image by its header's width x height before a pixel is decoded (the
    decompression-bomb guard for untrusted uploads); without it Pillow's own limit applies.
    Raises :class:`ImageError` ("FILE: cannot read image (reason)") for a missing, truncated,
    corrupt, non-image or too large file; decoding happens here, so later steps never meet a bad file.
    """
    label = label or str(path)
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            if max_pixels is not None and width * height > max_pixels:
                raise _TooLarge(f"{width}x{height} pixels, more than the limit of {max_pixels}")
            opened.load()
            upright = ImageOps.exif_transpose(opened)
            return upright.convert("RGB")
    except Exception as exc:  # Pillow raises many types for corrupt data; all are bad input
        reason = _reason(exc)
        if not isinstance(path, (str, os.PathLike)):  # Pillow names a file object by its repr
            reason = reason.replace(repr(path), repr(label))
        raise ImageError(f"{label}: cannot read image ({reason})") from None


class _TooLarge(Exception):
    """An image whose header asks for more pixels than allowed (reported as an ImageError)."""


def _spec_values(spec: dict) -> tuple[int, int, np.ndarray, np.ndarray, int]:
    """Parsed spec; ValueError naming the problem for anything :func:`preprocess` cannot use."""
    try:
        resize, crop = int(spec["resize"]), int(spec["crop"])
        mean = np.asarray(spec["mean"], dtype=np.float32).reshape(1, 1, 3)
        std = np.asarray(spec["std"], dtype=np.float32).reshape(1, 1, 3)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"preprocess spec needs resize, crop and 3-value mean and std ({exc!r})"
        ) from None
    if crop < 1 or resize < crop:
        raise ValueError(f"preprocess needs 1 <= crop <= resize, got crop={crop}, resize={resize}")
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise ValueError(f"preprocess mean/std must be finite with std > 0, got {spec['mean']}, {spec['std']}")
    name = spec.get("interpolation", "bilinear")
    if name not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {name!r}")
    return resize, crop, mean, std, INTERPOLATIONS[name]


def check_spec(spec: dict) -> None:
    """Raise ValueError if ``spec`` is not a usable preprocessing spec (checked once, at load)."""
    _spec_values(spec)


def preprocess(image: Image.Image, spec: dict) -> np.ndarray:
    """One RGB image -> float32 array (3, crop, crop), normalised as ``spec`` says."""
    resize, crop, mean, std, resample = _spec_values(spec)
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    if width <= height:
        size = (resize, int(round(height * resize / width)))
    else:
        size = (int(round(width * resize / height)), resize)
    if size != image.size:
        image = image.resize(size, resample)
    width, height = image.size
    top = int(round((height - crop) / 2.0))
    left = int(round((width - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    pixels = (pixels - mean) / std
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)


def preprocess_batch(images: Iterable[Image.Image], spec: dict) -> np.ndarray:
    """Several images -> float32 array (N, 3, crop, crop)."""
    arrays = [preprocess(image, spec) for image in images]
    if not arrays:
        crop = int(spec["crop"])
        return np.zeros((0, 3, crop, crop), dtype=np.float32)
    return np.stack(arrays)
