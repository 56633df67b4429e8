"""The ``km-edge`` command line.

Device commands (run, eval, verify, inspect) import only ``device_runtime``, so the CLI starts on a
device install without torch; host commands import torch lazily inside their bodies. Every command
takes ``--json``; user errors print one line and exit 2, internal failures exit 1.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from pathlib import Path

import click

from device_runtime.errors import ConfigError, KmEdgeError

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


def _emit(data, as_json: bool, text: str | None = None) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    elif text is not None:
        click.echo(text)


def command(group, *args, **kwargs):
    """A click command with ``--json`` and the error policy of DESIGN.md."""

    def decorate(func):
        @functools.wraps(func)
        def wrapper(*a, **kw):
            as_json = kw.get("as_json", False)
            try:
                return func(*a, **kw)
            except KmEdgeError as exc:
                _fail(str(exc), EXIT_BAD_INPUT, as_json)
            except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
                raise
            except KeyboardInterrupt:
                _fail("interrupted", 130, as_json)
            except Exception as exc:  # anything else is our bug: say so, keep the traceback opt-in
                if isinstance(exc, ModuleNotFoundError) and exc.name in ("torch", "torchvision"):
                    name = func.__name__.removesuffix("_cmd").replace("_", "-")
                    _fail(f"'{name}' runs on the host and needs torch: pip install 'km-edge[train]'",
                          EXIT_BAD_INPUT, as_json)
                if os.environ.get("KM_EDGE_DEBUG"):
                    traceback.print_exc()
                _fail(f"internal error: {type(exc).__name__}: {exc}", EXIT_INTERNAL, as_json)

        wrapper = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(wrapper)
        return group.command(*args, **kwargs)(wrapper)

    return decorate


def _fail(message: str, code: int, as_json: bool) -> None:
    message = " ".join(str(message).split())  # always one line
    if as_json:
        click.echo(json.dumps({"error": message, "exit_code": code}))
    click.echo(f"km-edge: error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="km-edge")
def main() -> None:
    """Ship many image tasks to edge devices from one frozen ConvNet with Kernel Modulation packs."""


# --- helpers shared by commands ------------------------------------------------------------------
def _settings():
    from .config import load_settings

    return load_settings(".")


def _base_spec(settings, arch, weights, input_size, width=None) -> dict:
    """The base a host command builds: flags, then km-edge.toml, then the `km-edge init` defaults.

    Random weights (``none``) are the project's bases/ARCH-random.pth, drawn once from a fixed seed
    when a base is first built, so export-base, train and pack all see the same base.
    """
    from .config import DEFAULT_ARCH, DEFAULT_WEIGHTS

    arch = arch or settings.base.get("arch") or DEFAULT_ARCH
    if weights is None:
        if "weights" in settings.base:
            weights = settings.base_weights()
        elif arch == DEFAULT_ARCH:
            weights = DEFAULT_WEIGHTS
    spec = {
        "arch": arch,
        "weights": weights,
        "input_size": input_size or settings.base.get("input_size"),
        "width": width or settings.base.get("width"),
    }
    spec = {k: v for k, v in spec.items() if v is not None}
    if spec.get("weights") in (None, "", "none", "None"):
        spec["weights"] = str(settings.random_base(arch).resolve())  # drawn and saved on first build
    return spec


def _default_base_dir(base_dir):
    return Path(base_dir or os.environ.get("KM_EDGE_BASE") or "base")


def _default_pubkeys(pubkeys):
    if pubkeys:
        return list(pubkeys)
    return [os.environ.get("KM_EDGE_PUBKEY") or "keys/signing.pub"]


def _runtime(base_dir, pubkeys, backend="ort", threads=None):
    from device_runtime.keys import load_trusted_keys
    from device_runtime.runtime import Runtime

    return Runtime(_default_base_dir(base_dir), load_trusted_keys(_default_pubkeys(pubkeys)), backend=backend, threads=threads)


device_options = [
    click.option("--base", "base_dir", type=click.Path(), help="Exported base dir [KM_EDGE_BASE or ./base]."),
    click.option("--pubkey", "pubkeys", multiple=True, type=click.Path(),
                 help="Trusted public key (repeatable) [KM_EDGE_PUBKEY or ./keys/signing.pub]."),
]


def with_options(options):
    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


# --- project set-up ------------------------------------------------------------------------------
@command(main, "init")
@click.argument("directory", default=".", type=click.Path(file_okay=False))
@click.option("--arch", default=None, help="Registry architecture or timm:NAME [efficientnet_lite0].")
@click.option("--weights", default=None,
              help="imagenet (efficientnet_lite0, offline), a torchvision name, pretrained (timm), a .pth or none "
                   "[imagenet for efficientnet_lite0, none otherwise].")
@click.option("--input-size", default=None, type=int, help="[224]")
@click.option("--force", is_flag=True, help="Overwrite an existing km-edge.toml.")
def init_cmd(directory, arch, weights, input_size, force, as_json):
    """Scaffold km-edge.toml, data/, packs/ and keys/ (runs keygen)."""
    from device_runtime.files import write_atomic
    from device_runtime.keys import generate_keypair

    from .config import CONFIG_FILE, DEFAULT_ARCH, DEFAULT_INPUT_SIZE, DEFAULT_WEIGHTS, render_config

    if weights is None:
        weights = DEFAULT_WEIGHTS if arch in (None, DEFAULT_ARCH) else "none"
    arch, input_size = arch or DEFAULT_ARCH, input_size or DEFAULT_INPUT_SIZE

    root = Path(directory)
    config = root / CONFIG_FILE
    if config.exists() and not force:
        raise ConfigError(f"{config} exists; pass --force to overwrite it")
    for sub in ("data", "packs", "keys"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    write_atomic(config, render_config(arch, weights, input_size).encode())
    keys = root / "keys"
    if (keys / "signing.key").exists():
        from device_runtime.keys import key_id, load_public_key

        key = key_id(load_public_key(keys / "signing.pub"))
    else:
        _, _, key = generate_keypair(keys)
    _emit({"config": str(config), "key_id": key}, as_json, f"wrote {config}; signing key id {key}")


@command(main, "keygen")
@click.option("--keys-dir", default="keys", show_default=True, type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace an existing key pair.")
def keygen_cmd(keys_dir, force, as_json):
    """Make an Ed25519 signing pair: keys/signing.key (0600) and keys/signing.pub."""
    from device_runtime.keys import generate_keypair

    private, public, key = generate_keypair(keys_dir, force=force)
    _emit({"private_key": str(private), "public_key": str(public), "key_id": key}, as_json,
          f"private key {private} (keep it secret)\npublic key  {public}\nkey id      {key}")


@command(main, "demo-data")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--scale", default=1.0, show_default=True, type=float, help="Multiply images per class.")
def demo_data_cmd(directory, seed, scale, as_json):
    """Write the built-in offline demo tasks (ImageFolder): a source task and target tasks."""
    from .demodata import write_demo_data

    summary = write_demo_data(directory, seed=seed, scale=scale, progress=not as_json)
    lines = [f"{task}: {len(s['classes'])} classes, {s['train']} train / {s['val']} val" for task, s in summary.items()]
    _emit({"directory": str(directory), "tasks": summary}, as_json, "\n".join(lines))


# --- host: bases and training --------------------------------------------------------------------
@command(main, "pretrain")
@click.option("--data", "data_dir", required=True, type=click.Path(), help="Source ImageFolder (train/, val/).")
@click.option("--arch", default=None, help="Registry architecture [km-edge.toml or demo].")
@click.option("--out", "out_path", default=None, type=click.Path(), help="Where to save [bases/ARCH.pth].")
@click.option("--epochs", default=10, show_default=True, type=int)
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--lr", default=3e-3, show_default=True, type=float)
@click.option("--input-size", default=None, type=int)
@click.option("--width", default=1.0, show_default=True, type=float, help="Channel width multiplier.")
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int)
def pretrain_cmd(data_dir, arch, out_path, epochs, batch_size, lr, input_size, width, device, seed, as_json):
    """Train a base from scratch on a source ImageFolder (the offline way to get a base)."""
    from .train import pretrain_base

    settings = _settings()
    arch = arch or settings.base.get("arch", "demo")
    out_path = out_path or f"bases/{arch}.pth"
    report = pretrain_base(data_dir, arch, out_path, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                           device=device, input_size=input_size, width=width, progress=not as_json)
    _emit(report, as_json, f"base {arch} saved to {out_path}; source val accuracy {report['source_val_accuracy']:.3f}")


@command(main, "export-base")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False), help="[km-edge.toml paths.base or base/]")
@click.option("--arch", default=None)
@click.option("--weights", default=None, help="imagenet, a torchvision name, pretrained (timm), a local .pth or none.")
@click.option("--input-size", default=None, type=int)
def export_base_cmd(out_dir, arch, weights, input_size, as_json):
    """Export the frozen base: base.onnx + base.weights + manifest.json; prints base_id."""
    from .export import export_base
    from .models import build_base

    settings = _settings()
    base = build_base(**_base_spec(settings, arch, weights, input_size))
    out_dir = Path(out_dir) if out_dir else settings.path("base")
    manifest = export_base(base, out_dir)
    report = {
        "base_dir": str(out_dir),
        "base_id": manifest["base_id"],
        "arch": manifest["arch"],
        "weights": manifest["weights"],
        "preprocess": manifest["preprocess"],
        "conv_layers": len(manifest["conv_layers"]),
        "graph_bytes": manifest["graph_bytes"],
        "weights_bytes": manifest["weights_bytes"],
    }
    _emit(report, as_json, f"exported {manifest['arch']} (weights {manifest['weights']}) to {out_dir}\n"
                          f"base_id {manifest['base_id']}")


train_options = [
    click.option("--method", type=click.Choice(["km", "head", "bn", "lora", "full"]), default=None),
    click.option("--epochs", type=int, default=None),
    click.option("--max-steps", type=int, default=None, help="Stop after this many optimiser steps."),
    click.option("--batch-size", type=int, default=None),
    click.option("--lr", type=float, default=None, help="Learning rate of the adapters [per-method default]."),
    click.option("--head-lr", type=float, default=None),
    click.option("--device", type=click.Choice(["cpu", "cuda", "mps", "auto"]), default=None),
    click.option("--seed", type=int, default=None),
    click.option("--modulator", type=click.Choice(["kernel", "channel", "auto"]), default=None),
    click.option("--kernel-hidden", type=int, default=None),
    click.option("--channel-hidden", type=int, default=None),
    click.option("--activation", type=click.Choice(["relu", "silu", "tanh", "gelu"]), default=None),
    click.option("--train-bn/--no-train-bn", default=None, help="BatchNorm affine + statistics become task tensors."),
    click.option("--lora-rank", type=int, default=None),
]


def _train(task, overrides, as_json):
    settings = _settings()
    task_settings = settings.task(task)  # an unknown task is refused before torch is imported
    options = settings.train_options(task, **overrides)
    from .train import train_task

    checkpoint = settings.path("checkpoints") / f"{task}.pt"
    return train_task(task, task_settings["data"], _base_spec(settings, None, None, None), options, checkpoint,
                      progress=not as_json)


@command(main, "train")
@click.option("--task", required=True)
@with_options(train_options)
def train_cmd(task, as_json, **overrides):
    """Train the task's modulators (or a baseline) + head; prints val accuracy."""
    report = _train(task, overrides, as_json)
    _emit(report, as_json,
          f"{task} [{report['method']}]: val accuracy {report['val_accuracy']:.4f} "
          f"(untrained {report['untrained_val_accuracy']:.4f}); {report['trainable_params']} trainable params "
          f"= {report['percent_of_base']:.3f} % of base + {report['head_params']} head; checkpoint {report['checkpoint']}")


@command(main, "pack")
@click.option("--task", required=True)
@click.option("--version", "pack_version", type=int, default=None, help="Pack version [previous + 1, or 1].")
@click.option("--dtype", "storage_dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None, help="[packs/TASK.kmp]")
@click.option("--retrain", is_flag=True, help="Train again even if a checkpoint exists.")
@with_options(train_options)
def pack_cmd(task, pack_version, storage_dtype, out_path, retrain, as_json, **overrides):
    """(Trains if needed, then) write packs/TASK.kmp, signed with keys/signing.key."""
    from .pack import write_task_pack
    from .train import load_checkpoint

    settings = _settings()
    settings.task(task)  # unknown task: refuse before anything else
    checkpoint_path = settings.path("checkpoints") / f"{task}.pt"
    trained = None
    if retrain or not checkpoint_path.exists():
        trained = _train(task, overrides, as_json)
    out_path = Path(out_path) if out_path else settings.path("packs") / f"{task}.kmp"
    keys = settings.path("keys")
    if pack_version is None:
        pack_version = _next_pack_version(out_path, keys / "signing.pub")
    report = write_task_pack(load_checkpoint(checkpoint_path), settings.path("base"), keys / "signing.key",
                             out_path, pack_version, {"fp32": "float32", "fp16": "float16"}[storage_dtype])
    if trained:
        report["trained"] = trained
    _emit(report, as_json,
          f"wrote {out_path} (v{pack_version}, {storage_dtype}): {report['pack_bytes']} bytes = "
          f"{report['percent_of_base_bytes']:.2f} % of the base; host val accuracy {report['host_val_accuracy']:.4f}")


def _next_pack_version(path: Path, pubkey: Path) -> int:
    """One more than the pack already at ``path`` (if it is ours and readable)."""
    from device_runtime.keys import load_trusted_keys
    from device_runtime.packformat import read_pack

    if not path.exists() or not pubkey.exists():
        return 1
    try:
        return read_pack(path, load_trusted_keys([pubkey])).pack_version + 1
    except KmEdgeError:
        return 1


# --- device commands ------------------------------------------------------------------------------
@command(main, "run")
@click.option("--pack", "pack_path", required=True, type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@with_options(device_options)
@click.option("--backend", type=click.Choice(["ort", "reference"]), default="ort", show_default=True)
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", default=None, type=int, help="onnxruntime intra-op threads.")
def run_cmd(pack_path, images, base_dir, pubkeys, backend, top_k, threads, as_json):
    """Predict labels (top-k) for images on the device runtime."""
    runtime = _runtime(base_dir, pubkeys, backend, threads)
    loaded = runtime.load_pack(pack_path)
    predictions = runtime.predict(list(images), top_k=top_k)
    pack = loaded.pack
    report = {
        "pack": {"task": pack.task, "version": pack.pack_version, "base_id": pack.base_id},
        "backend": backend,
        "predictions": predictions,
        "timings_ms": {k: round(v, 3) for k, v in loaded.timings_ms.items()},
    }
    lines = []
    for item in predictions:
        if "error" in item:
            lines.append(f"{item['image']}: error: {item['error']}")
        else:
            best = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in item["top"])
            lines.append(f"{item['image']}: {best}")
    _emit(report, as_json, "\n".join(lines))
    failed = [item for item in predictions if "error" in item]
    for item in failed:
        click.echo(f"km-edge: error: {item['error']}", err=True)
    if failed:
        sys.exit(EXIT_BAD_INPUT)


@command(main, "eval")
@click.option("--pack", "pack_path", required=True, type=click.Path())
@click.argument("directory", type=click.Path())
@with_options(device_options)
@click.option("--backend", type=click.Choice(["ort", "reference"]), default="ort", show_default=True)
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--threads", default=None, type=int)
def eval_cmd(pack_path, directory, base_dir, pubkeys, backend, batch_size, threads, as_json):
    """Accuracy of a pack on a labelled ImageFolder split, on the device runtime."""
    runtime = _runtime(base_dir, pubkeys, backend, threads)
    loaded = runtime.load_pack(pack_path)
    result = runtime.evaluate(directory, batch_size=batch_size, progress=not as_json)
    result["timings_ms"] = {k: round(v, 3) for k, v in loaded.timings_ms.items()}
    result["pack"] = {"task": loaded.pack.task, "version": loaded.pack.pack_version}
    _emit(result, as_json, f"{loaded.pack.task}: accuracy {result['accuracy']:.4f} on {result['n_images']} images")


@command(main, "verify")
@click.argument("pack_path", type=click.Path())
@with_options(device_options)
def verify_cmd(pack_path, base_dir, pubkeys, as_json):
    """Check a pack's signature, key, format and (where the base is here) its base and shapes."""
    from device_runtime.keys import load_trusted_keys
    from device_runtime.packformat import read_pack

    base = _default_base_dir(base_dir)
    if (base / "manifest.json").exists():
        loaded = _runtime(base_dir, pubkeys).check_pack(pack_path)
        pack, checked_base = loaded, True
    else:
        pack, checked_base = read_pack(pack_path, load_trusted_keys(_default_pubkeys(pubkeys))), False
    report = {"pack": str(pack_path), "ok": True, "task": pack.task, "version": pack.pack_version,
              "key_id": pack.key_id, "base_id": pack.base_id, "base_checked": checked_base}
    _emit(report, as_json, f"{pack_path}: OK (task {pack.task}, v{pack.pack_version}, key {pack.key_id}"
          + (", matches base)" if checked_base else "; base not checked: no base dir)"))


@command(main, "inspect")
@click.argument("pack_path", type=click.Path())
@with_options(device_options[1:])
def inspect_cmd(pack_path, pubkeys, as_json):
    """Show everything inside a (verified) pack."""
    from device_runtime.keys import load_trusted_keys
    from device_runtime.packformat import read_pack

    pack = read_pack(pack_path, load_trusted_keys(_default_pubkeys(pubkeys)))
    summary = pack.summary()
    if as_json:
        _emit(summary, True)
        return
    for key, value in summary.items():
        if key == "layers":
            click.echo(f"layers: {len(value)}")
            for layer in value:
                tensors = ", ".join(f"{n}{tuple(t['shape'])}" for n, t in layer["tensors"].items())
                click.echo(f"  {layer['name']}: {layer['adapter']} {layer.get('kind', '')} "
                           f"{layer.get('activation', '')} scale={layer.get('scale', 0):.4g} {tensors}")
        elif key == "bn":
            click.echo(f"bn overrides: {len(value)}")
        else:
            click.echo(f"{key}: {json.dumps(value, default=str)}")


# --- the whole flow --------------------------------------------------------------------------------
@command(main, "demo")
@click.option("--workdir", default="demo-work", show_default=True, type=click.Path(file_okay=False))
@click.option("--tasks", default="letters,shapes,textures", show_default=True, help="Target tasks to pack.")
@click.option("--epochs", default=None, type=int, help="Training epochs per task [demo default].")
@click.option("--input-size", default=None, type=int, help="Base input size [demo default, 48].")
def demo_cmd(workdir, tasks, epochs, input_size, as_json):
    """The whole flow offline, in minutes, on the real ImageNet EfficientNet-Lite0 base."""
    from .demo import run_demo

    rows = run_demo(workdir, [t for t in tasks.split(",") if t], epochs=epochs, input_size=input_size,
                    progress=not as_json, log=(lambda msg: None) if as_json else click.echo)
    if as_json:
        _emit(rows, True)
