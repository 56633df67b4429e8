"""Turn a trained task checkpoint into a signed task pack for the exported base."""

from __future__ import annotations

import logging
from pathlib import Path

from device_runtime.basefiles import Base
from device_runtime.errors import BaseMismatchError, CheckpointError, PackLimitError
from device_runtime.keys import load_private_key
from device_runtime.limits import check_rebuild_budget
from device_runtime.pack import BN_TENSORS, BnEntry, build_pack, write_pack

from .adapters import adapters_of
from .checkpoint import restore_task_model
from .methods import PACKABLE_METHODS, batchnorms

log = logging.getLogger(__name__)


def task_tensors(model, config) -> dict:
    """A trained task model's pack tensors: adapted layers, head and BatchNorm overrides."""
    layers = [adapter.pack_entry(name) for name, adapter in adapters_of(model.backbone).items()]
    bn = []
    if config.bn_is_task_state:
        named = {id(m): n for n, m in model.backbone.named_modules()}
        for module in batchnorms(model.backbone):
            bn.append(BnEntry(
                name=named[id(module)],
                tensors={t: getattr(module, t).detach().cpu().numpy() for t in BN_TENSORS},
            ))
    head = {"weight": model.head.weight.detach().cpu().numpy(), "bias": model.head.bias.detach().cpu().numpy()}
    return {"layers": layers, "head": head, "bn": bn}


def pack_body(checkpoint: dict, base_files: Base, pack_version: int, source: str | Path = "checkpoint") -> dict:
    """The pack's content (tensors as numpy arrays), checked against the exported base."""
    if checkpoint["method"] not in PACKABLE_METHODS:
        raise CheckpointError(
            f"method {checkpoint['method']!r} trains the whole model and cannot be packed; "
            f"use one of {', '.join(PACKABLE_METHODS)}"
        )
    manifest = base_files.manifest
    if manifest.get("base_fingerprint") != checkpoint["base"]["fingerprint"]:
        raise BaseMismatchError(
            f"{base_files.graph_path.parent}: the checkpoint of task {checkpoint['task']!r} was trained on another "
            "base; export this project's base again (`km-edge export-base`) or retrain the task "
            f"(`km-edge pack --task {checkpoint['task']} --retrain`)"
        )
    model, _, config = restore_task_model(checkpoint, where=source)
    tensors = task_tensors(model, config)
    return {
        "task": checkpoint["task"],
        "pack_version": int(pack_version),
        "base_id": base_files.base_id,
        "labels": list(checkpoint["labels"]),
        "preprocess": manifest["preprocess"],
        "method": config.method,
        "modulator": config.modulator.to_dict() if config.method == "km" else None,
        **tensors,
        "metrics": {"host_val_accuracy": float(checkpoint["val_accuracy"]), **checkpoint.get("params", {})},
        "trainer": {k: v for k, v in checkpoint["options"].items() if isinstance(v, (str, int, float, bool))},
    }


def write_task_pack(
    checkpoint: dict,
    base_dir: str | Path,
    signing_key: str | Path,
    out_path: str | Path,
    pack_version: int = 1,
    storage_dtype: str = "float32",
    expires: str | None = None,
    source: str | Path = "checkpoint",
) -> dict:
    """Sign the checkpoint's pack (valid until ``expires``, a UTC time, if given) and write it;
    ``source``: the checkpoint's path, named in refusals."""
    base_files = Base.open(base_dir, verify=True)
    body = {**pack_body(checkpoint, base_files, pack_version, source), "expires": expires}
    # refuse here what every device would refuse (modulators too big for the base)
    try:
        check_rebuild_budget(Path(out_path).name, body["layers"], base_files.conv_shapes)
    except PackLimitError as exc:
        raise PackLimitError(f"{exc}; train smaller adapters (--kernel-hidden, --channel-hidden or "
                             "--lora-rank) with --retrain") from None
    data = build_pack(body, load_private_key(signing_key), storage_dtype=storage_dtype)
    write_pack(out_path, data)
    log.debug("%s: task %s v%d, %d layers, %s, %d bytes, signed with %s", out_path, body["task"],
              body["pack_version"], len(body["layers"]), storage_dtype, len(data), signing_key)
    total = int(base_files.manifest["graph_bytes"]) + int(base_files.manifest["weights_bytes"])
    return {
        "task": body["task"],
        "pack": str(out_path),
        "pack_version": body["pack_version"],
        "expires": expires,
        "method": body["method"],
        "storage_dtype": storage_dtype,
        "pack_bytes": len(data),
        "base_bytes": total,
        "percent_of_base_bytes": round(100.0 * len(data) / total, 3),
        "base_id": body["base_id"],
        "host_val_accuracy": body["metrics"]["host_val_accuracy"],
    }
