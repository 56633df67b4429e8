"""One training loop for every method: AdamW, cosine schedule, best-by-val task tensors.

``train_task`` is what ``km-edge train`` runs; ``pretrain_base`` trains a base from scratch on a
source ImageFolder (the offline way to get a base); the transfer benchmark calls ``fit`` directly.
"""

from __future__ import annotations

import io
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from device_runtime.errors import CheckpointError
from device_runtime.files import write_atomic
from device_runtime.km import ModulatorSpec

from .data import check_images, load_task_splits, load_test_split, make_loader
from .methods import (
    DEFAULT_LR,
    MethodConfig,
    head_learning_rate,
    load_task_state,
    optimizer_groups,
    parameter_report,
    prepare_model,
    set_train_mode,
    task_state,
)
from .models import BaseModel, TaskModel, build_base, save_base_weights

CHECKPOINT_FORMAT = "km-edge-checkpoint"


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from device_runtime.errors import ConfigError

        raise ConfigError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device) -> tuple[float, float]:
    """(accuracy, mean loss) in eval mode. The modulated kernels are computed once for the whole
    pass (``parametrize.cached``), not once per batch: they do not change while evaluating."""
    model.eval()
    correct, total, loss = 0, 0, 0.0
    with torch.no_grad(), parametrize.cached():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            total += labels.numel()
    return correct / max(total, 1), loss / max(total, 1)


@dataclass
class FitResult:
    best_val_accuracy: float
    best_epoch: int
    best_state: dict
    history: list = field(default_factory=list)
    seconds_per_epoch: float = 0.0
    seconds_per_step: float = 0.0
    steps: int = 0


def fit(
    model: TaskModel,
    config: MethodConfig,
    train_loader,
    val_loader,
    *,
    epochs: int,
    lr: float,
    head_lr: float,
    weight_decay: float = 1e-4,
    bn_lr: float | None = None,
    body_delay_steps: int = 0,
    device: torch.device = torch.device("cpu"),
    max_steps: int | None = None,
    progress: bool = True,
    desc: str = "train",
) -> FitResult:
    """Train the task tensors; keep the ones with the best val accuracy (first best wins)."""
    model.to(device)
    optimizer = torch.optim.AdamW(optimizer_groups(model, lr, head_lr, bn_lr), weight_decay=weight_decay)
    total_steps = max_steps or epochs * len(train_loader)
    epochs = math.ceil(total_steps / max(len(train_loader), 1))
    scheduler = _schedule(optimizer, total_steps, body_delay_steps)
    best = FitResult(best_val_accuracy=-1.0, best_epoch=-1, best_state={})
    step, train_seconds = 0, 0.0
    bar = tqdm(total=total_steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for epoch in range(epochs):
        set_train_mode(model, config, True)
        started = time.perf_counter()
        seen, correct, running = 0, 0, 0.0
        for images, labels in train_loader:
            if step >= total_steps:
                break
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss = nn.functional.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            seen += labels.numel()
            correct += (logits.argmax(1) == labels).sum().item()
            running += loss.item() * labels.numel()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{running / seen:.3f}", acc=f"{correct / seen:.3f}")
        train_seconds += time.perf_counter() - started
        val_accuracy, val_loss = evaluate(model, val_loader, device)
        best.history.append(
            {"epoch": epoch + 1, "train_loss": running / max(seen, 1), "train_accuracy": correct / max(seen, 1),
             "val_loss": val_loss, "val_accuracy": val_accuracy}
        )
        if val_accuracy > best.best_val_accuracy:
            best.best_val_accuracy, best.best_epoch = val_accuracy, epoch + 1
            best.best_state = task_state(model, config)
    bar.close()
    load_task_state(model, config, best.best_state)
    best.steps = step
    best.seconds_per_epoch = train_seconds / max(epochs, 1)
    best.seconds_per_step = train_seconds / max(step, 1)
    return best


def _schedule(optimizer, total_steps: int, body_delay_steps: int):
    """Cosine decay; with ``body_delay_steps`` the body waits while the head trains alone (linear probe,
    then fine-tune: a fresh head's gradients do not reach the pretrained layers), then decays over the rest."""
    if body_delay_steps <= 0:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    delay = int(body_delay_steps)

    def cosine(step: int, start: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(max(step - start, 0), total_steps - start) / max(total_steps - start, 1)))

    head = lambda step: cosine(step, 0)  # noqa: E731
    body = lambda step: 0.0 if step < delay else cosine(step, delay)  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [head] + [body] * (len(optimizer.param_groups) - 1))


# --- tasks -----------------------------------------------------------------------------------
def build_task_model(base: BaseModel, num_classes: int, config: MethodConfig, seed: int) -> TaskModel:
    torch.manual_seed(seed)  # adapters and head initialise from the seed
    model = TaskModel(base.backbone, base.feature_size, num_classes)
    prepare_model(model, config)
    return model


def method_config(options: dict) -> MethodConfig:
    return MethodConfig(
        method=options["method"],
        modulator=ModulatorSpec(
            kind=options["modulator"],
            kernel_hidden=int(options["kernel_hidden"]),
            channel_hidden=int(options["channel_hidden"]),
            activation=options["activation"],
        ),
        train_bn=(options["method"] == "km") if options["train_bn"] is None else bool(options["train_bn"]),
        lora_rank=int(options["lora_rank"]),
    )


def train_task(
    task: str,
    data_dir: str | Path,
    base_spec: dict,
    options: dict,
    checkpoint_path: str | Path,
    progress: bool = True,
) -> dict:
    """Train one task and write its checkpoint; returns the report ``km-edge train --json`` prints."""
    seed = int(options["seed"])
    seed_everything(seed)
    weights = base_spec.get("weights")
    if weights and Path(weights).exists():  # the checkpoint must find its base from any folder
        base_spec = dict(base_spec, weights=str(Path(weights).resolve()))
    splits = load_task_splits(data_dir, seed)
    check_images(splits.train + splits.val)
    base = build_base(**base_spec)
    base_params, fingerprint = base.num_params(), base.fingerprint()  # before adapters are attached
    config = method_config(options)
    init = None
    if options.get("init"):  # a meta-init (km-edge meta-train): checked before any training
        from .meta import apply_meta_init, load_meta_init

        init = load_meta_init(options["init"], fingerprint, config)
    model = build_task_model(base, len(splits.classes), config, seed)
    if init is not None:
        apply_meta_init(model, init, options["init"])
    report = parameter_report(model, base_params)
    device = pick_device(options["device"])
    spec = base.preprocess
    train_loader = make_loader(splits.train, spec, int(options["batch_size"]), True, seed, int(options["workers"]))
    val_loader = make_loader(splits.val, spec, 256, False)
    untrained_accuracy, _ = evaluate(model.to(device), val_loader, device)
    lr = float(options["lr"] or DEFAULT_LR[config.method])
    head_lr = float(options["head_lr"] or head_learning_rate(config.method, lr))
    result = fit(
        model, config, train_loader, val_loader,
        epochs=int(options["epochs"]), lr=lr, head_lr=head_lr,
        weight_decay=float(options["weight_decay"]), device=device,
        max_steps=options.get("max_steps"), progress=progress, desc=f"{task} [{config.method}]",
    )
    # a test folder is touched once, after every choice (epoch, rates) was made on the val split
    test = load_test_split(data_dir, splits.classes)
    test_accuracy = evaluate(model, make_loader(test, spec, 256, False), device)[0] if test else None
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "task": task,
        "method": config.method,
        "labels": splits.classes,
        "method_config": config.to_dict(),
        "options": {k: v for k, v in options.items() if v is not None},
        "base": {**{k: v for k, v in base_spec.items() if v is not None}, "fingerprint": fingerprint,
                 "input_size": base.input_size, "resize": base.resize},
        "preprocess": spec,
        "tensors": {k: v.cpu() for k, v in result.best_state.items()},
        "val_accuracy": result.best_val_accuracy,
        "val_source": splits.val_source,
        "test_accuracy": test_accuracy,
        "best_epoch": result.best_epoch,
        "history": result.history,
        "params": report,
    }
    save_checkpoint(checkpoint_path, checkpoint)
    return {
        "task": task,
        "method": config.method,
        "val_accuracy": result.best_val_accuracy,
        "untrained_val_accuracy": untrained_accuracy,
        "best_epoch": result.best_epoch,
        **report,
        "epochs": len(result.history),  # passes made: --max-steps may stop early or go past --epochs
        "steps": result.steps,
        "seconds_per_epoch": round(result.seconds_per_epoch, 3),
        "n_train": len(splits.train),
        "n_val": len(splits.val),
        "val_source": splits.val_source,
        # val_accuracy is measured on the split that also picked the epoch: optimistic by design
        "val_picked_epoch": True,
        "test_accuracy": test_accuracy,
        "n_test": len(test),
        "labels": splits.classes,
        "device": str(device),
        "init": options.get("init"),
        "checkpoint": str(checkpoint_path),
    }


def save_checkpoint(path: str | Path, checkpoint: dict) -> Path:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return write_atomic(path, buffer.getvalue())


def load_torch_document(path: str | Path, document_format: str, what: str, missing: str) -> dict:
    """A km-edge file written with torch.save (a checkpoint, a meta-init): loaded weights_only and
    refused with one line unless it is a dict of ``document_format``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: {missing}")
    try:
        document = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a km-edge {what} ({type(exc).__name__})")
    if not isinstance(document, dict) or document.get("format") != document_format:
        raise CheckpointError(f"{path}: not a km-edge {what}")
    return document


def load_checkpoint(path: str | Path) -> dict:
    return load_torch_document(path, CHECKPOINT_FORMAT, "checkpoint", "no checkpoint (train the task first)")


def restore_task_model(checkpoint: dict, base: BaseModel | None = None) -> tuple[TaskModel, BaseModel, MethodConfig]:
    """Rebuild the trained task model from a checkpoint (base rebuilt from its recorded spec)."""
    spec = {k: checkpoint["base"].get(k) for k in ("arch", "weights", "input_size", "resize", "width")}
    base = base or build_base(**{k: v for k, v in spec.items() if v is not None})
    if base.fingerprint() != checkpoint["base"]["fingerprint"]:
        raise CheckpointError("checkpoint was trained on a different base (weights differ)")
    config = MethodConfig(**checkpoint["method_config"])
    model = build_task_model(base, len(checkpoint["labels"]), config, 0)
    try:
        load_task_state(model, config, checkpoint["tensors"])
    except KeyError as exc:
        raise CheckpointError(str(exc))
    model.eval()
    return model, base, config


# --- bases -----------------------------------------------------------------------------------
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
