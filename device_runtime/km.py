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
against :func:`modulate`, the definition. The device rebuilds with :func:`modulate_fast` (through
:func:`rebuild_kernels`): the same numbers within float32 rounding, computed near the memory floor
by a compiled kernel where the install built one (device_runtime.native), else by numpy
(tests/test_fast_rebuild.py and tests/test_native_rebuild.py hold them to the definition). The
same module holds the LoRA update so packs of that baseline can run on the device too.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from . import native
from .errors import ShapeMismatchError

if TYPE_CHECKING:  # the record imports this module (pack -> km), never the other way at run time
    from .pack.records import Layer

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


@dataclass(frozen=True)
class VectorLayout:
    """How one conv weight ``(O, I/groups, kh, kw)`` is cut into the rows ``g`` maps, and put back.

    ``rows = W.transpose(perm).reshape(rows_shape)`` and ``W = rows.reshape(permuted_shape)
    .transpose(inverse)``, where ``perm is None`` means a plain reshape. Shapes and permutations only,
    so the numpy rebuild here and the torch parametrization (km_edge.adapters) cut weights alike.
    """

    perm: tuple[int, ...] | None
    inverse: tuple[int, ...] | None
    rows_shape: tuple[int, int]
    permuted_shape: tuple[int, ...]


@lru_cache(maxsize=4096)  # called per layer on every pack load: a lookup, not a computation
def _vector_layout(kind: str, weight_shape: tuple[int, ...]) -> VectorLayout:
    if kind not in ("kernel", "channel"):
        raise ValueError(f"vector layout needs a resolved kind (kernel or channel), got {kind!r}")
    weight_shape = tuple(int(n) for n in weight_shape)
    d = vector_length(kind, weight_shape)
    rows = (int(np.prod(weight_shape, dtype=np.int64)) // d if d else 0, d)
    if kind == "kernel":
        return VectorLayout(None, None, rows, weight_shape)
    permuted = tuple(weight_shape[axis] for axis in CHANNEL_PERM)
    return VectorLayout(CHANNEL_PERM, CHANNEL_PERM_INVERSE, rows, permuted)


def vector_layout(kind: str, weight_shape) -> VectorLayout:
    """The layout of a resolved kind (``kernel`` or ``channel``; see :func:`resolve_kind`)."""
    return _vector_layout(kind, tuple(weight_shape))


def modulator_shapes(d: int, h: int) -> dict[str, tuple[int, ...]]:
    return {"w1": (d, h), "b1": (h,), "w2": (h, d), "b2": (d,)}


def to_vectors(weight: np.ndarray, kind: str) -> np.ndarray:
    """Rows are the vectors ``g`` sees (a view where the layout allows)."""
    layout = vector_layout(kind, weight.shape)
    return (weight if layout.perm is None else weight.transpose(layout.perm)).reshape(layout.rows_shape)


def from_vectors(vectors: np.ndarray, kind: str, weight_shape) -> np.ndarray:
    layout = vector_layout(kind, weight_shape)
    vectors = vectors.reshape(layout.permuted_shape)
    return vectors if layout.inverse is None else vectors.transpose(layout.inverse)


def kernel_scale(weight: np.ndarray) -> float:
    """RMS of a frozen weight; normalises the modulator's input so one init fits every layer."""
    return float(np.sqrt(np.mean(np.square(weight, dtype=np.float64))) + 1e-12)


GELU_SQRT_2_OVER_PI = 0.7978845608028654  # tanh-GELU: 0.5 x (1 + tanh(C (x + A x^3)))
GELU_CUBIC = 0.044715
_GELU_C = np.float32(GELU_SQRT_2_OVER_PI)
_GELU_A = np.float32(GELU_CUBIC)


def activate(x: np.ndarray, activation: str) -> np.ndarray:
    if activation == "relu":
        return np.maximum(x, 0.0, out=x)
    if activation == "silu":
        return x / (1.0 + np.exp(-x))
    if activation == "tanh":
        return np.tanh(x)
    if activation == "gelu":  # tanh approximation, as torch's gelu(approximate="tanh")
        # x * x * x, not x ** 3: numpy's float32 power is ~50x slower than two multiplies
        return 0.5 * x * (1.0 + np.tanh(_GELU_C * (x + _GELU_A * (x * x * x))))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _modulator_arrays(weight_shape, tensors, kind: str):
    """(kind, w1, b1, w2, b2) as float32, after checking their shapes against the weight."""
    kind = resolve_kind(kind, weight_shape)
    d = vector_length(kind, weight_shape)
    arrays = [np.asarray(tensors[n], dtype=np.float32) for n in MODULATOR_TENSORS]
    h = arrays[0].shape[1] if arrays[0].ndim == 2 else -1
    if [a.shape for a in arrays] != [(d, h), (h,), (h, d), (d,)]:
        expected = modulator_shapes(d, h)
        name, array = next((n, a) for n, a in zip(MODULATOR_TENSORS, arrays) if a.shape != expected[n])
        raise ShapeMismatchError(
            f"modulator tensor {name} has shape {array.shape}, expected {expected[name]} "
            f"for a {kind} modulator on a weight of shape {tuple(weight_shape)}"
        )
    return (kind, *arrays)


def modulate(
    weight: np.ndarray,
    tensors: dict[str, np.ndarray],
    kind: str,
    activation: str,
    scale: float,
) -> np.ndarray:
    """The modulated kernel ``W * (1 + g(W / s))`` for one layer, float32, in one batched matmul.

    This is the definition; :func:`modulate_fast` computes the same numbers faster and is tested
    against it.
    """
    weight = np.asarray(weight, dtype=np.float32)
    kind, w1, b1, w2, b2 = _modulator_arrays(weight.shape, tensors, kind)
    vectors = to_vectors(weight, kind)
    hidden = activate(vectors @ (w1 / np.float32(scale)) + b1, activation)
    gain = hidden @ w2 + b2
    gain += np.float32(1.0)
    return from_vectors(vectors * gain, kind, weight.shape)


# --- the fast rebuild ---------------------------------------------------------------------------
# The rebuild's floor is memory traffic: read W once, write W' once. modulate() makes about ten
# full-size temporaries per layer. The compiled kernel (_kmnative.c via device_runtime.native)
# fuses every step per row; without it, the numpy path walks the rows in blocks whose working set
# stays in L2, computes every step in place in float32, folds 1/s into w1 and +1 into b2, and
# turns the one-hidden-unit case (the default 1x1 channel modulator) into a broadcast multiply
# instead of an outer product through matmul.
BLOCK_BYTES = 768 * 1024  # working set per block (rows in and out, hidden, scratch): inside L2
_MIN_BLOCK_ROWS = 64


_GELU_CA = np.float32(GELU_SQRT_2_OVER_PI * GELU_CUBIC)
# what _activate_inplace leaves is act(x) times this (folded into w2 by the caller)
_ACTIVATION_GAIN = {"relu": 1.0, "silu": 1.0, "tanh": 1.0, "gelu": 2.0}
_NEEDS_SCRATCH = ("silu", "gelu")


def _activate_inplace(x: np.ndarray, activation: str, tmp: np.ndarray | None) -> None:
    """``x = act(x) * _ACTIVATION_GAIN[activation]`` in place; ``tmp``: scratch of x's shape
    (silu and gelu)."""
    if activation == "relu":
        np.maximum(x, 0.0, out=x)
    elif activation == "silu":
        np.negative(x, out=tmp)
        np.exp(tmp, out=tmp)
        tmp += np.float32(1.0)
        np.divide(x, tmp, out=x)
    elif activation == "tanh":
        np.tanh(x, out=x)
    elif activation == "gelu":  # 2 * gelu(x) = x * (1 + tanh(x * (C + C*A*x^2))); caller halves w2
        np.multiply(x, x, out=tmp)
        tmp *= _GELU_CA
        tmp += _GELU_C
        tmp *= x
        np.tanh(tmp, out=tmp)
        tmp += np.float32(1.0)
        x *= tmp
    else:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def modulate_fast(
    weight: np.ndarray,
    tensors: dict[str, np.ndarray],
    kind: str,
    activation: str,
    scale: float,
    out: np.ndarray | None = None,
    use_native: bool | None = None,
) -> np.ndarray:
    """:func:`modulate`, fused (within ~1e-6 of it); writes into ``out`` if given (float32,
    C-contiguous, the weight's shape).

    The compiled kernel (device_runtime.native) computes it where the install built it, else numpy
    in L2-sized blocks; ``use_native``: None (the kernel where available), False (numpy), True
    (the kernel, or RuntimeError saying why it is absent).
    """
    weight = np.asarray(weight, dtype=np.float32)
    kind, w1, b1, w2, b2 = _modulator_arrays(weight.shape, tensors, kind)
    if out is None:
        out = np.empty(weight.shape, dtype=np.float32)
    elif out.shape != weight.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 of shape {weight.shape}")
    rows = to_vectors(weight, kind)
    # channel vectors of a spatial kernel are not rows of the output layout: build them apart
    direct = kind == "kernel" or weight.shape[2] * weight.shape[3] == 1
    result = out.reshape(rows.shape) if direct else np.empty(rows.shape, dtype=np.float32)
    n, d = rows.shape
    h = w1.shape[1]
    if n == 0:
        return out
    # g(v) + 1 = act(v @ (w1 / s) + b1) * gain @ (w2 / gain) + (b2 + 1), where gain is what
    # _activate_inplace leaves (2 for gelu: one multiply fewer per hidden unit)
    w1_scaled = np.multiply(w1, 1.0 / float(scale), dtype=np.float32)
    w2_scaled = np.multiply(w2, 1.0 / _ACTIVATION_GAIN[activation], dtype=np.float32)
    b2_plus_one = np.add(b2, 1.0, dtype=np.float32)
    if use_native is None:
        use_native = native.available()
    elif use_native and not native.available():
        raise RuntimeError(f"the compiled rebuild kernel is not in use: {native.REASON}")
    if use_native:
        source = rows if rows.flags.c_contiguous else np.ascontiguousarray(rows)
        if native.modulate_rows(source, result, w1_scaled, b1, w2_scaled, b2_plus_one, activation):
            if not direct:
                out[...] = from_vectors(result, kind, weight.shape)
            return out
    # numpy: augmented hidden [act(v @ w1 / s + b1), 1] so one matmul gives the whole gain:
    # [a, 1] @ [[w2 / activation gain], [b2 + 1]] = g(v) + 1. Few numpy calls per layer (their
    # overhead is most of the cost on small layers), none that broadcasts over a large block.
    first = np.zeros((d + 1, h + 1), dtype=np.float32)  # [[w1 / s, 0], [b1, 0]]
    first[:d, :h] = w1_scaled
    first[d, :h] = b1
    second = np.empty((h + 1, d), dtype=np.float32)  # [[w2 / gain], [b2 + 1]]
    second[:h] = w2_scaled
    second[h] = b2_plus_one
    w1_aug, b1_aug = first[:d], first[d]
    block = min(n, max(_MIN_BLOCK_ROWS, BLOCK_BYTES // (4 * (2 * d + 2 * (h + 1)))))
    if block < n:  # several blocks: add b1 as a tiled block (a row-broadcast add is slow)
        b1_add = np.empty((block, h + 1), dtype=np.float32)
        b1_add[0] = b1_aug
        filled = 1
        while filled < block:  # doubling copies
            step = min(filled, block - filled)
            b1_add[filled:filled + step] = b1_add[:step]
            filled += step
    else:
        b1_add = b1_aug
    hidden_buf = np.empty((block, h + 1), dtype=np.float32)
    scratch_buf = np.empty((block, h + 1), dtype=np.float32) if activation in _NEEDS_SCRATCH else None
    for start in range(0, n, block):
        stop = min(start + block, n)
        rows_in, rows_out = rows[start:stop], result[start:stop]
        m = stop - start
        hidden = hidden_buf[:m]
        np.dot(rows_in, w1_aug, out=hidden)  # np.dot: far less call overhead than np.matmul
        hidden += b1_add if block == n else b1_add[:m]
        _activate_inplace(hidden, activation, None if scratch_buf is None else scratch_buf[:m])
        hidden[:, h] = 1.0
        np.dot(hidden, second, out=rows_out)
        rows_out *= rows_in
    if not direct:
        out[...] = from_vectors(result, kind, weight.shape)
    return out


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


def _rebuild_one(weight: np.ndarray, layer: Layer, out: np.ndarray | None) -> np.ndarray:
    if layer.adapter == "km":
        return modulate_fast(weight, layer.tensors, layer.kind, layer.activation,
                             layer.scale, out=out)
    if layer.adapter == "lora":
        updated = lora_update(weight, layer.tensors, layer.scale)
        if out is None:
            return updated
        out[...] = updated
        return out
    raise ShapeMismatchError(f"layer {layer.name!r} has unknown adapter {layer.adapter!r}")


def rebuild_size(base_kernels: dict[str, np.ndarray], layers: list[Layer]) -> int:
    """Float32 elements :func:`rebuild_kernels` writes for ``layers`` (the size of its buffer)."""
    return sum(math.prod(np.shape(base_kernels[layer.name]))
               for layer in layers if layer.name in base_kernels)


def _rebuild_native(base_kernels, layers, shapes, offsets, arena, threads) -> list[bool | None]:
    """Rebuild in one compiled call every KM layer whose rows are the output's layout. Per layer:
    None (not done: without the kernel numpy does them all, and any layer the kernel leaves out,
    where modulate_fast names what does not fit), else whether its output is finite. Lean on
    purpose: on a small base the per-layer Python here was as long as the arithmetic."""
    if not native.available():
        return [None] * len(layers)
    jobs, picked = [], []
    for i, (layer, shape, offset) in enumerate(zip(layers, shapes, offsets)):
        activation = layer.activation
        if layer.adapter != "km" or activation not in _ACTIVATION_GAIN:
            continue
        kind = layer.kind  # resolved: a record's kind is kernel or channel
        if kind not in ("kernel", "channel") or (kind == "channel" and shape[2] * shape[3] != 1):
            continue  # channel vectors of a spatial kernel: modulate_fast transposes them
        d = vector_length(kind, shape)
        tensors = layer.tensors
        # a plain tuple in native.Job's field order (a named tuple costs a microsecond a layer)
        jobs.append((base_kernels[layer.name], d, offset, tensors["w1"], tensors["b1"],
                     tensors["w2"], tensors["b2"], activation, layer.scale, _ACTIVATION_GAIN[activation]))
        picked.append(i)
    done: list[bool | None] = [None] * len(layers)
    for i, finite in zip(picked, native.modulate_layers(jobs, arena, threads)):
        done[i] = finite
    return done


def rebuild_kernels(
    base_kernels: dict[str, np.ndarray], layers: list[Layer], threads: int | None = None,
    buffer: np.ndarray | None = None, finite: dict[str, bool] | None = None,
    offsets: list[int] | None = None,
) -> dict[str, np.ndarray]:
    """Adapted kernels for every adapted layer of a model.

    ``layers`` are the pack's ``Layer`` records (device_runtime.pack.records: validated, so a
    layer's kind is resolved and its tensors fit each other). Layers the pack does not adapt are
    not returned (the base keeps its own copy). All kernels are views into one float32 buffer: ``buffer`` (at
    least :func:`rebuild_size` elements; a warm reused buffer saves the page faults of a fresh
    one) or a new array, so a pack's kernels are allocated and freed as one block.
    ``offsets`` (with ``buffer``): where each layer's kernel starts in ``buffer``, in elements, when
    the kernels must land at given places (the runtime's RAM copy of base.weights) instead of one
    after another; they may not overlap.
    ``threads > 1`` rebuilds layers in parallel (numpy and the compiled kernel release the GIL).
    ``finite``, if given, receives ``{layer name: whether its kernel is finite}`` for the layers the
    compiled kernel rebuilt (it checks each value as it writes it); the others are not in it.
    """
    shapes = []
    for layer in layers:
        name = layer.name
        if name not in base_kernels:
            raise ShapeMismatchError(f"pack adapts layer {name!r}, which the base does not have")
        if layer.adapter not in ("km", "lora"):
            raise ShapeMismatchError(f"layer {name!r} has unknown adapter {layer.adapter!r}")
        shapes.append(tuple(np.shape(base_kernels[name])))
    sizes = [math.prod(shape) for shape in shapes]
    if offsets is None:
        offsets = list(itertools.accumulate(sizes, initial=0))[:-1]
    elif buffer is None or len(offsets) != len(layers):
        raise ValueError("offsets need a buffer and one offset per layer")
    else:
        spans = sorted(zip(offsets, sizes))
        if (spans and spans[0][0] < 0) or any(
                offset + size > following for (offset, size), (following, _) in zip(spans, spans[1:])):
            raise ValueError("offsets must be non-negative and the kernels may not overlap")
    end = max((offset + size for offset, size in zip(offsets, sizes)), default=0)
    if buffer is None:
        arena = np.empty(end, dtype=np.float32)
    elif buffer.dtype != np.float32 or buffer.ndim != 1 or buffer.size < end:
        raise ValueError(f"buffer must be 1-D float32 with at least {end} elements")
    else:
        arena = buffer
    outs = [arena[offset:offset + size].reshape(shape)
            for offset, size, shape in zip(offsets, sizes, shapes)]
    done = _rebuild_native(base_kernels, layers, shapes, offsets, arena, threads)
    if finite is not None:  # what the compiled kernel checked as it wrote (a pass saved)
        finite.update((layer.name, ok) for layer, ok in zip(layers, done) if ok is not None)
    # numpy, one call per layer: batching small layers of the same (d, h) into one padded group
    # was measured slower (6-25 % on the registry bases) than modulate_fast's few calls per layer
    tasks = [(size, lambda job=(base_kernels[layer.name], layer, out): _rebuild_one(*job))
             for layer, out, size, did in zip(layers, outs, sizes, done) if did is None]
    if threads and threads > 1 and len(tasks) > 1:
        from concurrent.futures import ThreadPoolExecutor

        # largest first, so the pool's threads finish together
        tasks.sort(key=lambda task: -task[0])
        with ThreadPoolExecutor(max_workers=int(threads)) as pool:
            list(pool.map(lambda task: task[1](), tasks))
    else:
        for _, task in tasks:
            task()
    return {layer.name: out for layer, out in zip(layers, outs)}
