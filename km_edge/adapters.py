"""Task adapters as ``torch.nn.utils.parametrize`` parametrizations on conv weights.

Registering an adapter leaves every layer's class and call signature untouched: the conv simply
sees ``adapter(W)`` as its weight. KM follows ``device_runtime.km`` (the one definition of the
formula and of the vector layouts); the parity tests hold the two sides together.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from device_runtime import km as km_math
from device_runtime.pack import Layer


def _activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(x)
    if activation == "silu":
        return nn.functional.silu(x)
    if activation == "tanh":
        return torch.tanh(x)
    if activation == "gelu":
        return nn.functional.gelu(x, approximate="tanh")
    raise ValueError(f"activation must be one of {km_math.ACTIVATIONS}, got {activation!r}")


class KernelModulator(nn.Module):
    """``W -> W * (1 + g(W / s))`` with ``g`` a per-layer MLP whose last layer starts at zero."""

    def __init__(self, weight: torch.Tensor, spec: km_math.ModulatorSpec):
        super().__init__()
        self.weight_shape = tuple(weight.shape)
        self.kind, d, h = spec.resolve(self.weight_shape)
        self.layout = km_math.vector_layout(self.kind, self.weight_shape)
        self.activation = spec.activation
        self.register_buffer("scale", torch.tensor(km_math.kernel_scale(weight.detach().cpu().numpy())))
        shapes = km_math.modulator_shapes(d, h)
        # w1 sees inputs of unit RMS, so N(0, 1/d) gives unit-variance hidden units.
        self.w1 = nn.Parameter(torch.randn(shapes["w1"]) / math.sqrt(d))
        self.b1 = nn.Parameter(torch.zeros(shapes["b1"]))
        self.w2 = nn.Parameter(torch.zeros(shapes["w2"]))
        self.b2 = nn.Parameter(torch.zeros(shapes["b2"]))

    def _to_vectors(self, weight: torch.Tensor) -> torch.Tensor:
        """``device_runtime.km.to_vectors`` in torch (the same layout record)."""
        perm = self.layout.perm
        return (weight if perm is None else weight.permute(perm)).reshape(self.layout.rows_shape)

    def _from_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """``device_runtime.km.from_vectors`` in torch."""
        vectors = vectors.reshape(self.layout.permuted_shape)
        return vectors if self.layout.inverse is None else vectors.permute(self.layout.inverse)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        vectors = self._to_vectors(weight)
        hidden = _activate(vectors @ (self.w1 / self.scale) + self.b1, self.activation)
        gain = hidden @ self.w2 + self.b2
        return self._from_vectors(vectors * (1.0 + gain))

    def pack_entry(self, name: str) -> Layer:
        """This layer as the pack's layer record (validated; see packs/README.md)."""
        return Layer(
            name=name,
            adapter="km",
            kind=self.kind,
            activation=self.activation,
            scale=float(self.scale),
            tensors={n: getattr(self, n).detach().cpu().numpy() for n in km_math.MODULATOR_TENSORS},
        )


class ConvLoRA(nn.Module):
    """The LoRA baseline on a conv: ``W + (alpha / r) * (b @ a)``, ``b`` starting at zero."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float | None = None):
        super().__init__()
        out_ch = weight.shape[0]
        fan_in = int(np.prod(weight.shape[1:]))
        self.weight_shape = tuple(weight.shape)
        rank = max(1, min(rank, out_ch, fan_in))
        self.scaling = float(alpha if alpha is not None else rank) / rank
        # a's scale tracks the frozen W so one learning rate fits every layer
        std = float(weight.detach().std()) if weight.numel() > 1 else 1.0
        self.a = nn.Parameter(torch.randn(rank, fan_in) * std)
        self.b = nn.Parameter(torch.zeros(out_ch, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scaling * (self.b @ self.a).reshape(self.weight_shape)

    def pack_entry(self, name: str) -> Layer:
        """This layer as the pack's layer record (validated; see packs/README.md)."""
        return Layer(
            name=name,
            adapter="lora",
            kind="",
            activation="",
            scale=self.scaling,
            tensors={"a": self.a.detach().cpu().numpy(), "b": self.b.detach().cpu().numpy()},
        )


def conv_layers(backbone: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Every Conv2d of a backbone (grouped and depthwise included), in module order."""
    return [(name, m) for name, m in backbone.named_modules() if isinstance(m, nn.Conv2d)]


def attach_km(backbone: nn.Module, spec: km_math.ModulatorSpec) -> dict[str, KernelModulator]:
    """Register a KernelModulator on every conv weight; returns them by layer name."""
    modulators = {}
    for name, conv in conv_layers(backbone):
        modulator = KernelModulator(conv.weight, spec)
        parametrize.register_parametrization(conv, "weight", modulator, unsafe=False)
        modulators[name] = modulator
    return modulators


def attach_lora(backbone: nn.Module, rank: int, alpha: float | None = None) -> dict[str, ConvLoRA]:
    adapters = {}
    for name, conv in conv_layers(backbone):
        adapter = ConvLoRA(conv.weight, rank, alpha)
        parametrize.register_parametrization(conv, "weight", adapter)
        adapters[name] = adapter
    return adapters


def adapters_of(backbone: nn.Module) -> dict[str, nn.Module]:
    """The adapter registered on each parametrized conv, by layer name."""
    found = {}
    for name, conv in conv_layers(backbone):
        if parametrize.is_parametrized(conv, "weight"):
            found[name] = conv.parametrizations.weight[0]
    return found


def frozen_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The base kernel under any parametrization."""
    if parametrize.is_parametrized(conv, "weight"):
        return conv.parametrizations.weight.original
    return conv.weight
