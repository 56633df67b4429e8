"""Where torch computes and from which seed: the two choices every host command makes first."""

from __future__ import annotations

import random

import numpy as np
import torch

from device_runtime.errors import ConfigError


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA, else Apple MPS, else CPU; an explicit ``cuda`` without CUDA is refused."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (data order, augmentation, adapter init)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
