"""The ``km-edge`` command line.

Device commands (run, eval, bench, verify, inspect, serve) import only ``device_runtime``, so the CLI
starts on a device install without torch; host commands import torch lazily inside their bodies, and
serve imports its HTTP stack only inside its body. Every command
takes ``--json``; user errors print one line and exit 2, internal failures exit 1.

Results go to stdout (JSON with ``--json``); log lines (``logging``, one logger per module) and
progress bars go to stderr. Logging is configured here and nowhere else: ``km-edge -q`` shows
warnings and errors only (and no progress bars), the default shows info, ``km-edge -v`` debug.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import traceback
from pathlib import Path

import click

from device_runtime.errors import ConfigError, KmEdgeError, NonFiniteError, OutputError, with_remedy
from device_runtime.text import MESSAGE_LIMIT, printable

from .options import BASE, META, TRAIN

log = logging.getLogger(__name__)
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1
LOGGED_PACKAGES = ("km_edge", "device_runtime")  # their loggers follow -v/-q; others show warnings only


class _LogFormat(logging.Formatter):
    """Info lines as plain sentences; other levels say so, in the ``km-edge: error:`` style."""

    def __init__(self, timestamps: bool = False):
        super().__init__(("%(asctime)s " if timestamps else "") + "%(label)s%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        where = f"{record.name}: " if record.levelno == logging.DEBUG else ""
        record.label = "" if record.levelno == logging.INFO else f"km-edge: {record.levelname.lower()}: {where}"
        return super().format(record)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is logged (click's test runner swaps it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property decides
        pass


def configure_logging(level: int, timestamps: bool = False) -> None:
    """One stderr handler on the root logger (replacing the one set before, so repeated in-process
    calls do not stack handlers); km-edge's own loggers at ``level``, every other library at WARNING."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(_LogFormat(timestamps))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in LOGGED_PACKAGES:
        logging.getLogger(name).setLevel(level)


def _progress(as_json: bool) -> bool:
    """Progress bars (stderr) are info-level output: hidden by --quiet, and with --json."""
    return not as_json and logging.getLogger(LOGGED_PACKAGES[0]).isEnabledFor(logging.INFO)


def _emit(data, as_json: bool, text: str | None = None) -> None:
    if as_json:
        try:  # NaN/Infinity are not JSON: refuse rather than print invalid output
            click.echo(json.dumps(data, indent=2, default=str, allow_nan=False))
        except ValueError:
            raise NonFiniteError("the result holds numbers that are not finite (NaN or infinity); "
                                 "refused") from None
    elif text is not None:
        click.echo(text)


def command(group, *args, **kwargs):
    """A click command with ``--json`` and the error policy of docs/DESIGN.md §6 (exit codes, one line)."""

    def decorate(func):
        @functools.wraps(func)
        def wrapper(*a, **kw):
            as_json = kw.get("as_json", False)
            try:
                return func(*a, **kw)
            except KmEdgeError as exc:
                _fail(with_remedy(exc), EXIT_BAD_INPUT, as_json)
            except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
                raise
            except KeyboardInterrupt:
                _fail("interrupted", 130, as_json)
            except Exception as exc:  # anything else is our bug: say so, keep the traceback opt-in
                if isinstance(exc, ModuleNotFoundError) and exc.name in ("torch", "torchvision"):
                    name = func.__name__.removesuffix("_cmd").replace("_", "-")
                    _fail(f"'{name}' runs on the host and needs torch: pip install 'km-edge[train]'",
                          EXIT_BAD_INPUT, as_json)
                if os.environ.get("KM_EDGE_DEBUG") or log.isEnabledFor(logging.DEBUG):  # km-edge -v
                    traceback.print_exc()
                _fail(f"internal error: {type(exc).__name__}: {exc}", EXIT_INTERNAL, as_json)

        wrapper = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(wrapper)
        return group.command(*args, **kwargs)(wrapper)

    return decorate


def _fail(message: str, code: int, as_json: bool) -> None:
    # always one line, control characters and ANSI escapes escaped, long names cut
    message = printable(" ".join(str(message).split()), MESSAGE_LIMIT)
    if as_json:
        click.echo(json.dumps({"error": message, "exit_code": code}))
    click.echo(f"km-edge: error: {message}", err=True)
    sys.exit(code)


class _Cli(click.Group):
    """Usage errors (a bad flag value, a missing option) are refusals like any other: exit 2 and
    one ``km-edge: error:`` line naming the flag and the way out, a JSON object with ``--json``."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        argv = sys.argv[1:] if args is None else list(args)
        try:
            result = super().main(argv, prog_name, complete_var, False, **extra)
        except click.ClickException as exc:
            message = exc.format_message()
            context = getattr(exc, "ctx", None)
            if context is not None:
                message += f" (see '{context.command_path} --help')"
            _fail(message, exc.exit_code, "--json" in argv)
        except click.exceptions.Abort:
            _fail("aborted", 130, "--json" in argv)
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="km-edge")
@click.option("-v", "--verbose", is_flag=True, help="Log debug lines too (stderr).")
@click.option("-q", "--quiet", is_flag=True, help="Log warnings and errors only; no progress bars.")
def main(verbose: bool, quiet: bool) -> None:
    """Ship many image tasks to edge devices from one frozen ConvNet with Kernel Modulation packs."""
    if verbose and quiet:
        raise click.UsageError("-v/--verbose and -q/--quiet exclude each other; pass one")
    configure_logging(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


# --- helpers shared by commands ------------------------------------------------------------------
def _settings():
    """km-edge.toml of the working directory, read once per command (kept on click's context)."""
    from .config import CONFIG_FILE, load_settings

    meta = click.get_current_context().meta
    if "km_edge.settings" not in meta:
        meta["km_edge.settings"] = settings = load_settings(".")
        log.debug("settings: %s", Path(CONFIG_FILE).resolve() if settings.found else f"no {CONFIG_FILE}, defaults")
    return meta["km_edge.settings"]


def _base_spec(settings, arch, weights, input_size, width=None) -> dict:
    """The base a host command builds: flags, then km-edge.toml, then the `km-edge init` defaults.

    Random weights (``none``) are the project's bases/ARCH-random.pth, drawn once from a fixed seed
    when a base is first built, so export-base, train and pack all see the same base.
    """
    from .config import DEFAULT_ARCH, DEFAULT_WEIGHTS
    from .weights import NO_WEIGHTS

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
    if spec.get("weights") in NO_WEIGHTS:
        spec["weights"] = str(settings.random_base(arch).resolve())  # drawn and saved on first build
    return spec


def _default_base_dir(base_dir):
    """Where a device command finds the base: --base > KM_EDGE_BASE > km-edge.toml [paths] base > ./base."""
    return Path(base_dir or os.environ.get("KM_EDGE_BASE") or _settings().path("base"))


def _remember(ctx, param, value):
    """Trust options are read by _trusted_keys, so device commands need not pass them along."""
    if value is not None:
        ctx.meta[f"km_edge.{param.name}"] = value
    return value


def _trusted_keys(pubkeys):
    """The device's trust: --pubkey files, a trust file (key windows) and a revocation list.

    Each comes from its flag, else its environment variable (KM_EDGE_PUBKEY, KM_EDGE_TRUST,
    KM_EDGE_REVOKED), else the keys folder (km-edge.toml [paths] keys, ./keys by default): its
    trust.json and revoked.json where they exist, else its signing.pub (packs/README.md, section 6).
    """
    from device_runtime.keys import PUBLIC_KEY_NAME, REVOCATION_FILE_NAME, TRUST_FILE_NAME
    from device_runtime.pack.trust import load_trust

    meta = click.get_current_context().meta
    keys_dir = _settings().path("keys")

    def chosen(name, env, default):
        value = meta.get(f"km_edge.{name}") or os.environ.get(env)
        return Path(value) if value else (default if default.exists() else None)

    trust = chosen("trust_file", "KM_EDGE_TRUST", keys_dir / TRUST_FILE_NAME)
    revoked = chosen("revocation_file", "KM_EDGE_REVOKED", keys_dir / REVOCATION_FILE_NAME)
    pubkeys = list(pubkeys) or [p for p in [os.environ.get("KM_EDGE_PUBKEY")] if p]
    if not pubkeys and trust is None:
        pubkeys = [keys_dir / PUBLIC_KEY_NAME]
    return load_trust(pubkeys, trust, revoked)


def _runtime(base_dir, pubkeys, backend="ort", threads=None, provider=None, trt_fp16=False, rollback=None,
             **extra):
    from device_runtime.runtime import Runtime

    return Runtime(_default_base_dir(base_dir), _trusted_keys(pubkeys), backend=backend,
                   threads=threads, provider=provider, trt_fp16=trt_fp16, rollback=rollback,
                   trt_cache_dir=os.environ.get("KM_EDGE_TRT_CACHE") or Path.home() / ".cache" / "km-edge" / "trt",
                   **extra)


def _rollback_state(state_path):
    """The device's anti-rollback state (device_runtime.rollback), checked readable now."""
    from device_runtime.rollback import RollbackState, default_state_path

    state = RollbackState(state_path or default_state_path())
    state.highest()  # a corrupt file is refused before anything else happens
    return state


state_option = click.option(
    "--state", "state_path", type=click.Path(dir_okay=False),
    help="Anti-rollback state file [KM_EDGE_STATE or ~/.local/state/km-edge/rollback.json].")


device_options = [
    click.option("--base", "base_dir", type=click.Path(), help="Exported base dir [KM_EDGE_BASE, else km-edge.toml [paths] base, else ./base]."),
    click.option("--pubkey", "pubkeys", multiple=True, type=click.Path(),
                 help="Trusted public key (repeatable) [KM_EDGE_PUBKEY or KEYS/signing.pub, KEYS from km-edge.toml [paths], ./keys]."),
    click.option("--trust", "trust_file", type=click.Path(dir_okay=False), expose_value=False, callback=_remember,
                 help="Trust file: keys with validity windows [KM_EDGE_TRUST or KEYS/trust.json if present]."),
    click.option("--revoked", "revocation_file", type=click.Path(dir_okay=False), expose_value=False,
                 callback=_remember,
                 help="Revocation list the device honours [KM_EDGE_REVOKED or KEYS/revoked.json if present]."),
]


# the names are device_runtime.backends.PROVIDERS (not imported here: it pulls in onnxruntime)
provider_options = [
    click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt", "auto"], case_sensitive=False),
                  default="cpu", show_default=True, envvar="KM_EDGE_PROVIDER",
                  help="onnxruntime execution provider; auto takes the best available [KM_EDGE_PROVIDER]."),
    click.option("--trt-fp16", is_flag=True,
                 help="TensorRT: build FP16 engines (engines are cached per pack in KM_EDGE_TRT_CACHE "
                      "or ~/.cache/km-edge/trt)."),
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
@click.option("--input-size", default=None, type=BASE["input_size"].click_type(), help="[224]")
@click.option("--force", is_flag=True, help="Overwrite an existing km-edge.toml.")
def init_cmd(directory, arch, weights, input_size, force, as_json):
    """Scaffold km-edge.toml, data/, packs/ and keys/ (runs keygen)."""
    from device_runtime.files import write_atomic
    from device_runtime.keys import generate_keypair, key_paths

    from .config import CONFIG_FILE, DEFAULT_ARCH, DEFAULT_INPUT_SIZE, DEFAULT_WEIGHTS, render_config

    if weights is None:
        weights = DEFAULT_WEIGHTS if arch in (None, DEFAULT_ARCH) else "none"
    arch, input_size = arch or DEFAULT_ARCH, input_size or DEFAULT_INPUT_SIZE

    root = Path(directory)
    config = root / CONFIG_FILE
    if config.exists() and not force:
        raise ConfigError(f"{config} exists; pass --force to overwrite it")
    from .options import PATH_DEFAULTS

    for sub in ("data", "packs", "keys"):
        try:
            (root / PATH_DEFAULTS[sub]).mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file in the way, no permission
            raise OutputError(f"{root / PATH_DEFAULTS[sub]}: cannot create the folder ({exc.strerror or exc})") from None
    write_atomic(config, render_config(arch, weights, input_size).encode())
    keys = root / PATH_DEFAULTS["keys"]
    private_key, public_key = key_paths(keys)
    if private_key.exists():
        from device_runtime.keys import key_id, load_public_key

        key = key_id(load_public_key(public_key))
    else:
        _, _, key = generate_keypair(keys)
    _emit({"config": str(config), "key_id": key}, as_json, f"wrote {config}; signing key id {key}")


@command(main, "keygen")
@click.option("--keys-dir", default="keys", show_default=True, type=click.Path(file_okay=False))
@click.option("--name", default="signing", show_default=True, help="Key name: writes NAME.key and NAME.pub.")
@click.option("--force", is_flag=True, help="Replace an existing key pair.")
def keygen_cmd(keys_dir, name, force, as_json):
    """Make an Ed25519 signing pair: keys/NAME.key (0600) and keys/NAME.pub."""
    from device_runtime.keys import generate_keypair

    private, public, key = generate_keypair(keys_dir, force=force, name=name)
    trust_entry = {"name": name, "public_key": public.name}
    _emit({"name": name, "private_key": str(private), "public_key": str(public), "key_id": key,
           "trust_entry": trust_entry}, as_json,
          f"private key {private} (keep it secret)\npublic key  {public}\nkey id      {key}\n"
          f"trust entry {json.dumps(trust_entry)} (add not_before / expires for a validity window)")


@command(main, "demo-data")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, type=TRAIN["seed"].click_type())
@click.option("--scale", default=1.0, show_default=True, type=click.FloatRange(0.01, 100.0), help="Multiply images per class.")
def demo_data_cmd(directory, seed, scale, as_json):
    """Write the built-in offline demo tasks (ImageFolder): a source task and target tasks."""
    from .demodata import write_demo_data

    summary = write_demo_data(directory, seed=seed, scale=scale, progress=_progress(as_json))
    lines = [f"{task}: {len(s['classes'])} classes, {s['train']} train / {s['val']} val" for task, s in summary.items()]
    _emit({"directory": str(directory), "tasks": summary}, as_json, "\n".join(lines))


# --- host: bases and training --------------------------------------------------------------------
@command(main, "pretrain")
@click.option("--data", "data_dir", required=True, type=click.Path(), help="Source ImageFolder (train/, val/).")
@click.option("--arch", default=None, help="Registry architecture [km-edge.toml or demo].")
@click.option("--out", "out_path", default=None, type=click.Path(), help="Where to save [bases/ARCH.pth].")
@click.option("--epochs", default=10, show_default=True, type=TRAIN["epochs"].click_type())
@click.option("--batch-size", default=64, show_default=True, type=TRAIN["batch_size"].click_type())
@click.option("--lr", default=3e-3, show_default=True, type=TRAIN["lr"].click_type())
@click.option("--input-size", default=None, type=BASE["input_size"].click_type())
@click.option("--width", default=1.0, show_default=True, type=BASE["width"].click_type(), help="Channel width multiplier.")
@click.option("--device", default="auto", show_default=True, type=TRAIN["device"].click_type())
@click.option("--seed", default=0, show_default=True, type=TRAIN["seed"].click_type())
def pretrain_cmd(data_dir, arch, out_path, epochs, batch_size, lr, input_size, width, device, seed, as_json):
    """Train a base from scratch on a source ImageFolder (the offline way to get a base)."""
    from .pretrain import pretrain_base

    settings = _settings()
    arch = arch or settings.base.get("arch", "demo")
    out_path = out_path or f"bases/{arch}.pth"
    report = pretrain_base(data_dir, arch, out_path, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                           device=device, input_size=input_size, width=width, progress=_progress(as_json))
    _emit(report, as_json, f"base {arch} saved to {out_path}; source val accuracy {report['source_val_accuracy']:.3f}")


@command(main, "export-base")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False), help="[km-edge.toml paths.base or base/]")
@click.option("--arch", default=None)
@click.option("--weights", default=None, help="imagenet, a torchvision name, pretrained (timm), a local .pth or none.")
@click.option("--input-size", default=None, type=BASE["input_size"].click_type())
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
        "weights": base.weights,
        "preprocess": manifest["preprocess"],
        "conv_layers": len(manifest["conv_layers"]),
        "graph_bytes": manifest["graph_bytes"],
        "weights_bytes": manifest["weights_bytes"],
    }
    _emit(report, as_json, f"exported {manifest['arch']} (weights {base.weights}) to {out_dir}\n"
                          f"base_id {manifest['base_id']}")


def _flag(name: str, setting) -> click.Option:
    """A command-line flag for one schema setting (km_edge.options): same range, same choices."""
    flag = "--" + name.replace("_", "-")
    if setting.kind is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=setting.help)
    return click.option(flag, name, type=setting.click_type(), default=None, help=setting.help or None)


train_options = [_flag(name, setting) for name, setting in TRAIN.items()
                 if name not in ("weight_decay", "workers")]


def _train(task, overrides, as_json):
    settings = _settings()
    task_settings = settings.task(task)  # an unknown task is refused before torch is imported
    options = settings.train_options(task, **overrides)
    from .train import train_task

    checkpoint = settings.path("checkpoints") / f"{task}.pt"
    return train_task(task, task_settings["data"], _base_spec(settings, None, None, None), options, checkpoint,
                      progress=_progress(as_json))


@command(main, "train")
@click.option("--task", required=True)
@with_options(train_options)
def train_cmd(task, as_json, **overrides):
    """Train the task's modulators (or a baseline) + head; prints each accuracy with the split it comes from."""
    report = _train(task, overrides, as_json)
    split = "val folder" if report["val_source"] == "val" else "holdout carved from train"
    test = ("; no test folder, so no unbiased accuracy" if report["test_accuracy"] is None else
            f"; test accuracy {report['test_accuracy']:.4f} (test folder, {report['n_test']} images, used for no choice)")
    _emit(report, as_json,
          f"{task} [{report['method']}]: {split} accuracy {report['val_accuracy']:.4f} at epoch {report['best_epoch']} "
          f"(that split picked the epoch; untrained {report['untrained_val_accuracy']:.4f}){test}; "
          f"{report['trainable_params']} trainable params = {report['percent_of_base']:.3f} % of base + "
          f"{report['head_params']} head; checkpoint {report['checkpoint']}")


@command(main, "pack")
@click.option("--task", required=True)
@click.option("--version", "pack_version", type=click.IntRange(1, 2**53), default=None, help="Pack version [previous + 1, or 1].")
@click.option("--dtype", "storage_dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None, help="[packs/TASK.kmp]")
@click.option("--retrain", is_flag=True, help="Train again even if a checkpoint exists.")
@click.option("--key", "key_name", default="signing", show_default=True, help="Sign with keys/KEY.key.")
@click.option("--expires", default=None, help="UTC time after which devices refuse the pack, e.g. 2027-06-01T00:00:00Z.")
@with_options(train_options)
def pack_cmd(task, pack_version, storage_dtype, out_path, retrain, key_name, expires, as_json, **overrides):
    """(Trains if needed, then) write packs/TASK.kmp, signed with keys/signing.key (or --key)."""
    from device_runtime.keys import key_paths
    from device_runtime.pack.codec import parse_time

    from .pack import write_task_pack
    from .checkpoint import load_checkpoint

    settings = _settings()
    settings.task(task)  # unknown task: refuse before anything else
    if expires is not None:
        parse_time(expires, "--expires")  # a bad time is refused before any training
    checkpoint_path = settings.path("checkpoints") / f"{task}.pt"
    out_path = Path(out_path) if out_path else settings.path("packs") / f"{task}.kmp"
    private_key, _ = key_paths(settings.path("keys"), key_name)
    if pack_version is None:  # before any training: an unreadable previous pack is refused first
        pack_version = _next_pack_version(out_path, settings.path("keys"))
    trained = None
    if retrain or not checkpoint_path.exists():
        trained = _train(task, overrides, as_json)
    report = write_task_pack(load_checkpoint(checkpoint_path), settings.path("base"), private_key,
                             out_path, pack_version, {"fp32": "float32", "fp16": "float16"}[storage_dtype],
                             expires=expires, source=checkpoint_path)
    if trained:
        report["trained"] = trained
    _emit(report, as_json,
          f"wrote {out_path} (v{pack_version}, {storage_dtype}): {report['pack_bytes']} bytes = "
          f"{report['percent_of_base_bytes']:.2f} % of the base; host val accuracy {report['host_val_accuracy']:.4f}")


meta_options = [click.option("--" + name.replace("_", "-"), name, type=setting.click_type(), default=setting.default,
                              show_default=True, help=setting.help) for name, setting in META.items()] + [
    _flag(name, TRAIN[name]) for name in ("lr", "head_lr", "seed", "modulator", "kernel_hidden", "channel_hidden",
                                          "activation")]


@command(main, "meta-train")
@click.option("--data", "data_dir", required=True, type=click.Path(),
              help="Source ImageFolder with many classes (DIR/train/<class>/ or DIR/<class>/).")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="Meta-init file to write [checkpoints/meta-init.pt].")
@with_options(meta_options)
def meta_train_cmd(data_dir, out_path, as_json, **overrides):
    """Meta-learn a KM initialisation (Reptile) for few-shot tasks; use it with train --init FILE."""
    settings = _settings()
    meta = {name: overrides.pop(name) for name in META}
    options = settings.train_options(None, **overrides)
    out_path = Path(out_path) if out_path else settings.path("checkpoints") / "meta-init.pt"
    from .meta import meta_train

    report = meta_train(data_dir, _base_spec(settings, None, None, None), options, meta, out_path,
                        progress=_progress(as_json))
    _emit(report, as_json,
          f"meta-init {out_path}: Reptile, {report['episodes']} episodes {report['ways']}-way {report['shots']}-shot "
          f"on {report['source_classes']} source classes; query accuracy after {report['inner_steps']} steps "
          f"(last 50 episodes) {report['final_query_accuracy']:.3f}; {report['seconds_per_episode']:.3f} s/episode")


def _next_pack_version(path: Path, keys_dir: Path) -> int:
    """One more than the pack already at ``path``, verified with any public key in ``keys_dir``
    (so a pack signed with a rotated-out key still counts); 1 when there is none. A previous pack
    that cannot be read is refused, never silently restarted at 1: devices would refuse the new
    pack as older than the one they have."""
    from datetime import datetime, timezone

    from device_runtime.pack import read_pack
    from device_runtime.pack.trust import load_trust

    if not path.exists():
        return 1
    try:  # judged at the epoch: an expired predecessor still counts for the numbering
        trusted = load_trust(sorted(keys_dir.glob("*.pub")))
        return read_pack(path, trusted, now=datetime(1970, 1, 1, tzinfo=timezone.utc)).pack_version + 1
    except KmEdgeError as exc:
        raise ConfigError(
            f"{path}: the previous pack cannot be read to number the next one ({exc}); pass --version N "
            f"above every version your devices accepted, or move {path} away to start at 1"
        ) from None


# --- device commands ------------------------------------------------------------------------------
@command(main, "run")
@click.option("--pack", "pack_path", required=True, type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@with_options(device_options)
@click.option("--backend", type=click.Choice(["ort", "reference"]), default="ort", show_default=True)
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", default=None, type=click.IntRange(1, 256), help="onnxruntime intra-op threads.")
@with_options(provider_options)
@state_option
def run_cmd(pack_path, images, base_dir, pubkeys, backend, top_k, threads, provider, trt_fp16, state_path, as_json):
    """Predict labels (top-k) for images on the device runtime."""
    runtime = _runtime(base_dir, pubkeys, backend, threads, provider, trt_fp16, rollback=_rollback_state(state_path))
    loaded = runtime.load_pack(pack_path)
    predictions = runtime.predict(list(images), top_k=top_k)
    pack = loaded.pack
    report = {
        "pack": {"task": pack.task, "version": pack.pack_version, "base_id": pack.base_id},
        "backend": backend,
        "provider": runtime.provider.name,
        "predictions": predictions,
        "timings_ms": {k: round(v, 3) for k, v in loaded.timings_ms.items()},
    }
    lines = []
    for item in predictions:
        if "error" in item:
            lines.append(f"{printable(item['image'])}: error: {printable(item['error'], MESSAGE_LIMIT)}")
        else:
            best = ", ".join(f"{printable(t['label'])} {t['probability']:.3f}" for t in item["top"])
            lines.append(f"{printable(item['image'])}: {best}")
    _emit(report, as_json, "\n".join(lines))
    failed = [item for item in predictions if "error" in item]
    for item in failed:
        click.echo(f"km-edge: error: {printable(item['error'], MESSAGE_LIMIT)}", err=True)
    if failed:
        sys.exit(EXIT_BAD_INPUT)


@command(main, "eval")
@click.option("--pack", "pack_path", required=True, type=click.Path())
@click.argument("directory", type=click.Path())
@with_options(device_options)
@click.option("--backend", type=click.Choice(["ort", "reference"]), default="ort", show_default=True)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1, 4096))
@click.option("--threads", default=None, type=click.IntRange(1, 256), help="onnxruntime intra-op threads.")
@with_options(provider_options)
@state_option
def eval_cmd(pack_path, directory, base_dir, pubkeys, backend, batch_size, threads, provider, trt_fp16, state_path,
             as_json):
    """Accuracy of a pack on a labelled ImageFolder split, on the device runtime."""
    runtime = _runtime(base_dir, pubkeys, backend, threads, provider, trt_fp16, rollback=_rollback_state(state_path))
    loaded = runtime.load_pack(pack_path)
    result = runtime.evaluate(directory, batch_size=batch_size, progress=_progress(as_json))
    result["timings_ms"] = {k: round(v, 3) for k, v in loaded.timings_ms.items()}
    result["pack"] = {"task": loaded.pack.task, "version": loaded.pack.pack_version}
    result["provider"] = runtime.provider.name
    lines = [f"{printable(loaded.pack.task)}: accuracy {result['accuracy']:.4f} on {result['n_images']} images"]
    if result["errors"]:  # skipped images are listed, not hidden
        lines.append(f"{len(result['errors'])} unreadable images skipped (not counted):")
        lines += [f"  {printable(item['error'], MESSAGE_LIMIT)}" for item in result["errors"]]
    _emit(result, as_json, "\n".join(lines))


@command(main, "bench")
@click.option("--pack", "pack_path", required=True, type=click.Path())
@with_options(device_options)
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1, max=256),
              help="The second inference batch size (batch 1 is always measured).")
@click.option("--repeats", default=10, show_default=True, type=click.IntRange(min=1, max=1000),
              help="Cold loads (and plain sessions) measured.")
@click.option("--runs", default=20, show_default=True, type=click.IntRange(min=2, max=10000),
              help="Paired inference runs per batch size.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="onnxruntime intra-op threads.")
@with_options(provider_options)
def bench_cmd(pack_path, base_dir, pubkeys, batch, repeats, runs, threads, provider, trt_fp16, as_json):
    """Device-side profile of a pack: load breakdown, latency vs the plain base, RSS."""
    from device_runtime.bench import profile_pack

    runtime = _runtime(base_dir, pubkeys, "ort", threads, provider, trt_fp16)
    report = profile_pack(runtime, pack_path, batch=batch, repeats=repeats, infer_runs=runs)
    load, plain = report["load_ms"], report["plain_session_ms"]
    lines = [
        f"{report['task']} on {report['arch']} [{report['provider']}, threads {threads or 'default'}], "
        f"medians (min) of {report['repeats']} in ms",
        *(f"  {key:<10} {load[key]['median']:9.2f} ({load[key]['min']:.2f})"
          for key in ("verify", "rebuild", "session", "total", "cache_hit", "probe")),
        f"  plain base session {plain['median']:.2f} ({plain['min']:.2f}); load / plain "
        f"{report['load_over_plain']['median']:.2f}x, with the probe (serve) "
        f"{report['load_with_probe_over_plain']['median']:.2f}x",
        f"  rebuild ({report['rebuild_engine']}) / memory floor ({report['rebuild_floor_ms']['median']:.2f} ms for "
        f"{report['conv_bytes'] / 2**20:.1f} MiB into a reused buffer) {report['rebuild_over_floor']['median']:.2f}x"
        f" (fresh arrays {report['rebuild_floor_fresh_ms']['median']:.2f} ms: "
        f"{report['rebuild_over_floor_fresh']['median']:.2f}x)",
        f"  kernels fused at load reach the session through: {report['fused_kernels_via']}",
        f"  CPU time: load / plain {report['cpu_load_over_plain']['median']:.2f}x, "
        f"rebuild / floor {report['cpu_rebuild_over_floor']['median']:.2f}x",
    ]
    for name, row in report["infer_ms"].items():
        lines.append(f"  infer {name}: pack p50 {row['pack']['median']:.2f} p90 {row['pack']['p90']:.2f}, "
                     f"plain p50 {row['plain']['median']:.2f} p90 {row['plain']['p90']:.2f}; "
                     f"pack / plain {row['ratio_median_paired']:.3f}")
    lines.append(f"  RSS {report['rss_mib']['rss']:.1f} MiB (peak {report['rss_mib']['peak']:.1f})")
    _emit(report, as_json, "\n".join(lines))


@command(main, "verify")
@click.argument("pack_path", type=click.Path())
@with_options(device_options)
@click.option("--probe", is_flag=True,
              help="Also rebuild the kernels, build the session and check the scores on a mid-grey image "
                   "are finite (what serve checks before a swap; needs the base).")
@state_option
def verify_cmd(pack_path, base_dir, pubkeys, probe, state_path, as_json):
    """Check a pack's signature, key, format, anti-rollback state and (where the base is here) its
    base and shapes; with --probe, also build it and score one image. Records nothing."""
    from device_runtime.pack import read_pack

    rollback = _rollback_state(state_path)
    base = _default_base_dir(base_dir)
    probe_ms = None
    if (base / "manifest.json").exists():
        runtime = _runtime(base_dir, pubkeys)  # no rollback state given: it records nothing
        if probe:
            loaded = runtime.load_pack(pack_path, probe=True)
            pack, probe_ms = loaded.pack, round(loaded.timings_ms["probe"], 3)
        else:
            pack = runtime.check_pack(pack_path)
        checked_base = True
    elif probe:
        raise click.UsageError(f"--probe builds the pack on its base, and {base} has no manifest.json; "
                               "point --base (or KM_EDGE_BASE) at the base folder")
    else:
        pack, checked_base = read_pack(pack_path, _trusted_keys(pubkeys)), False
    rollback.check(pack, Path(pack_path).name)
    report = {"pack": str(pack_path), "ok": True, "task": pack.task, "version": pack.pack_version,
              "key_id": pack.key_id, "base_id": pack.base_id, "base_checked": checked_base,
              "probed": probe, "probe_ms": probe_ms,
              "recorded_version": rollback.recorded(pack.task, pack.key_id)}
    recorded = report["recorded_version"]
    relation = ("no version recorded on this device" if recorded is None else
                f"newer than recorded v{recorded}" if pack.pack_version > recorded else f"the recorded v{recorded}")
    report["version_relation"] = relation
    _emit(report, as_json, f"{printable(pack_path)}: OK (task {printable(pack.task)}, v{pack.pack_version}, key {pack.key_id}"
          + (", matches base" if checked_base else "; base not checked: no base dir")
          + (", scores a probe image finitely" if probe else "") + f"; {relation})")


@command(main, "inspect")
@click.argument("pack_path", type=click.Path())
@with_options(device_options[1:])
def inspect_cmd(pack_path, pubkeys, as_json):
    """Show everything inside a (verified) pack."""
    from device_runtime.pack import read_pack

    pack = read_pack(pack_path, _trusted_keys(pubkeys))
    summary = pack.summary()
    if as_json:
        _emit(summary, True)
        return
    for key, value in summary.items():
        if key == "layers":
            click.echo(f"layers: {len(value)}")
            for layer in value:
                tensors = ", ".join(f"{n}{tuple(t['shape'])}" for n, t in layer["tensors"].items())
                click.echo(f"  {printable(layer['name'])}: {layer['adapter']} {layer.get('kind', '')} "
                           f"{layer.get('activation', '')} scale={layer.get('scale', 0):.4g} {tensors}")
        elif key == "bn":
            click.echo(f"bn overrides: {len(value)}")
        else:
            click.echo(f"{key}: {printable(json.dumps(value, default=str), MESSAGE_LIMIT)}")


# --- the whole flow --------------------------------------------------------------------------------
@command(main, "demo")
@click.option("--workdir", default="demo-work", show_default=True, type=click.Path(file_okay=False))
@click.option("--tasks", default="letters,shapes,textures", show_default=True, help="Target tasks to pack.")
@click.option("--epochs", default=None, type=TRAIN["epochs"].click_type(), help="Training epochs per task [demo default].")
@click.option("--input-size", default=None, type=BASE["input_size"].click_type(), help="Base input size [demo default, 48].")
def demo_cmd(workdir, tasks, epochs, input_size, as_json):
    """The whole flow offline, in minutes, on the real ImageNet EfficientNet-Lite0 base."""
    from .demo import format_table, run_demo

    rows = run_demo(workdir, [t for t in tasks.split(",") if t], epochs=epochs, input_size=input_size,
                    progress=_progress(as_json))
    below = [row["task"] for row in rows if row["host_val_accuracy"] <= row["head_only_accuracy"]]
    _emit(rows, as_json, format_table(rows) + (f"\nKM is not above head-only on: {', '.join(below)}" if below else ""))


# --- serving ---------------------------------------------------------------------------------------
MAX_TOKEN_FILE_BYTES = 4096


def _read_token(path) -> bytes:
    try:
        with open(path, "rb") as handle:
            token = handle.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"--token-file {path}: cannot read ({exc.strerror or exc})") from None
    token = token.strip()
    if not token or len(token) > MAX_TOKEN_FILE_BYTES or b"\n" in token:
        raise ConfigError(f"--token-file {path}: must hold one non-empty line (the bearer token)")
    return token


@command(main, "serve")
@with_options(device_options)
@click.option("--packs", "packs_dir", type=click.Path(file_okay=False),
              help="Folder of task packs, polled for updates [KM_EDGE_PACKS, km-edge.toml [paths] packs, ./packs].")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: all).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option("--cache-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Tasks keeping a built session; others are rebuilt on their next request.")
@with_options(provider_options)
@click.option("--backend", type=click.Choice(["ort", "reference"]), default="ort", show_default=True)
@click.option("--threads", default=None, type=click.IntRange(1, 256), help="onnxruntime intra-op threads per session.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64), help="Inference threads.")
@click.option("--queue-size", default=16, show_default=True, type=click.IntRange(0, 4096),
              help="Requests that may wait for a worker; beyond it: 503 + Retry-After.")
@click.option("--token-file", type=click.Path(dir_okay=False),
              help="File with a bearer token required on every endpoint except /healthz.")
@state_option
@click.option("--poll-interval", default=2.0, show_default=True, type=click.FloatRange(min=0.05),
              help="Seconds between scans of the packs folder.")
@click.option("--keep-removed", is_flag=True, help="Keep serving a task whose pack file was removed.")
@click.option("--max-body-mb", default=20.0, show_default=True, type=click.FloatRange(min=0.001),
              help="Largest request body (MiB).")
@click.option("--max-images", default=32, show_default=True, type=click.IntRange(1, 1024),
              help="Images per request.")
@click.option("--max-pixels", default=25_000_000, show_default=True, type=click.IntRange(min=1),
              help="Pixels per image, checked from its header before decoding.")
@click.option("--shutdown-timeout", default=30, show_default=True, type=click.IntRange(min=1),
              help="Seconds requests in flight get to finish after SIGTERM.")
@click.option("--log-level", default=None, type=click.Choice(["debug", "info", "warning", "error"]),
              help="Log level of the server [info; km-edge -v: debug, -q: warning]; log lines carry timestamps.")
@click.option("--access-log", is_flag=True, help="Log every request.")
def serve_cmd(base_dir, pubkeys, packs_dir, host, port, cache_size, provider, trt_fp16, backend, threads, workers,
              queue_size, token_file, state_path, poll_interval, keep_removed, max_body_mb, max_images,
              max_pixels, shutdown_timeout, log_level, access_log, as_json):
    """Serve every task pack in a folder over HTTP; new pack versions are swapped in while serving."""
    try:
        import uvicorn  # noqa: F401 - only checked here; device_runtime.serve.server runs it

        from device_runtime.serve import server
        from device_runtime.serve.app import ServeOptions, build_app
        from device_runtime.serve.catalog import PackCatalog
    except ModuleNotFoundError as exc:
        raise ConfigError(f"'serve' needs {exc.name}: pip install 'km-edge[serve]'") from None

    level = logging.getLevelName(log_level.upper()) if log_level else logging.getLogger("km_edge").getEffectiveLevel()
    configure_logging(level, timestamps=True)  # a long-running server: its lines say when
    log_level = logging.getLevelName(level).lower()  # uvicorn's own loggers follow the same level
    packs = Path(packs_dir or os.environ.get("KM_EDGE_PACKS") or _settings().path("packs"))
    if not packs.is_dir():
        raise ConfigError(f"--packs {packs}: no such folder; create it or point --packs at your packs")
    token = _read_token(token_file) if token_file else None
    rollback = _rollback_state(state_path)
    # the catalog keeps its own session cache; the Runtime's holds only the latest build
    runtime = _runtime(base_dir, pubkeys, backend, threads, provider, trt_fp16, rollback=rollback, cache_size=1)
    options = ServeOptions(max_body_bytes=int(max_body_mb * 2**20), max_images=max_images, max_pixels=max_pixels,
                           workers=workers, queue_size=queue_size, token=token)
    catalog = PackCatalog(runtime, packs, cache_size=cache_size, unload_removed=not keep_removed)
    app = build_app(catalog, options, polling_interval_s=poll_interval)
    catalog.scan()
    try:
        sock = server.bind(host, port)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://{bound_host if ':' not in bound_host else f'[{bound_host}]'}:{bound_port}"
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without --token-file: anyone who reaches it can use it", host)
    ready = {"listening": url, "base_id": runtime.base.base_id, "state": str(rollback.path),
             "tasks": {s.task: s.version for s in catalog.served()},
             "refused": [r.describe() for r in catalog.refusals()]}
    tasks = ", ".join(f"{t} v{v}" for t, v in ready["tasks"].items()) or "none yet"
    click.echo(json.dumps(ready) if as_json else f"km-edge serve: listening on {url} (tasks: {tasks})")
    sys.stdout.flush()
    started = server.run(app, sock, log_level=log_level, access_log=access_log, shutdown_timeout_s=shutdown_timeout,
                         limit_concurrency=max(64, 4 * options.capacity))
    if not started:
        raise click.ClickException("server failed to start (see the log above)")
    log.info("stopped")
