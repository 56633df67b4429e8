"""Strict msgpack decoding and the small value checks every pack record uses.

Decoding is bounded (msgpack's own limits scale with the input; these do not), refuses duplicate
map keys (msgpack would keep the last silently) and extension types, and turns every decoder
failure into one ``MalformedPackError`` line. The checks below raise ``PackLimitError`` naming the
field and the limit, so the writer and the reader refuse a bad value with the same sentence.
"""

from __future__ import annotations

import functools
import math
import re
from datetime import datetime, timezone

import msgpack

from ..errors import MalformedPackError, PackLimitError
from .limits import MAX_STRING_BYTES, TIME_FORMAT

_TIME_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")


class _DuplicateKey(Exception):
    pass


def _unique_map(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def unpack(data: bytes, what: str, *, max_bin_len: int, max_array_len: int, max_map_len: int):
    """One msgpack object from ``data`` (nothing after it), or MalformedPackError naming ``what``."""
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            object_pairs_hook=_unique_map,
            max_bin_len=max_bin_len,
            max_str_len=MAX_STRING_BYTES,
            max_array_len=max_array_len,
            max_map_len=max_map_len,
            max_ext_len=0,
        )
    except _DuplicateKey as exc:
        raise MalformedPackError(f"{what} has the key {show(exc.args[0])} twice") from None
    except msgpack.ExtraData:
        raise MalformedPackError(f"not a km-edge pack (trailing bytes after the {what})") from None
    except (msgpack.exceptions.StackError, RecursionError):
        raise MalformedPackError(f"not a km-edge pack ({what} is nested too deeply)") from None
    except msgpack.exceptions.FormatError:
        raise MalformedPackError(f"not a km-edge pack ({what} is not valid msgpack)") from None
    except UnicodeDecodeError:
        raise MalformedPackError(f"not a km-edge pack ({what} has a string that is not UTF-8)") from None
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError, MemoryError) as exc:
        reason = one_line(str(exc)) or type(exc).__name__
        raise MalformedPackError(f"truncated or not a km-edge pack ({what}: {reason[:120]})") from None


def pack_canonical(obj) -> bytes:
    """The one encoding km-edge writes (msgpack 2.0 str/bin, smallest ints, float 64)."""
    return msgpack.packb(obj, use_bin_type=True)


def is_canonical(data: bytes, obj: dict, blob_key: str) -> bool:
    """Whether ``data == pack_canonical(obj)``, for a map whose ``blob_key`` value is a large bin
    (the whole body, the tensor blob): the rest of the map is encoded and compared around it, the
    bin is compared in place, so no second copy the size of the pack is made and compared.

    A map's encoding is its header then each key and value in order, and a bin's is its header then
    its bytes, so this compares exactly the bytes ``pack_canonical`` would write.
    """
    blob = obj[blob_key]
    if not isinstance(blob, bytes):
        raise TypeError(f"{blob_key} must be bytes, got {type(blob).__name__}")
    packer = msgpack.Packer(use_bin_type=True)
    head, tail = [packer.pack_map_header(len(obj))], []
    part = head
    for key, value in obj.items():
        part.append(packer.pack(key))
        if key == blob_key:
            head.append(_bin_header(len(blob)))
            part = tail
        else:
            part.append(packer.pack(value))
    head, tail = b"".join(head), b"".join(tail)
    return (len(data) == len(head) + len(blob) + len(tail) and data.startswith(head)
            and data.startswith(blob, len(head)) and data.endswith(tail))


def _bin_header(n: int) -> bytes:
    """The msgpack bin 8 / 16 / 32 header of an ``n``-byte bin, as ``pack_canonical`` writes it."""
    if n < 2**8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 2**16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


# --- value checks ---------------------------------------------------------------------------
def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value, where: str, low: int, high: int) -> int:
    """An int (never a bool, float or string) in [low, high]."""
    if not is_int(value):
        raise PackLimitError(f"{where} must be an int, got {show(value)}")
    if not low <= value <= high:
        raise PackLimitError(f"{where} must be in [{low}, {high}], got {show(value)}")
    return int(value)


def check_float(value, where: str, low: float, high: float) -> float:
    """A finite number in [low, high] that is also finite (and non-zero where low > 0) in float32."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PackLimitError(f"{where} must be a number, got {show(value)}")
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
        raise PackLimitError(f"{where} must be in [{low:g}, {high:g}], got {show(value)}")
    return value


def check_text(value, where: str, max_chars: int, pattern: str | None = None,
               allow_empty: bool = False) -> str:
    """A str of at most ``max_chars`` printable characters (matching ``pattern`` if given)."""
    if not isinstance(value, str):
        raise PackLimitError(f"{where} must be a string, got {show(value)}")
    if not value and not allow_empty:
        raise PackLimitError(f"{where} must not be empty")
    if len(value) > max_chars:
        raise PackLimitError(f"{where} is longer than {max_chars} characters ({show(value)})")
    if not value.isprintable():  # refuses Cc, Cf, Cs, Co, Cn, Zl, Zp and non-ASCII spaces
        raise PackLimitError(f"{where} has control or invisible characters: {show(value)}")
    if pattern is not None and not _compiled(pattern).fullmatch(value):
        raise PackLimitError(f"{where} must match {pattern}, got {show(value)}")
    return value


@functools.cache
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)  # re's own cache costs more per lookup (a name is checked per layer)


def parse_time(value, where: str) -> datetime:
    """A UTC time written exactly as ``YYYY-MM-DDTHH:MM:SSZ`` (the one spelling packs use)."""
    if not isinstance(value, str) or not _TIME_PATTERN.fullmatch(value):
        raise PackLimitError(f"{where} must be a UTC time like 2026-11-28T09:00:00Z, got {show(value)}")
    try:
        return datetime.strptime(value, TIME_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        raise PackLimitError(f"{where} is not a real date and time: {show(value)}") from None


def format_time(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError("times in packs must be timezone-aware (UTC)")
    return moment.astimezone(timezone.utc).strftime(TIME_FORMAT)


def show(value, limit: int = 60) -> str:
    """A short, single-line, escaped rendering of a (possibly hostile) value for messages."""
    text = repr(value) if not isinstance(value, (bytes, bytearray)) else f"<{len(value)} bytes>"
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(text: str) -> str:
    return " ".join(text.split())
