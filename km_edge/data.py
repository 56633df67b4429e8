"""Task data: ImageFolder splits read with the device's own listing and preprocessing.

Evaluation uses ``device_runtime.preprocess`` itself, so the host's val accuracy and the device's
accuracy are measured on identical inputs. Training adds light augmentation (random resized crop,
colour jitter) before that same resize / crop / normalise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from device_runtime.errors import DataError, ImageError
from device_runtime.imagefolder import list_image_folder
from device_runtime.preprocess import load_image, preprocess

VAL_FRACTION = 0.2
EVAL_CACHE_LIMIT = 256 * 2**20  # keep preprocessed val images in memory below this size


@dataclass
class TaskSplits:
    classes: list[str]
    train: list[tuple[Path, int]]
    val: list[tuple[Path, int]]
    val_source: str  # "val" folder or "split of train"


def stratified_split(samples: list[tuple[Path, int]], fraction: float, seed: int):
    """Deterministic per-class split: the same files go to val for the same seed."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in sorted({y for _, y in samples}):
        items = [s for s in samples if s[1] == label]
        order = rng.permutation(len(items))
        n_val = max(1, int(round(len(items) * fraction))) if len(items) > 1 else 0
        val += [items[i] for i in sorted(order[:n_val])]
        train += [items[i] for i in sorted(order[n_val:])]
    return train, val


def load_task_splits(data_dir: str | Path, seed: int = 0) -> TaskSplits:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder does not exist")
    classes, train = list_image_folder(data_dir / "train")
    if len(classes) < 2:
        raise DataError(f"{data_dir / 'train'}: needs at least two class folders, found {len(classes)}")
    if (data_dir / "val").is_dir():
        val_classes, val = list_image_folder(data_dir / "val")
        if val_classes != classes:
            raise DataError(f"{data_dir}: val classes {val_classes} differ from train classes {classes}")
        return TaskSplits(classes, train, val, "val")
    train, val = stratified_split(train, VAL_FRACTION, seed)
    return TaskSplits(classes, train, val, "split of train")


def load_test_split(data_dir: str | Path, classes: list[str]) -> list[tuple[Path, int]]:
    """The optional ``test`` folder: never used for a choice, evaluated once after training."""
    test_dir = Path(data_dir) / "test"
    if not test_dir.is_dir():
        return []
    test_classes, test = list_image_folder(test_dir)
    if test_classes != classes:
        raise DataError(f"{test_dir}: test classes {test_classes} differ from train classes {classes}")
    check_images(test)
    return test


def check_images(samples: list[tuple[Path, int]]) -> None:
    """Open every image once up front, so a broken file stops training before it starts."""
    for path, _ in samples:
        load_image(path)


class ImageDataset(Dataset):
    def __init__(self, samples, spec: dict, augment: bool = False):
        self.samples = list(samples)
        self.spec = spec
        self.augment = (
            transforms.Compose(
                [
                    transforms.RandomResizedCrop(spec["resize"], scale=(0.7, 1.0), ratio=(0.85, 1.18)),
                    transforms.ColorJitter(0.2, 0.2, 0.2),
                ]
            )
            if augment
            else None
        )
        self.cache: dict[int, torch.Tensor] | None = None
        per_image = 3 * spec["crop"] ** 2 * 4
        if not augment and per_image * len(self.samples) <= EVAL_CACHE_LIMIT:
            self.cache = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        if self.cache is not None and index in self.cache:
            return self.cache[index], self.samples[index][1]
        path, label = self.samples[index]
        try:
            image = load_image(path)
        except ImageError as exc:
            raise DataError(str(exc))
        if self.augment is not None:
            image = self.augment(image)
        tensor = torch.from_numpy(preprocess(image, self.spec))
        if self.cache is not None:
            self.cache[index] = tensor
        return tensor, label


def make_loader(samples, spec: dict, batch_size: int, train: bool, seed: int = 0, workers: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        ImageDataset(samples, spec, augment=train),
        batch_size=batch_size,
        shuffle=train,
        drop_last=False,
        num_workers=workers,
        generator=generator,
    )
