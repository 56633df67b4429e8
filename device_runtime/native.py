"""The compiled rebuild kernel (``_kmnative.c``), loaded with ctypes when the install built it.

Why: numpy computes the modulators of a big layer as two tiny-K matmuls and a seven-pass GELU over
temporaries, several times the memory floor on resnet18 (issue 9). The C kernel keeps each row's
hidden units in registers. It is a plain shared library, not a Python extension, so the same file
works under any CPython and is cross-compiled for arm64 without Python headers
(tools/arm64/setup.sh). ``pip install`` builds it where a C compiler exists (setup.py; optional, so
an install without one still works), and ``km.modulate_fast`` falls back to numpy without it.
``KM_EDGE_NATIVE=0`` turns it off (to compare, or to rule it out). ctypes releases the GIL for the
call, so ``threads > 1`` rebuilds layers in parallel here too.
"""

from __future__ import annotations

import array
import ctypes
import os
import weakref
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import NamedTuple

import numpy as np

ENV = "KM_EDGE_NATIVE"  # "0": use numpy even where the kernel is built
ABI_VERSION = 3  # KM_ABI_VERSION in _kmnative.c: a kernel of another version is not used
ACTIVATION_CODES = {"relu": 0, "silu": 1, "tanh": 2, "gelu": 3}  # the enum in _kmnative.c
LIBRARY_STEM = "_kmnative"  # setup.py's extension name, device_runtime._kmnative


def _library_path() -> Path | None:
    """The built kernel next to this module: any extension suffix of this interpreter, or plain .so."""
    here = Path(__file__).resolve().parent
    for suffix in [*EXTENSION_SUFFIXES, ".so"]:
        candidate = here / f"{LIBRARY_STEM}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _load():
    """((rows function, layers function), path, None), or (None, path or None, why not)."""
    if os.environ.get(ENV, "1").strip() == "0":
        return None, None, f"turned off by {ENV}=0"
    path = _library_path()
    if path is None:
        return None, None, ("not built: this install had no C compiler (reinstall km-edge where `cc` "
                            "exists to build it); the numpy rebuild is used")
    try:
        lib = ctypes.CDLL(str(path))
        version = lib.km_abi_version()
    except (OSError, AttributeError) as exc:  # wrong architecture, truncated, not ours
        return None, path, f"{path.name} does not load ({exc}); the numpy rebuild is used"
    if version != ABI_VERSION:
        return None, path, f"{path.name} has ABI {version}, expected {ABI_VERSION}; the numpy rebuild is used"
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    rows, layers = lib.km_modulate_rows, lib.km_modulate_layers
    rows.argtypes = [pointer, pointer, i64, i64, i64, pointer, pointer, pointer, pointer, pointer,
                     ctypes.c_int]
    layers.argtypes = [i64, pointer, pointer, pointer, pointer]
    rows.restype = layers.restype = ctypes.c_int
    return (rows, layers), path, None


_FNS, PATH, REASON = _load()
_FN, _LAYERS_FN = _FNS if _FNS else (None, None)


def available() -> bool:
    return _FN is not None


def engine() -> str:
    """What rebuilds kernels in this process: ``native`` or ``numpy`` (reported by ``km-edge bench``)."""
    return "native" if available() else "numpy"


F32 = np.dtype(np.float32)


def is_f32(array: np.ndarray) -> bool:
    """Native float32 (``is`` first: a dtype comparison costs a microsecond, per tensor per layer)."""
    return array.dtype is F32 or array.dtype == F32


_ADDRESSES: dict[int, tuple] = {}  # id(view) -> (weak reference, data address)


def _address(array: np.ndarray) -> int:
    """``array.ctypes.data`` (1.5 us a call), remembered for views (a base's kernels): a view cannot
    be resized, so its address is fixed while it lives, and its entry goes when it dies."""
    key = id(array)
    hit = _ADDRESSES.get(key)
    if hit is not None and hit[0]() is array:
        return hit[1]
    address = array.ctypes.data
    if array.base is not None:
        try:
            reference = weakref.ref(array, lambda _, key=key: _ADDRESSES.pop(key, None))
        except TypeError:
            return address
        _ADDRESSES[key] = (reference, address)
    return address


def _f32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)


def modulate_rows(rows: np.ndarray, out: np.ndarray, w1: np.ndarray, b1: np.ndarray,
                  w2: np.ndarray, c2: np.ndarray, activation: str) -> bool:
    """``out = rows * (act(rows @ w1 + b1) @ w2 + c2)`` row by row, where ``w1`` already holds
    ``1/s`` and ``w2`` the activation's gain (km.modulate_fast prepares them). ``rows`` and ``out``:
    C-contiguous float32 (n, d), not overlapping. False (nothing written that matters) when the
    kernel is absent or refuses, so the caller computes with numpy."""
    if _FN is None:
        return False
    n, d = rows.shape
    if (out.shape != rows.shape or rows.dtype != np.float32 or out.dtype != np.float32
            or not rows.flags.c_contiguous or not out.flags.c_contiguous):
        raise ValueError("modulate_rows needs C-contiguous float32 rows and out of one shape")
    w1, b1, w2, c2 = _f32(w1), _f32(b1), _f32(w2), _f32(c2)
    h = w1.shape[1] if w1.ndim == 2 else -1
    if w1.shape != (d, h) or b1.shape != (h,) or w2.shape != (h, d) or c2.shape != (d,):
        raise ValueError(f"modulator shapes {w1.shape} {b1.shape} {w2.shape} {c2.shape} do not fit rows of {d}")
    w1t = _f32(w1.T)
    status = _FN(rows.ctypes.data, out.ctypes.data, n, d, h, w1.ctypes.data, w1t.ctypes.data,
                 b1.ctypes.data, w2.ctypes.data, c2.ctypes.data, ACTIVATION_CODES[activation])
    return status >= 0  # 1: done, some output not finite (the caller's own checks see it)


class Job(NamedTuple):
    """One layer for :func:`modulate_layers`: its frozen kernel, where its output goes, its modulator."""

    kernel: np.ndarray  # float32, C-contiguous; its rows of length d are the vectors g maps
    d: int
    offset: int  # first float of its output in the arena
    w1: np.ndarray  # (d, h) float32, as the pack stores them
    b1: np.ndarray  # (h,)
    w2: np.ndarray  # (h, d)
    b2: np.ndarray  # (d,)
    activation: str
    scale: float  # s, the frozen kernel's RMS
    gain: float  # what the kernel's activation leaves, act(x) * gain (km._ACTIVATION_GAIN)


def modulate_layers(jobs: list[Job | tuple], arena: np.ndarray,
                    threads: int | None = None) -> list[bool | None]:
    """Every job (a :class:`Job` or a plain tuple in its field order) in one call per thread,
    outputs into ``arena`` (1-D float32) at their offsets. Per job: None (not done), True (done,
    every output finite) or False (done, some output NaN or infinite: checked in registers as it
    was written, so the caller needs no pass of its own over the kernel).

    A job whose sizes, types or place in the arena do not fit is left out (None: the caller's
    numpy path rebuilds it, or names what is wrong), so the C code only ever sees sizes and
    addresses checked here. All None when the kernel is absent or refuses. With ``threads > 1``
    the jobs are split into that many groups of about equal size, each one call in its own thread
    (ctypes releases the GIL).
    """
    done: list[bool | None] = [None] * len(jobs)
    if _LAYERS_FN is None or not jobs:
        return done
    if not is_f32(arena) or arena.ndim != 1 or not arena.flags.c_contiguous:
        raise ValueError("the arena must be 1-D C-contiguous float32")
    limit = arena.size
    meta, scales, params, taken, at = [], [], [], [], 0
    codes = ACTIVATION_CODES
    for i, (kernel, d, offset, w1, b1, w2, b2, activation, scale, gain) in enumerate(jobs):
        size = kernel.size
        h = w1.shape[1] if w1.ndim == 2 else -1
        if (d < 1 or size % d or offset < 0 or offset + size > limit
                or (w1.shape, b1.shape, w2.shape, b2.shape) != ((d, h), (h,), (h, d), (d,))
                or not (kernel.dtype is F32 and w1.dtype is F32 and b1.dtype is F32
                        and w2.dtype is F32 and b2.dtype is F32
                        or all(map(is_f32, (kernel, w1, b1, w2, b2))))
                or not kernel.flags.c_contiguous):
            continue
        meta += (size // d, d, h, codes[activation], _address(kernel), offset, at, 0)
        scales += (1.0 / float(scale), 1.0 / gain)
        params += (w1, b1, w2, b2)
        taken.append(i)
        at += 2 * d * h + h + d
    if not taken:
        return done
    # array.array: a tenth of the time np.array takes on a list of small tuples; writable, as the
    # kernel writes each layer's finite flag into column 7
    meta = np.frombuffer(array.array("q", meta), dtype=np.int64).reshape(-1, 8)
    scales = np.frombuffer(array.array("f", scales), dtype=np.float32).reshape(-1, 2)
    flat = np.concatenate(params, axis=None)
    address = arena.ctypes.data
    groups = _groups([jobs[i][0].size for i in taken], threads)

    def run(group: np.ndarray | None) -> int:
        group_meta = meta if group is None else meta[group]  # copies, alive through the call
        group_scales = scales if group is None else scales[group]
        status = _LAYERS_FN(len(group_meta), group_meta.ctypes.data, group_scales.ctypes.data,
                            flat.ctypes.data, address)
        if group is not None:
            meta[group, 7] = group_meta[:, 7]
        return status

    if len(groups) == 1:
        ok = run(None) == 0
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=len(groups)) as pool:
            ok = all(status == 0 for status in pool.map(run, groups))
    if ok:
        for i, flag in zip(taken, meta[:, 7].tolist()):
            done[i] = flag == 0
    return done


def _groups(sizes: list[int], threads: int | None) -> list[np.ndarray]:
    """Indices split into ``threads`` groups of about equal total size, largest first (greedy)."""
    count = max(1, min(int(threads or 1), len(sizes)))
    if count == 1:
        return [np.arange(len(sizes))]
    loads, members = [0] * count, [[] for _ in range(count)]
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        least = loads.index(min(loads))
        loads[least] += sizes[i]
        members[least].append(i)
    return [np.array(sorted(m), dtype=np.int64) for m in members if m]
