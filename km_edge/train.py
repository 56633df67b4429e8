"""One training loop for every method: AdamW, cosine schedule, best-by-val task tensors.

``train_task`` is what ``km-edge train`` runs (it writes a checkpoint, ``km_edge.checkpoint``);
``km-edge pretrain`` (``km_edge.pretrain``) and the transfer benchmarks call ``fit`` directly.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from .checkpoint import new_checkpoint, save_checkpoint
from .data import check_images, load_task_splits, load_test_split, make_loader
from .methods import (
    DEFAULT_LR,
    MethodConfig,
    build_task_model,
    head_learning_rate,
    load_task_state,
    method_config,
    optimizer_groups,
    parameter_report,
    set_train_mode,
    task_state,
)
from .models import TaskModel, build_base
from .torch_setup import pick_device, seed_everything
from .weights import NO_WEIGHTS, is_weights_file

log = logging.getLogger(__name__)


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
        log.debug("%s: epoch %d/%d train loss %.4f accuracy %.4f, val loss %.4f accuracy %.4f", desc, epoch + 1,
                  epochs, *(best.history[-1][k] for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy")))
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
    if weights not in NO_WEIGHTS and is_weights_file(weights):  # the checkpoint finds its base from any folder
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
    log.info("training %s [%s] on %s: %d train / %d val images, %d classes, %s epochs on %s; untrained val "
             "accuracy %.4f", task, config.method, base_spec["arch"], len(splits.train), len(splits.val),
             len(splits.classes), options["epochs"], device, untrained_accuracy)
    result = fit(
        model, config, train_loader, val_loader,
        epochs=int(options["epochs"]), lr=lr, head_lr=head_lr,
        weight_decay=float(options["weight_decay"]), device=device,
        max_steps=options.get("max_steps"), progress=progress, desc=f"{task} [{config.method}]",
    )
    # a test folder is touched once, after every choice (epoch, rates) was made on the val split
    test = load_test_split(data_dir, splits.classes)
    test_accuracy = evaluate(model, make_loader(test, spec, 256, False), device)[0] if test else None
    checkpoint = new_checkpoint(
        task=task, config=config, labels=splits.classes, options=options, base_spec=base_spec, base=base,
        fingerprint=fingerprint, tensors=result.best_state, val_accuracy=result.best_val_accuracy,
        val_source=splits.val_source, test_accuracy=test_accuracy, best_epoch=result.best_epoch,
        history=result.history, params=report,
    )
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

