"""Kernel Modulation (Hu & Liu, ICPR 2022): the one definition of the formula, in numpy.

For a conv weight ``W`` of shape ``(O, I/groups, kh, kw)`` a small MLP ``g`` (the modulator),
shared by all vectors of that layer, rewrites every kernel::

    W' = W * (1 + g(W / s))        s = per-layer RMS of the frozen W (stored in the pack)
    g(v) = act(v @ w1 + b1) @ w2 + b2          w2 and b2 start at zero

How ``W`` is cut into the vectors that ``g`` maps is the modulator *kind*:

* ``kernel``:  every ``(out, in)`` slice, length ``kh*kw``;
* ``channel``: every ``(out, y, x)`` input-channel vector, length ``I/groups``;
* ``auto``:    ``kernel`` where ``kh*kw > 1``, ``channel`` on 1x1 convs.

The torch parametrization in ``km_edge.adapters`` imports the layout helpers below and is tested
against :func:`modulate`. The same module holds the LoRA update so packs of that baseline can run
on the device too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import ShapeMismatchError

KINDS = ("kernel", "channel", "auto")
ACTIVATIONS = ("relu", "silu", "tanh", "gelu")

# channel view: (O, I, kh, kw) -> (O, kh, kw, I) so each row is one input-channel vector
CHANNEL_PERM = (0, 2, 3, 1)
CHANNEL_PERM_INVERSE = (0, 3, 1, 2)

# Names of a modulator's tensors, in the order the pack stores them.
MODULATOR_TENSORS = ("w1", "b1", "w2", "b2")
LORA_TENSORS = ("a", "b")


@dataclass(frozen=True)
class ModulatorSpec:
    """What a user chooses for KM: the kind, hidden sizes per resolved kind, activation."""

    kind: str = "auto"
    kernel_hidden: int = 8
    channel_hidden: int = 1
    activation: str = "gelu"  # defaults chosen by benchmarks/transfer.py (with BatchNorm trained)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"modulator kind must be one of {KINDS}, got {self.kind!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.kernel_hidden < 1 or self.channel_hidden < 1:
            raise ValueError(
                f"hidden sizes must be >= 1, got {self.kernel_hidden}, {self.channel_hidden}"
            )

    def resolve(self, weight_shape) -> tuple[str, int, int]:
        """(kind, vector length d, hidden size h) for one conv weight shape."""
        kind = resolve_kind(self.kind, weight_shape)
        hidden = self.kernel_hidden if kind == "kernel" else self.channel_hidden
        return kind, vector_length(kind, weight_shape), hidden

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_kind(kind: str, weight_shape) -> str:
    """``auto`` -> ``kernel`` for spatial kernels, ``channel`` for 1x1 convs."""
    if kind == "auto":
        _, _, kh, kw = weight_shape
        return "kernel" if kh * kw > 1 else "channel"
    if kind not in ("kernel", "channel"):
        raise ValueError(f"modulator kind must be one of {KINDS}, got {kind!r}")
    return kind


def vector_length(kind: str, weight_shape) -> int:
    _, in_per_group, kh, kw = weight_shape
    return kh * kw if kind == "kernel" else in_per_group


def modulator_shapes(d: int, h: int) -> dict[str, tuple[int, ...]]:
    return {"w1": (d, h), "b1": (h,), "w2": (h, d), "b2": (d,)}


def to_vectors(weight: np.ndarray, kind: str) -> np.ndarray:
    """Rows are the vectors ``g`` sees (a view where the layout allows)."""
    out_ch, in_per_group, kh, kw = weight.shape
    if kind == "kernel":
        return weight.reshape(out_ch * in_per_group, kh * kw)
    return weight.transpose(CHANNEL_PERM).reshape(out_ch * kh * kw, in_per_group)


def from_vectors(vectors: np.ndarray, kind: str, weight_shape) -> np.ndarray:
    out_ch, in_per_group, kh, kw = weight_shape
    if kind == "kernel":
        return vectors.reshape(weight_shape)
    return vectors.reshape(out_ch, kh, kw, in_per_group).transpose(CHANNEL_PERM_INVERSE)


def kernel_scale(weight: np.ndarray) -> float:
    """RMS of a frozen weight; normalises the modulator's input so one init fits every layer."""
    return float(np.sqrt(np.mean(np.square(weight, dtype=np.float64))) + 1e-12)


def activate(x: np.ndarray, activation: str) -> np.ndarray:
    if activation == "relu":
        return np.maximum(x, 0.0, out=x)
    if activation == "silu":
        return x / (1.0 + np.exp(-x))
    if activation == "tanh":
        return np.tanh(x)
    if activation == "gelu":  # tanh approximation, as torch's gelu(approximate="tanh")
        return 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608028654) * (x + 0.044715 * x**3)))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def modulate(
    weight: np.ndarray,
    tensors: dict[str, np.ndarray],
    kind: str,
    activation: str,
    scale: float,
) -> np.ndarray:
    """The modulated kernel ``W * (1 + g(W / s))`` for one layer, float32, in one batched matmul."""
    weight = np.asarray(weight, dtype=np.float32)
    kind = resolve_kind(kind, weight.shape)
    d = vector_length(kind, weight.shape)
    w1, b1, w2, b2 = (np.asarray(tensors[n], dtype=np.float32) for n in MODULATOR_TENSORS)
    h = w1.shape[1] if w1.ndim == 2 else -1
    expected = modulator_shapes(d, h)
    for name, array in zip(MODULATOR_TENSORS, (w1, b1, w2, b2)):
        if array.shape != expected[name]:
            raise ShapeMismatchError(
                f"modulator tensor {name} has shape {array.shape}, expected {expected[name]} "
                f"for a {kind} modulator on a weight of shape {weight.shape}"
            )
    vectors = to_vectors(weight, kind)
    hidden = activate(vectors @ (w1 / np.float32(scale)) + b1, activation)
    gain = hidden @ w2 + b2
    gain += np.float32(1.0)
    return from_vectors(vectors * gain, kind, weight.shape)


def lora_update(weight: np.ndarray, tensors: dict[str, np.ndarray], scale: float) -> np.ndarray:
    """The LoRA baseline on a conv: ``W + scale * (b @ a)`` with a: (r, I*kh*kw), b: (O, r)."""
    weight = np.asarray(weight, dtype=np.float32)
    a = np.asarray(tensors["a"], dtype=np.float32)
    b = np.asarray(tensors["b"], dtype=np.float32)
    out_ch = weight.shape[0]
    fan_in = int(np.prod(weight.shape[1:]))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != fan_in or b.shape[0] != out_ch or a.shape[0] != b.shape[1]:
        raise ShapeMismatchError(
            f"LoRA tensors a{a.shape} b{b.shape} do not fit a weight of shape {weight.shape}"
        )
    return weight + np.float32(scale) * (b @ a).reshape(weight.shape)


def rebuild_kernels(
    base_kernels: dict[str, np.ndarray], layers: list
) -> dict[str, np.ndarray]:
    """Adapted kernels for every adapted layer of a model.

    ``layers`` are the pack's ``Layer`` records (``name``, ``adapter``: "km" | "lora", ``kind``,
    ``activation``, ``scale``, ``tensors``). Layers the pack does not adapt are not returned
    (the base keeps its own copy).
    """
    rebuilt = {}
    for layer in layers:
        name = layer.name
        if name not in base_kernels:
            raise ShapeMismatchError(f"pack adapts layer {name!r}, which the base does not have")
        weight = base_kernels[name]
        if layer.adapter == "km":
            rebuilt[name] = modulate(weight, layer.tensors, layer.kind, layer.activation, layer.scale)
        elif layer.adapter == "lora":
            rebuilt[name] = lora_update(weight, layer.tensors, layer.scale)
        else:
            raise ShapeMismatchError(f"layer {name!r} has unknown adapter {layer.adapter!r}")
    return rebuilt
