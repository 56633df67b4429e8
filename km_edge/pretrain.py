"""``km-edge pretrain``: train a base from scratch on a source ImageFolder (the offline way to a base).

The whole network trains (method ``full``) with the shared training loop; the backbone is then
saved as a km-edge base file that ``--weights FILE`` builds again.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .data import check_images, load_task_splits, make_loader
from .methods import MethodConfig, build_task_model
from .models import build_base, save_base_weights
from .torch_setup import pick_device, seed_everything
from .train import fit

log = logging.getLogger(__name__)


def pretrain_base(
    data_dir: str | Path,
    arch: str,
    out_path: str | Path,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    device: str = "auto",
    input_size: int | None = None,
    width: float = 1.0,
    max_steps: int | None = None,
    progress: bool = True,
) -> dict:
    """Train a base from scratch on a source ImageFolder and save its backbone."""
    seed_everything(seed)
    splits = load_task_splits(data_dir, seed)
    check_images(splits.train + splits.val)
    base = build_base(arch, None, input_size=input_size, width=width)
    config = MethodConfig(method="full")
    model = build_task_model(base, len(splits.classes), config, seed)
    torch_device = pick_device(device)
    spec = base.preprocess
    train_loader = make_loader(splits.train, spec, batch_size, True, seed)
    val_loader = make_loader(splits.val, spec, 256, False)
    log.info("pretraining %s: %d train / %d val images, %d classes, %d epochs on %s", arch, len(splits.train),
             len(splits.val), len(splits.classes), epochs, torch_device)
    result = fit(model, config, train_loader, val_loader, epochs=epochs, lr=lr, head_lr=lr,
                 weight_decay=5e-4, device=torch_device, max_steps=max_steps, progress=progress,
                 desc=f"pretrain {arch}")
    model.cpu()
    save_base_weights(out_path, base, {"source": {"data": str(data_dir), "classes": splits.classes,
                                                  "val_accuracy": result.best_val_accuracy}})
    return {
        "arch": arch,
        "weights": str(out_path),
        "source_val_accuracy": result.best_val_accuracy,
        "base_params": base.num_params(),
        "epochs": epochs,
        "seconds_per_epoch": round(result.seconds_per_epoch, 3),
        "input_size": base.input_size,
    }
