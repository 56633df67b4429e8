"""``km-edge demo``: the whole flow offline, in a few CPU minutes, on the real ImageNet EfficientNet-Lite0.

demo data (target tasks) -> export the ImageNet lite0 base -> keygen (reused) -> per target task:
train KM and pack it, train the head-only baseline for comparison -> run and eval every pack on the
torch-free device runtime, and compare its logits with the host's -> one table.

The input size is small (``DEMO_INPUT_SIZE``) so the run fits in minutes on 2 CPU cores; the
images are the built-in synthetic tasks (no package ships labelled images that suit them).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch

from device_runtime.errors import ConfigError
from device_runtime.imagefolder import list_image_folder
from device_runtime.keys import generate_keypair, key_paths, load_trusted_keys
from device_runtime.preprocess import load_image, preprocess
from device_runtime.runtime import Runtime

from .checkpoint import load_checkpoint, restore_task_model
from .config import CONFIG_FILE, TRAIN_DEFAULTS, render_config
from .demodata import TARGET_TASKS, write_demo_data
from .export import export_base
from .models import build_base
from .pack import write_task_pack
from .train import train_task

log = logging.getLogger(__name__)

DEMO_SEED = 0
DEMO_ARCH, DEMO_WEIGHTS = "efficientnet_lite0", "imagenet"
DEMO_INPUT_SIZE = 48  # lite0 at 48 px (resize 54, crop 48): the demo's 40 px images, minutes on 2 cores
TASK_EPOCHS = 6
BATCH_SIZE = 32
# KM as the project default, except BatchNorm stays frozen: on this ImageNet base and step budget,
# training BatchNorm cost accuracy (letters, 64 px, 4 epochs: 0.812 with, 0.929 without).
DEMO_KM_OPTIONS = {"train_bn": False}
BASELINE = "head"  # the comparison column: a linear head on the frozen ImageNet features, same steps

TABLE_COLUMNS = {  # row key: (header, format)
    "task": ("task", "{}"),
    "host_val_accuracy": ("host acc", "{:.3f}"),
    "device_accuracy": ("device acc", "{:.3f}"),
    "head_only_accuracy": ("head-only acc", "{:.3f}"),
    "max_logit_diff": ("max logit diff", "{:.1e}"),
    "pack_bytes": ("pack bytes", "{:,}"),
    "percent_of_base_bytes": ("% of base", "{:.2f}"),
    "rebuild_ms": ("rebuild ms", "{:.1f}"),
    "session_ms": ("session ms", "{:.1f}"),
    "infer_ms": ("infer ms/img", "{:.2f}"),
}


def format_table(rows: list[dict]) -> str:
    header = "| " + " | ".join(h for h, _ in TABLE_COLUMNS.values()) + " |"
    rule = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    body = ["| " + " | ".join(fmt.format(row[k]) for k, (_, fmt) in TABLE_COLUMNS.items()) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def run_demo(
    workdir: str | Path,
    tasks: list[str] | None = None,
    epochs: int | None = None,
    input_size: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run the whole flow in ``workdir``; each step is logged (info), the rows of the table returned."""
    work = Path(workdir)
    tasks = list(tasks or TARGET_TASKS)
    unknown = [t for t in tasks if t not in TARGET_TASKS]
    if unknown:
        raise ConfigError(f"unknown demo task(s) {', '.join(unknown)}; choose from {', '.join(TARGET_TASKS)}")
    input_size = int(input_size or DEMO_INPUT_SIZE)
    data = work / "data"
    if not all((data / t / "train").is_dir() for t in tasks):
        log.info(f"[1/6] writing demo data to {data}")
        write_demo_data(data, seed=DEMO_SEED, progress=progress, tasks=tasks)
    else:
        log.info(f"[1/6] demo data already in {data}")

    base_spec = {"arch": DEMO_ARCH, "weights": DEMO_WEIGHTS, "input_size": input_size}
    task_tables = {t: {"data": f"data/{t}", "epochs": int(epochs or TASK_EPOCHS), **DEMO_KM_OPTIONS} for t in tasks}
    (work / CONFIG_FILE).write_text(render_config(DEMO_ARCH, DEMO_WEIGHTS, input_size, task_tables))
    base = build_base(**base_spec)
    manifest = export_base(base, work / "base")
    log.info(f"[2/6] exported the ImageNet EfficientNet-Lite0 base ({base.num_params():,} params, "
             f"{len(manifest['conv_layers'])} convs, {input_size} px) to {work / 'base'}: base_id {manifest['base_id'][:16]}…")

    keys = work / "keys"
    private_key, public_key = key_paths(keys)
    if not private_key.exists():
        generate_keypair(keys)
    log.info(f"[3/6] signing key in {keys}")

    options = dict(TRAIN_DEFAULTS, epochs=epochs or TASK_EPOCHS, batch_size=BATCH_SIZE, device="cpu", seed=DEMO_SEED)
    km_options = dict(options, **DEMO_KM_OPTIONS)
    runtime = Runtime(work / "base", load_trusted_keys([public_key]))
    rows = []
    for task in tasks:
        log.info(f"[4/6] {task}: training KM and packing; training the head-only baseline")
        checkpoint_path = work / "checkpoints" / f"{task}.pt"
        trained = train_task(task, data / task, base_spec, km_options, checkpoint_path, progress=progress)
        checkpoint = load_checkpoint(checkpoint_path)
        packed = write_task_pack(checkpoint, work / "base", private_key, work / "packs" / f"{task}.kmp")
        baseline = train_task(task, data / task, base_spec, dict(options, method=BASELINE),
                              work / "checkpoints" / f"{task}-{BASELINE}.pt", progress=progress)

        log.info(f"[5/6] {task}: device runtime (verify, rebuild, onnxruntime)")
        loaded = runtime.load_pack(packed["pack"])
        classes, samples = list_image_folder(data / task / "val")
        first = {}
        for path, label in samples:
            first.setdefault(label, path)
        predictions = runtime.predict([str(p) for p in first.values()], top_k=1)
        hits = sum(p["top"][0]["label"] == classes[label] for p, label in zip(predictions, first))
        log.info(f"      run: {hits}/{len(predictions)} sample images right")
        result = runtime.evaluate(data / task / "val", progress=progress)
        timings = dict(loaded.timings_ms)
        rows.append({
            "task": task,
            "host_val_accuracy": trained["val_accuracy"],
            "device_accuracy": result["accuracy"],
            "head_only_accuracy": baseline["val_accuracy"],
            "max_logit_diff": _max_logit_diff(checkpoint, base, runtime, [p for p, _ in samples]),
            "pack_bytes": packed["pack_bytes"],
            "percent_of_base_bytes": packed["percent_of_base_bytes"],
            "rebuild_ms": timings["rebuild"],
            "session_ms": timings["session"],
            "infer_ms": timings["infer"] / max(result["n_images"], 1),
            "percent_of_base_params": trained["percent_of_base"],
            "pack": packed["pack"],
        })
    log.info(f"[6/6] results: KM packs on ImageNet EfficientNet-Lite0 at {input_size} px "
             "(device = onnxruntime on this machine's CPU)")
    return rows


def _max_logit_diff(checkpoint: dict, base, runtime: Runtime, paths: list) -> float:
    """Largest |host torch logit - device logit| over the val images (the active pack)."""
    batch = np.stack([preprocess(load_image(p), runtime.preprocess_spec) for p in paths])
    model, _, _ = restore_task_model(checkpoint, copy.deepcopy(base))
    with torch.no_grad():
        host = model(torch.from_numpy(batch)).numpy()
    return float(np.abs(runtime.logits(batch) - host).max())
