"""The task checkpoint: the file ``km-edge train`` writes and ``km-edge pack`` reads.

One torch document (``torch.save`` of a dict, loaded back ``weights_only``) holding the task's
trained tensors and what rebuilding the task model needs: the base's spec and fingerprint, the
method config and the labels. Its schema is :func:`new_checkpoint`; :func:`restore_task_model`
turns it back into a model. The meta-init file (``km_edge.meta``) is read by the same loader.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from device_runtime.errors import CheckpointError
from device_runtime.text import exception_reason
from device_runtime.files import write_atomic

from .methods import MethodConfig, build_task_model, load_task_state
from .models import BaseModel, TaskModel, build_base

CHECKPOINT_FORMAT = "km-edge-checkpoint"
CHECKPOINT_VERSION = 1
# The build_base arguments a checkpoint records so that its base can be rebuilt from any folder.
BASE_SPEC_KEYS = ("arch", "weights", "input_size", "resize", "width")


def new_checkpoint(
    *,
    task: str,
    config: MethodConfig,
    labels: list[str],
    options: dict,
    base_spec: dict,
    base: BaseModel,
    fingerprint: str,
    tensors: dict[str, torch.Tensor],
    val_accuracy: float,
    val_source: str,
    test_accuracy: float | None,
    best_epoch: int,
    history: list,
    params: dict,
) -> dict:
    """A checkpoint document (``fingerprint``: the base's, taken before adapters were attached)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "task": task,
        "method": config.method,
        "labels": list(labels),
        "method_config": config.to_dict(),
        "options": {k: v for k, v in options.items() if v is not None},
        "base": {**{k: v for k, v in base_spec.items() if v is not None}, "fingerprint": fingerprint,
                 "input_size": base.input_size, "resize": base.resize},
        "preprocess": base.preprocess,
        "tensors": {k: v.cpu() for k, v in tensors.items()},
        "val_accuracy": val_accuracy,
        "val_source": val_source,
        "test_accuracy": test_accuracy,
        "best_epoch": best_epoch,
        "history": history,
        "params": params,
    }


def save_torch_document(path: str | Path, document: dict) -> Path:
    """A km-edge torch document (checkpoint, meta-init, base file) written atomically."""
    buffer = io.BytesIO()
    torch.save(document, buffer)
    return write_atomic(path, buffer.getvalue())


def save_checkpoint(path: str | Path, checkpoint: dict) -> Path:
    return save_torch_document(path, checkpoint)


def load_torch_document(path: str | Path, document_format: str, what: str, missing: str) -> dict:
    """A km-edge file written with torch.save (a checkpoint, a meta-init): loaded weights_only and
    refused with one line unless it is a dict of ``document_format``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: {missing}")
    try:
        document = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a km-edge {what} ({exception_reason(exc)})")
    if not isinstance(document, dict) or document.get("format") != document_format:
        raise CheckpointError(f"{path}: not a km-edge {what}")
    return document


def load_checkpoint(path: str | Path) -> dict:
    checkpoint = load_torch_document(path, CHECKPOINT_FORMAT, "checkpoint", "no checkpoint (train the task first)")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {checkpoint.get('version')!r} is not "
                              f"{CHECKPOINT_VERSION} (train the task again with this km-edge)")
    return checkpoint


def restore_task_model(checkpoint: dict, base: BaseModel | None = None,
                       where: str | Path = "checkpoint") -> tuple[TaskModel, BaseModel, MethodConfig]:
    """Rebuild the trained task model from a checkpoint (base rebuilt from its recorded spec);
    ``where`` (the checkpoint's path) starts every refusal."""
    retrain = f"retrain the task (`km-edge pack --task {checkpoint.get('task', 'TASK')} --retrain`)"
    spec = {k: checkpoint["base"].get(k) for k in BASE_SPEC_KEYS}
    base = base or build_base(**{k: v for k, v in spec.items() if v is not None})
    if base.fingerprint() != checkpoint["base"]["fingerprint"]:
        raise CheckpointError(f"{where}: checkpoint was trained on a different base (weights differ); {retrain}")
    config = MethodConfig(**checkpoint["method_config"])
    model = build_task_model(base, len(checkpoint["labels"]), config, 0)
    try:
        load_task_state(model, config, checkpoint["tensors"])
    except KeyError as exc:
        raise CheckpointError(f"{where}: {exc.args[0]}; {retrain}") from None
    model.eval()
    return model, base, config
