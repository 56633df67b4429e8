"""The tensor codec: one index of (offset, shape) entries and one contiguous, aligned data blob.

Every tensor of a pack is stored at the pack's ``storage_dtype``, little-endian, C order, at an
offset that is a multiple of ``TENSOR_ALIGNMENT`` (zero padding between tensors, none after the
last), so a float32 tensor is read as a view of the blob without copying. Only the shape and the
offset cost bytes per tensor, which is what lets a float16 pack be close to half its float32 pack.
Which tensor is which follows from the records (``records.py``), in the order they list them.

The reader takes ``read_tensors``: one pass over the index and one bound on every value of the blob,
rather than a dozen numpy calls per tensor. When that pass finds anything off, the reader falls back
on the entry-by-entry checks (``TensorEntry``, ``decode_tensors``, the records' own), which name
the entry or tensor at fault.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import MalformedPackError, PackLimitError
from .codec import check_int, show
from .limits import MAX_ABS_VALUE, MAX_DIM, MAX_PACK_BYTES, STORAGE_DTYPES, TENSOR_ALIGNMENT

__all__ = ["TensorEntry", "encode_tensors", "decode_tensors", "read_tensors", "DTYPES"]

DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
MAX_TENSOR_DIMS = 2  # every pack tensor is a vector or a matrix


def aligned(offset: int) -> int:
    return -(-offset // TENSOR_ALIGNMENT) * TENSOR_ALIGNMENT


@dataclass(frozen=True)
class TensorEntry:
    """One index entry: where a tensor starts in the blob and its shape (msgpack ``[offset, shape]``)."""

    offset: int
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        check_int(self.offset, "tensor offset", 0, MAX_PACK_BYTES)
        if self.offset % TENSOR_ALIGNMENT:
            raise MalformedPackError(f"tensor offset {self.offset} is not a multiple of {TENSOR_ALIGNMENT}")
        if not isinstance(self.shape, (tuple, list)) or not 1 <= len(self.shape) <= MAX_TENSOR_DIMS:
            raise PackLimitError(
                f"tensor shape must have 1 to {MAX_TENSOR_DIMS} dimensions, got {show(self.shape)}"
            )
        if not all(type(n) is int and 1 <= n <= MAX_DIM for n in self.shape):
            raise PackLimitError(
                f"tensor shape dimensions must be ints in [1, {MAX_DIM}], got {show(self.shape)}"
            )
        object.__setattr__(self, "shape", tuple(self.shape))

    def nbytes(self, storage_dtype: str) -> int:
        return math.prod(self.shape) * DTYPES[storage_dtype].itemsize

    @classmethod
    def from_msgpack(cls, obj, where: str) -> TensorEntry:
        if not isinstance(obj, list) or len(obj) != 2 or not isinstance(obj[1], list):
            raise MalformedPackError(f"{where} must be [offset, [dims]], got {show(obj)}")
        try:
            return cls(obj[0], obj[1])
        except PackLimitError as exc:
            raise type(exc)(f"{where}: {exc}") from None

    def to_msgpack(self) -> list:
        return [self.offset, list(self.shape)]


def encode_tensors(arrays: list[np.ndarray], storage_dtype: str) -> tuple[list[TensorEntry], bytes]:
    """The index and the blob for ``arrays`` (already validated float32 arrays), in order."""
    if storage_dtype not in STORAGE_DTYPES:
        raise PackLimitError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {show(storage_dtype)}")
    dtype = DTYPES[storage_dtype]
    entries, chunks, offset = [], [], 0
    for array in arrays:
        with np.errstate(over="ignore"):
            stored = np.ascontiguousarray(array, dtype=dtype)
        if not np.isfinite(stored).all():  # float16 overflows above 65504
            raise PackLimitError(
                f"a tensor of shape {list(array.shape)} has values that are not finite in {storage_dtype}"
            )
        start = aligned(offset)
        chunks.append(b"\0" * (start - offset))
        chunks.append(stored.tobytes())
        entries.append(TensorEntry(start, tuple(int(n) for n in array.shape)))
        offset = start + stored.nbytes
    return entries, b"".join(chunks)


def decode_tensors(entries: list[TensorEntry], blob: bytes, storage_dtype: str) -> list[np.ndarray]:
    """Float32 arrays (read-only) for each entry; the entries must tile ``blob`` exactly, in order,
    with zero padding: then ``encode_tensors`` of the arrays gives back ``blob`` byte for byte."""
    dtype = DTYPES[storage_dtype]
    arrays, offset = [], 0
    for i, entry in enumerate(entries):
        start, size = aligned(offset), entry.nbytes(storage_dtype)
        if entry.offset != start:
            raise MalformedPackError(
                f"tensors[{i}] starts at {entry.offset}, the next aligned offset is {start}"
            )
        if blob[offset:start].strip(b"\0"):
            raise MalformedPackError(f"tensors[{i}] is preceded by padding that is not zero")
        if start + size > len(blob):
            raise MalformedPackError(
                f"tensors[{i}] of shape {list(entry.shape)} at {storage_dtype} ends at byte "
                f"{start + size}, past the {len(blob)}-byte data blob"
            )
        array = np.frombuffer(blob, dtype=dtype, count=size // dtype.itemsize, offset=start)
        array = array.reshape(entry.shape).astype(np.float32, copy=False)
        array.flags.writeable = False  # float16 widened into a copy: read-only like the views
        arrays.append(array)
        offset = start + size
    if offset != len(blob):
        raise MalformedPackError(f"the data blob has {len(blob) - offset} bytes no tensor uses")
    return arrays


def read_tensors(index: list, blob: bytes, storage_dtype: str) -> list[np.ndarray] | None:
    """The reader's fast path: read-only float32 arrays, views of one array, for a msgpack ``index``
    of ``[offset, [dims]]`` entries that ``TensorEntry`` and ``decode_tensors`` accept and a blob whose
    every value is finite with |value| <= MAX_ABS_VALUE (the bound ``records`` puts on each tensor);
    None when anything is off, and the caller then runs those checks one by one for the message.

    It accepts nothing they refuse: each condition below is one of theirs, written for plain ints
    and lists (what msgpack decodes), and the blob's values are bounded together, padding included
    (zero once checked), so the records need not scan each tensor's values again.
    """
    itemsize = DTYPES[storage_dtype].itemsize
    spans, end = [], 0
    for item in index:
        if type(item) is not list or len(item) != 2:
            return None
        offset, shape = item
        if type(shape) is not list or not 1 <= len(shape) <= MAX_TENSOR_DIMS:
            return None
        count = 1
        for n in shape:
            if type(n) is not int or not 1 <= n <= MAX_DIM:
                return None
            count *= n
        start = aligned(end)  # also a multiple of TENSOR_ALIGNMENT, as every offset must be
        if type(offset) is not int or offset != start or offset > MAX_PACK_BYTES:
            return None
        if start != end and blob[end:start].strip(b"\0"):
            return None
        end = start + count * itemsize
        if end > len(blob):
            return None
        spans.append((start // itemsize, end // itemsize, shape))
    if end != len(blob) or not spans:
        return None
    values = np.frombuffer(blob, DTYPES[storage_dtype]).astype(np.float32, copy=False)  # float16: widened once
    values.flags.writeable = False
    if not (values.min() >= -MAX_ABS_VALUE and values.max() <= MAX_ABS_VALUE):  # both false for NaN
        return None
    return [values[first:last] if len(shape) == 1 else values[first:last].reshape(shape)
            for first, last, shape in spans]
