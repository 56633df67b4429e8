"""ImageFolder listing (``root/<class>/<image>``) without torchvision, shared by host and device.

One listing for both sides means the class order (sorted folder names, as torchvision's
ImageFolder) and the sample order are the same where a pack is trained and where it is evaluated.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "is_image_file", "list_image_folder"]

# torchvision's IMG_EXTENSIONS, matched case-insensitively
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image_file(path: str | os.PathLike) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    """(classes, samples): classes are the sorted subfolder names, samples ``(path, class index)``
    sorted by class, then by path inside the class folder (subfolders are searched too).

    Raises :class:`DataError` for a missing folder, a folder without class subfolders, or a class
    folder without images. Hidden entries (starting with ".") are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    classes = sorted(
        entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")
    )
    if not classes:
        raise DataError(f"{root}: no class folders (expected {root}/<class>/<image>)")
    samples: list[tuple[Path, int]] = []
    for index, name in enumerate(classes):
        class_dir = root / name
        found = []
        for folder, subfolders, files in os.walk(class_dir, followlinks=True):
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]
            found.extend(Path(folder) / f for f in files if is_image_file(f))
        if not found:
            raise DataError(
                f"{class_dir}: class folder has no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        samples.extend((path, index) for path in sorted(found))
    return classes, samples
