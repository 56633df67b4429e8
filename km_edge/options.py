"""The schema of every setting a user can give in km-edge.toml or on the command line.

One table says each setting's type, range or choices and default; ``km-edge.toml`` is validated
against it (unknown keys and wrong types are errors naming the file, table and key) and the CLI
builds its click options from it, so a flag and its TOML key can never disagree. Torch-free: the
CLI imports it at start-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from device_runtime.errors import ConfigError
from device_runtime.km import ACTIVATIONS, KINDS, ModulatorSpec
from device_runtime.pack.limits import MAX_HIDDEN

METHODS = ("km", "head", "bn", "bias", "lora", "full")
KM_DEFAULTS = ModulatorSpec()  # the KM defaults are the modulator spec's own (device_runtime.km)
DEVICES = ("cpu", "cuda", "mps", "auto")


@dataclass(frozen=True)
class Setting:
    """One setting: type, bounds (inclusive) or choices, default, and a line of help."""

    kind: type
    default: object = None
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None
    help: str = ""

    def check(self, value, where: str):
        """``value`` if it fits, else a ConfigError that names ``where`` and what fits."""
        if self.kind is bool:
            ok = isinstance(value, bool)
        elif self.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ConfigError(f"{where} must be {self.describe()}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{where} must be {self.describe()}, got {value!r}")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise ConfigError(f"{where} must be {self.describe()}, got {value!r}")
        return value

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        name = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}[self.kind]
        if self.low is not None and self.high is not None:
            return f"{name} from {self.low:g} to {self.high:g}"
        if self.low is not None:
            return f"{name} >= {self.low:g}"
        return name

    def click_type(self):
        import click

        if self.choices is not None:
            return click.Choice([str(c) for c in self.choices])
        if self.kind is int:
            return click.IntRange(min=self.low, max=self.high)
        if self.kind is float:
            return _FiniteFloatRange(min=self.low, max=self.high)
        return str


def _FiniteFloatRange(**bounds):
    """click's FloatRange lets nan and inf through (they compare False); a setting never does."""
    import click

    class FiniteFloatRange(click.FloatRange):
        def convert(self, value, param, ctx):
            number = super().convert(value, param, ctx)
            if not math.isfinite(number):
                self.fail(f"{value!r} is not a finite number.", param, ctx)
            return number

    return FiniteFloatRange(**bounds)


# Training settings: [train] and [tasks.NAME] tables, and the flags of `train` / `pack`.
# A default of None means "decided by the method" (see km_edge.methods).
TRAIN = {
    "method": Setting(str, "km", choices=METHODS, help="Adaptation method (km, or a baseline)."),
    "epochs": Setting(int, 10, 1, 10_000, help="Passes over the training images."),
    "max_steps": Setting(int, None, 1, 10_000_000,
                         help="Train exactly this many optimiser steps (overrides --epochs: fewer or more passes)."),
    "batch_size": Setting(int, 32, 1, 4096),
    "lr": Setting(float, None, 1e-8, 10.0, help="Learning rate of the adapters [per-method default]."),
    "head_lr": Setting(float, None, 1e-8, 10.0, help="Learning rate of the head [per-method default]."),
    "weight_decay": Setting(float, 1e-4, 0.0, 1.0),
    "device": Setting(str, "auto", choices=DEVICES),
    "seed": Setting(int, 0, 0, 2**32 - 1),
    "workers": Setting(int, 0, 0, 64, help="DataLoader worker processes."),
    "modulator": Setting(str, KM_DEFAULTS.kind, choices=KINDS, help="How KM cuts each kernel into vectors."),
    "kernel_hidden": Setting(int, KM_DEFAULTS.kernel_hidden, 1, MAX_HIDDEN,
                             help="Hidden units of modulators on spatial kernels."),
    "channel_hidden": Setting(int, KM_DEFAULTS.channel_hidden, 1, MAX_HIDDEN,
                              help="Hidden units of modulators on 1x1 convs."),
    "activation": Setting(str, KM_DEFAULTS.activation, choices=ACTIVATIONS),
    "train_bn": Setting(bool, None, help="BatchNorm affine + statistics become task tensors."),
    "lora_rank": Setting(int, 2, 1, 1024),
    "init": Setting(str, None, help="Meta-init file (km-edge meta-train) the KM modulators start from."),
}
TRAIN_DEFAULTS = {name: setting.default for name, setting in TRAIN.items()}

# `km-edge meta-train`: the episodes and the Reptile loop (km_edge.meta). The KM spec, seed and
# device come from TRAIN, so a meta-init always fits the modulators `train` attaches.
META = {
    "ways": Setting(int, 5, 2, 1000, help="Classes per episode (N-way)."),
    "shots": Setting(int, 5, 1, 1000, help="Support images per class (K-shot)."),
    "queries": Setting(int, 5, 1, 1000, help="Query images per class (reported accuracy after adapting)."),
    "episodes": Setting(int, 1000, 1, 10_000_000, help="Meta-training episodes (outer steps)."),
    "inner_steps": Setting(int, 10, 1, 10_000, help="Adaptation steps on each episode's support set."),
    "meta_lr": Setting(float, 1.0, 1e-6, 1.0, help="Reptile outer step size, annealed linearly to 0."),
}

# [base]: which frozen network. `arch` and `weights` are checked by the model registry.
BASE = {
    "arch": Setting(str),
    "weights": Setting(str),
    "input_size": Setting(int, None, 16, 4096),
    "width": Setting(float, None, 0.05, 4.0),
}

# [paths]: folders relative to km-edge.toml.
PATHS = {name: Setting(str, name) for name in ("data", "base", "packs", "checkpoints", "keys")}
PATH_DEFAULTS = {name: setting.default for name, setting in PATHS.items()}

# [tasks.NAME]: where the task's images are, and any training setting for this task alone.
TASK = {"data": Setting(str), **TRAIN}


def check_table(table, schema: dict[str, Setting], where: str) -> dict:
    """A TOML table checked against ``schema``: every key known, every value of its type."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table, got {table!r}")
    unknown = sorted(set(table) - set(schema))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(schema)}")
    return {key: schema[key].check(value, f"{where}.{key}") for key, value in table.items()}
