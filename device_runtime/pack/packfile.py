"""Reading and writing ``.kmp`` files: the order of the checks, and atomic writes.

``read_pack`` is the only way a device gets a ``Pack``: size, envelope, key trust, signature, body,
canonical encoding, key window, expiry, in that order; every refusal is one ``PackError`` line that
starts with the file's name. ``build_pack`` runs the reader's own parser on what it wrote, so
whatever it returns, ``read_pack`` accepts (until the pack expires).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..errors import ExpiredPackError, MalformedPackError, PackError, PackLimitError
from ..files import read_bounded, write_atomic
from ..keys import key_id
from .codec import format_time, is_canonical, one_line, pack_canonical, show, unpack
from .envelope import Envelope
from .limits import MAX_INFO_ENTRIES, MAX_LABELS, MAX_PACK_BYTES, MAX_TENSORS
from .records import BnEntry, Layer, Pack

__all__ = ["read_pack", "read_pack_file", "build_pack", "write_pack", "parse_body"]

_BODY_LIMITS = dict(
    max_bin_len=MAX_PACK_BYTES, max_array_len=max(MAX_LABELS, MAX_TENSORS), max_map_len=MAX_INFO_ENTRIES
)
_WRITER_FIELDS = {"task", "pack_version", "created", "expires", "base_id", "labels", "preprocess", "method",
                  "modulator", "layers", "head", "bn", "metrics", "trainer", "storage_dtype"}
_OPTIONAL_FIELDS = {"created", "expires", "storage_dtype"}


def read_pack(
    source: bytes | str | os.PathLike,
    trusted_keys: Mapping,
    *,
    name: str | None = None,
    now: datetime | None = None,
) -> Pack:
    """Verify and decode a pack from bytes or a file; any refusal is a one-line PackError.

    ``trusted_keys`` maps key ids to public keys or ``trust.TrustedKey``; ``now`` (UTC, default the
    clock) is what key windows and pack expiry are judged against.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "pack"
        data = bytes(source)
    else:
        path = Path(source)
        label = name or path.name or str(path)
        data = read_pack_file(path, label)
    try:
        return _read_bytes(data, trusted_keys, now or datetime.now(timezone.utc))
    except PackError as exc:
        raise type(exc)(f"{label}: {one_line(str(exc))}") from None


def read_pack_file(path: str | os.PathLike, label: str | None = None) -> bytes:
    """A pack file's bytes, refused unread when it is too large, missing or not a file."""
    return read_bounded(path, MAX_PACK_BYTES, MalformedPackError, "km-edge pack", missing="no such file",
                        label=label or Path(path).name)


def parse_body(payload: bytes, n_bytes: int = 0) -> Pack:
    """The body record from signed payload bytes, refused unless they are its canonical encoding."""
    pack = Pack.from_msgpack(unpack(payload, "body", **_BODY_LIMITS), n_bytes=n_bytes)
    if not is_canonical(payload, pack.to_msgpack(), "data"):
        raise MalformedPackError("body is not in km-edge's canonical msgpack encoding")
    return pack


def _read_bytes(data: bytes, trusted_keys: Mapping, now: datetime) -> Pack:
    if not data:
        raise MalformedPackError("empty file, not a km-edge pack")
    if len(data) > MAX_PACK_BYTES:
        raise MalformedPackError(f"larger than {MAX_PACK_BYTES // 2**20} MiB, not a km-edge pack")
    envelope = Envelope.from_bytes(data)
    key = envelope.verify(trusted_keys, now)
    pack = parse_body(envelope.payload, len(data))
    if pack.key_id != envelope.key_id:
        raise MalformedPackError(f"body key_id {pack.key_id} differs from the envelope's {envelope.key_id}")
    key.check_created(pack.created_at)
    if pack.expires_at is not None and now >= pack.expires_at:
        raise ExpiredPackError(f"pack expired at {pack.expires} (task {pack.task}, v{pack.pack_version})")
    return pack


def build_pack(
    body: Mapping[str, Any], private_key: Ed25519PrivateKey, storage_dtype: str = "float32"
) -> bytes:
    """Signed pack bytes from a body whose tensors are numpy arrays.

    ``body`` holds the fields of ``records.Pack`` except ``format_version`` and ``key_id`` (added
    here); ``created`` defaults to now (UTC), ``expires`` to none; layers and BN entries may be
    records or mappings of their fields. A value outside the format's limits raises the same
    ``PackError`` the reader would.
    """
    if not isinstance(private_key, Ed25519PrivateKey):
        raise TypeError(f"private_key must be an Ed25519PrivateKey, got {type(private_key).__name__}")
    if not isinstance(body, Mapping):
        raise PackLimitError(f"pack body must be a mapping, got {type(body).__name__}")
    body = dict(body)
    given = set(body)
    if not set(_WRITER_FIELDS - _OPTIONAL_FIELDS) <= given <= _WRITER_FIELDS:
        missing = sorted(_WRITER_FIELDS - _OPTIONAL_FIELDS - given)
        raise PackLimitError(f"pack body fields are wrong: missing {missing}, unexpected "
                             f"{sorted(map(show, given - _WRITER_FIELDS))}")
    if body.setdefault("storage_dtype", storage_dtype) != storage_dtype:
        raise PackLimitError(f"body says storage_dtype {show(body['storage_dtype'])} but {storage_dtype} was asked for")
    for when in ("created", "expires"):
        if isinstance(body.get(when), datetime):
            body[when] = format_time(body[when])
    if body.get("created") is None:
        body["created"] = format_time(datetime.now(timezone.utc))
    body["layers"] = [_record(Layer, x, f"layers[{i}]") for i, x in enumerate(_sequence(body["layers"], "layers"))]
    body["bn"] = [_record(BnEntry, x, f"bn[{i}]") for i, x in enumerate(_sequence(body["bn"], "bn"))]
    pack = Pack(**body, key_id=key_id(private_key))
    payload = pack_canonical(pack.to_msgpack())
    parse_body(payload)  # the reader's own check, so what this returns, read_pack accepts
    return Envelope.sign(payload, private_key).to_bytes()


def write_pack(path: str | os.PathLike, data: bytes) -> Path:
    """Write pack bytes atomically: a reader never sees half a pack."""
    return write_atomic(path, data, mode=0o644)


def _sequence(value, where: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise PackLimitError(f"{where} must be a list, got {type(value).__name__}")
    return list(value)


def _record(cls, value, where: str):
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise PackLimitError(f"{where} must be a {cls.__name__} or a mapping, got {type(value).__name__}")
    try:
        return cls(**value)
    except TypeError as exc:  # wrong or missing field names
        raise PackLimitError(f"{where}: {exc}") from None
