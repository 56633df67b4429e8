"""``km-edge demo``: the whole flow on the built-in demo data, offline, in a few CPU minutes.

demo data -> pretrain the demo base (reused) -> export-base -> keygen (reused) -> train + pack each
target task -> run and eval every pack on the torch-free device runtime -> one table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from device_runtime.imagefolder import list_image_folder
from device_runtime.keys import generate_keypair, load_trusted_keys
from device_runtime.runtime import Runtime

from .config import CONFIG_FILE, TRAIN_DEFAULTS, render_config
from .demodata import SOURCE_TASK, TARGET_TASKS, write_demo_data
from .export import export_base
from .models import build_base
from .pack import write_task_pack
from .train import load_checkpoint, pretrain_base, train_task

DEMO_SEED = 0
PRETRAIN_EPOCHS = 12
TASK_EPOCHS = 15

TABLE_COLUMNS = [  # key, header, format
    ("task", "task", "{}"),
    ("host_val_accuracy", "host val acc", "{:.3f}"),
    ("device_accuracy", "device acc", "{:.3f}"),
    ("pack_bytes", "pack bytes", "{:,}"),
    ("percent_of_base_bytes", "% of base", "{:.2f}"),
    ("rebuild_ms", "rebuild ms", "{:.1f}"),
    ("session_ms", "session ms", "{:.1f}"),
    ("infer_ms", "infer ms/img", "{:.2f}"),
]


def format_table(rows: list[dict]) -> str:
    header = "| " + " | ".join(h for _, h, _ in TABLE_COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    body = ["| " + " | ".join(fmt.format(row[k]) for k, _, fmt in TABLE_COLUMNS) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def run_demo(
    workdir: str | Path,
    tasks: list[str] | None = None,
    epochs: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict]:
    work = Path(workdir)
    tasks = list(tasks or TARGET_TASKS)
    unknown = [t for t in tasks if t not in TARGET_TASKS]
    if unknown:
        from device_runtime.errors import ConfigError

        raise ConfigError(f"unknown demo task(s) {', '.join(unknown)}; choose from {', '.join(TARGET_TASKS)}")
    data = work / "data"
    if not all((data / t / "train").is_dir() for t in [SOURCE_TASK, *tasks]):
        log(f"[1/6] writing demo data to {data}")
        write_demo_data(data, seed=DEMO_SEED, progress=progress)
    else:
        log(f"[1/6] demo data already in {data}")

    base_weights = work / "bases" / "demo.pth"
    if not base_weights.exists():
        log("[2/6] pretraining the demo base on the source task")
        report = pretrain_base(data / SOURCE_TASK, "demo", base_weights, epochs=PRETRAIN_EPOCHS, seed=DEMO_SEED,
                               device="cpu", progress=progress)
        log(f"      source val accuracy {report['source_val_accuracy']:.3f}")
    else:
        log(f"[2/6] reusing the demo base {base_weights}")
    (work / CONFIG_FILE).write_text(
        render_config("demo", "bases/demo.pth", 32, {t: {"data": f"data/{t}"} for t in tasks})
    )

    base_spec = {"arch": "demo", "weights": str(base_weights), "input_size": 32}
    manifest = export_base(build_base(**base_spec), work / "base")
    log(f"[3/6] exported base to {work / 'base'}: base_id {manifest['base_id'][:16]}…")

    keys = work / "keys"
    if not (keys / "signing.key").exists():
        generate_keypair(keys)
    log(f"[4/6] signing key in {keys}")

    options = dict(TRAIN_DEFAULTS, epochs=epochs or TASK_EPOCHS, device="cpu", seed=DEMO_SEED)
    runtime = Runtime(work / "base", load_trusted_keys([keys / "signing.pub"]))
    rows = []
    for task in tasks:
        log(f"[5/6] {task}: training KM and packing")
        checkpoint_path = work / "checkpoints" / f"{task}.pt"
        trained = train_task(task, data / task, base_spec, options, checkpoint_path, progress=progress)
        packed = write_task_pack(load_checkpoint(checkpoint_path), work / "base", keys / "signing.key",
                                 work / "packs" / f"{task}.kmp")
        loaded = runtime.load_pack(packed["pack"])
        _, samples = list_image_folder(data / task / "val")
        per_class = {}
        for path, label in samples:
            per_class.setdefault(label, path)
        predictions = runtime.predict([str(p) for p in per_class.values()], top_k=1)
        hits = sum(p["top"][0]["index"] == label for p, label in zip(predictions, per_class))
        log(f"      run: {hits}/{len(predictions)} sample images right")
        result = runtime.evaluate(data / task / "val", progress=progress)
        timings = loaded.timings_ms
        rows.append({
            "task": task,
            "host_val_accuracy": trained["val_accuracy"],
            "device_accuracy": result["accuracy"],
            "pack_bytes": packed["pack_bytes"],
            "percent_of_base_bytes": packed["percent_of_base_bytes"],
            "rebuild_ms": timings["rebuild"],
            "session_ms": timings["session"],
            "infer_ms": timings["infer"] / max(result["n_images"], 1),
            "percent_of_base_params": trained["percent_of_base"],
            "pack": packed["pack"],
        })
    log("[6/6] results (device = onnxruntime on this machine's CPU)\n")
    log(format_table(rows))
    return rows
