"""The task pack format (``*.kmp``): bytes, tensors and signatures, nothing else.

A pack is one msgpack map, the *envelope*, holding a signed msgpack *payload* (the body). The
reader checks the envelope, the key and the Ed25519 signature before it parses one byte of the
body, so a tampered or foreign file never reaches the msgpack body parser or numpy. Which packs to
trust beyond that (base id, shapes, downgrades) is the Runtime's decision, not this module's.
The specification a reader in another language can follow is ``packs/README.md``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import (
    BadSignatureError,
    MalformedPackError,
    PackError,
    UnknownFormatError,
    UntrustedKeyError,
)
from .files import write_atomic
from .keys import KEY_ID_HEX_CHARS, key_id
from .km import ACTIVATIONS, LORA_TENSORS, MODULATOR_TENSORS, ModulatorSpec

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "MAX_PACK_BYTES",
    "STORAGE_DTYPES",
    "METHODS",
    "Pack",
    "encode_tensor",
    "decode_tensor",
    "build_pack",
    "seal",
    "read_pack",
    "write_pack",
]

MAGIC = "km-edge-pack"
FORMAT_VERSION = 1
MAX_PACK_BYTES = 512 * 2**20
STORAGE_DTYPES = ("float32", "float16")
METHODS = ("km", "lora", "bn", "bias", "head")
SIGNATURE_BYTES = 64
MAX_TENSOR_DIMS = 8

ENVELOPE_FIELDS = ("magic", "format_version", "key_id", "payload", "signature")
# Body fields in the order they are encoded (a fixed order keeps the payload bytes deterministic).
BODY_FIELDS = (
    "format_version",
    "key_id",
    "task",
    "pack_version",
    "created",
    "base_id",
    "labels",
    "preprocess",
    "method",
    "modulator",
    "storage_dtype",
    "layers",
    "head",
    "bn",
    "metrics",
    "trainer",
)
LAYER_FIELDS = ("name", "adapter", "kind", "activation", "scale", "tensors")
TENSOR_FIELDS = ("dtype", "shape", "data")
HEAD_TENSORS = ("weight", "bias")
BN_TENSORS = ("weight", "bias", "running_mean", "running_var")
MODULATOR_FIELDS = ("kind", "kernel_hidden", "channel_hidden", "activation")

_LITTLE_ENDIAN = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
# Explicit limits: msgpack's defaults scale with the input, these keep a hostile file from asking
# for huge allocations. The envelope only holds short strings and two bins.
_ENVELOPE_LIMITS = dict(
    max_bin_len=MAX_PACK_BYTES, max_str_len=256, max_array_len=16, max_map_len=16, max_ext_len=0
)
_BODY_LIMITS = dict(
    max_bin_len=MAX_PACK_BYTES,
    max_str_len=2**20,
    max_array_len=2**20,
    max_map_len=2**16,
    max_ext_len=0,
)


# --- tensors --------------------------------------------------------------------------------
def encode_tensor(array, storage_dtype: str) -> dict:
    """``{"dtype", "shape", "data"}`` with little-endian C-order bytes at ``storage_dtype``."""
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}")
    array = np.asarray(array)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"tensor must hold real numbers, got dtype {array.dtype}")
    with np.errstate(over="ignore"):  # overflow is reported below, as a ValueError
        stored = np.ascontiguousarray(array, dtype=_LITTLE_ENDIAN[storage_dtype])
    if not np.isfinite(stored).all():
        # float16 overflows above 65504; a pack of infs would silently predict garbage.
        raise ValueError(
            f"tensor of shape {array.shape} has values that are not finite in {storage_dtype}"
        )
    return {
        "dtype": storage_dtype,
        "shape": [int(n) for n in array.shape],
        "data": stored.tobytes(),
    }


def decode_tensor(obj, where: str) -> np.ndarray:
    """A float32 array from an encoded tensor; MalformedPackError naming ``where`` otherwise."""
    if not isinstance(obj, dict) or set(obj) != set(TENSOR_FIELDS):
        raise MalformedPackError(
            f"{where}: a tensor must be a map with exactly {list(TENSOR_FIELDS)}"
        )
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if dtype not in STORAGE_DTYPES:
        raise MalformedPackError(
            f"{where}: tensor dtype must be one of {STORAGE_DTYPES}, got {_show(dtype)}"
        )
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_TENSOR_DIMS
        or not all(_is_int(n) and n >= 0 for n in shape)
    ):
        raise MalformedPackError(
            f"{where}: tensor shape must be a list of at most {MAX_TENSOR_DIMS} non-negative ints, "
            f"got {_show(shape)}"
        )
    if not isinstance(data, bytes):
        raise MalformedPackError(f"{where}: tensor data must be bin, got {type(data).__name__}")
    expected = math.prod(shape) * _LITTLE_ENDIAN[dtype].itemsize
    if len(data) != expected:
        raise MalformedPackError(
            f"{where}: tensor data is {len(data)} bytes, shape {shape} at {dtype} needs {expected}"
        )
    array = np.frombuffer(data, dtype=_LITTLE_ENDIAN[dtype]).astype(np.float32).reshape(shape)
    if not np.isfinite(array).all():
        raise MalformedPackError(f"{where}: tensor has values that are not finite")
    return array


# --- the decoded pack -----------------------------------------------------------------------
@dataclass
class Pack:
    """A verified, decoded pack. Tensors are float32 numpy arrays whatever the storage dtype."""

    format_version: int
    key_id: str
    task: str
    pack_version: int
    created: str
    base_id: str
    labels: list[str]
    preprocess: dict
    method: str
    modulator: dict | None
    storage_dtype: str
    layers: list[dict]
    head: dict[str, np.ndarray]
    bn: list[dict]
    metrics: dict
    trainer: dict
    n_bytes: int

    def n_parameters(self) -> int:
        """Task-specific numbers the pack carries (modulators or LoRA factors, head, BatchNorm)."""
        arrays = [t for layer in self.layers for t in layer["tensors"].values()]
        arrays += list(self.head.values())
        arrays += [t for entry in self.bn for t in entry["tensors"].values()]
        return int(sum(a.size for a in arrays))

    def summary(self) -> dict:
        """Everything but the tensor data (tensors as shape + stored dtype); JSON-serialisable."""

        def tensors(named: Mapping[str, np.ndarray]) -> dict:
            return {
                n: {"shape": list(a.shape), "dtype": self.storage_dtype} for n, a in named.items()
            }

        return {
            "format_version": self.format_version,
            "key_id": self.key_id,
            "task": self.task,
            "pack_version": self.pack_version,
            "created": self.created,
            "base_id": self.base_id,
            "labels": list(self.labels),
            "n_classes": len(self.labels),
            "preprocess": self.preprocess,
            "method": self.method,
            "modulator": self.modulator,
            "storage_dtype": self.storage_dtype,
            "layers": [
                {
                    **{k: layer[k] for k in LAYER_FIELDS if k != "tensors"},
                    "tensors": tensors(layer["tensors"]),
                }
                for layer in self.layers
            ],
            "head": tensors(self.head),
            "bn": [
                {"name": entry["name"], "tensors": tensors(entry["tensors"])} for entry in self.bn
            ],
            "metrics": self.metrics,
            "trainer": self.trainer,
            "n_parameters": self.n_parameters(),
            "n_bytes": self.n_bytes,
        }


# --- writing --------------------------------------------------------------------------------
def build_pack(
    body: Mapping[str, Any], private_key: Ed25519PrivateKey, storage_dtype: str = "float32"
) -> bytes:
    """Signed pack bytes from a body whose tensors are numpy arrays.

    ``body`` holds every field of the format except ``format_version``, ``key_id`` and
    ``storage_dtype`` (added here; ``created`` defaults to now, UTC). The encoded body is checked by
    the same validator the reader uses, so whatever this returns, :func:`read_pack` accepts.
    Raises ValueError for a body that is not a valid pack (a bug in the caller, not bad input).
    """
    if not isinstance(private_key, Ed25519PrivateKey):
        raise ValueError(
            f"private_key must be an Ed25519PrivateKey, got {type(private_key).__name__}"
        )
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}")
    if not isinstance(body, Mapping):
        raise ValueError(f"pack body must be a mapping, got {type(body).__name__}")
    body = dict(body)
    if body.setdefault("storage_dtype", storage_dtype) != storage_dtype:
        raise ValueError(
            f"body says storage_dtype {body['storage_dtype']!r} but {storage_dtype!r} was asked for"
        )
    for added in ("format_version", "key_id"):
        if added in body:
            raise ValueError(f"pack body must not set {added!r}: build_pack adds it")
    if body.get("created") is None:
        body["created"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    elif isinstance(body["created"], datetime):
        body["created"] = body["created"].astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    given = set(body) | {"format_version", "key_id"}
    if given != set(BODY_FIELDS):
        missing, extra = sorted(set(BODY_FIELDS) - given), sorted(given - set(BODY_FIELDS))
        raise ValueError(f"pack body fields are wrong: missing {missing}, unexpected {extra}")

    signer_id = key_id(private_key)
    encoded = {"format_version": FORMAT_VERSION, "key_id": signer_id}
    for field in BODY_FIELDS[2:]:
        value = body[field]
        if field == "layers":
            value = [
                _encode_layer(layer, i, storage_dtype)
                for i, layer in enumerate(_as_list(value, field))
            ]
        elif field == "head":
            value = _encode_tensors(value, "head", storage_dtype)
        elif field == "bn":
            value = [
                _encode_bn(entry, i, storage_dtype)
                for i, entry in enumerate(_as_list(value, field))
            ]
        else:
            value = _plain(value, field)
        encoded[field] = value

    payload = msgpack.packb(encoded, use_bin_type=True)
    try:
        _parse_body(
            msgpack.unpackb(payload, raw=False, strict_map_key=True, **_BODY_LIMITS),
            FORMAT_VERSION,
            signer_id,
            0,
        )
    except MalformedPackError as exc:
        raise ValueError(f"invalid pack body: {exc}") from None
    return seal(payload, private_key)


def seal(
    payload: bytes, private_key: Ed25519PrivateKey, *, format_version: int = FORMAT_VERSION
) -> bytes:
    """The signed envelope (magic, version, key id, payload, signature) around body bytes."""
    envelope = {
        "magic": MAGIC,
        "format_version": format_version,
        "key_id": key_id(private_key),
        "payload": bytes(payload),
        "signature": private_key.sign(bytes(payload)),
    }
    return msgpack.packb(envelope, use_bin_type=True)


def write_pack(path: str | os.PathLike, data: bytes) -> Path:
    """Write pack bytes atomically: a reader never sees half a pack."""
    return write_atomic(path, data, mode=0o644)


def _encode_layer(layer, index: int, storage_dtype: str) -> dict:
    where = f"layers[{index}]"
    _require_mapping(layer, where)
    if set(layer) != set(LAYER_FIELDS):
        raise ValueError(
            f"{where} must have exactly the fields {list(LAYER_FIELDS)}, "
            f"got {sorted(map(str, layer))}"
        )
    try:
        scale = float(layer["scale"])
    except (TypeError, ValueError):
        raise ValueError(f"{where}.scale must be a number, got {layer['scale']!r}") from None
    return {
        "name": _plain(layer["name"], f"{where}.name"),
        "adapter": _plain(layer["adapter"], f"{where}.adapter"),
        "kind": _plain(layer["kind"], f"{where}.kind"),
        "activation": _plain(layer["activation"], f"{where}.activation"),
        "scale": scale,
        "tensors": _encode_tensors(layer["tensors"], f"{where}.tensors", storage_dtype),
    }


def _encode_bn(entry, index: int, storage_dtype: str) -> dict:
    where = f"bn[{index}]"
    _require_mapping(entry, where)
    if set(entry) != {"name", "tensors"}:
        raise ValueError(
            f"{where} must have exactly the fields ['name', 'tensors'], "
            f"got {sorted(map(str, entry))}"
        )
    return {
        "name": _plain(entry["name"], f"{where}.name"),
        "tensors": _encode_tensors(entry["tensors"], f"{where}.tensors", storage_dtype),
    }


def _encode_tensors(named, where: str, storage_dtype: str) -> dict:
    _require_mapping(named, where)
    return {str(name): encode_tensor(array, storage_dtype) for name, array in named.items()}


def _require_mapping(value, where: str) -> None:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(value).__name__}")


def _as_list(value, where: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where} must be a list, got {type(value).__name__}")
    return list(value)


def _plain(value, where: str):
    """JSON-like copy (str-keyed maps, keys sorted, lists, scalars): deterministic to encode."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise ValueError(f"{where}: map keys must be strings")
        return {k: _plain(value[k], f"{where}.{k}") for k in sorted(value)}
    raise ValueError(f"{where}: cannot store a {type(value).__name__} in a pack")


# --- reading --------------------------------------------------------------------------------
def read_pack(
    source: bytes | str | os.PathLike,
    trusted_keys: Mapping[str, Ed25519PublicKey],
    *,
    name: str | None = None,
) -> Pack:
    """Verify and decode a pack from bytes or a file; any refusal is a one-line PackError.

    Order: size, envelope, format version, key trust, signature, and only then the body. Messages
    start with the file's name (``name``, else the path's file name, else "pack").
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "pack"
        data = bytes(source)
    else:
        path = Path(source)
        label = name or path.name or str(path)
        data = read_pack_file(path, label)
    try:
        return _read_bytes(data, trusted_keys)
    except PackError as exc:
        raise type(exc)(f"{label}: {_one_line(str(exc))}") from None


def read_pack_file(path: str | os.PathLike, label: str | None = None) -> bytes:
    """A pack file's bytes, refused unread when it is too large, missing or not a file."""
    path = Path(path)
    label = label or path.name
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_PACK_BYTES:  # refused unread
                raise MalformedPackError(
                    f"{label}: larger than {MAX_PACK_BYTES // 2**20} MiB, not a km-edge pack"
                )
            # One byte past the limit, so an endless special file is refused, not read forever.
            return handle.read(MAX_PACK_BYTES + 1)
    except FileNotFoundError:
        raise MalformedPackError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise MalformedPackError(f"{label}: is a directory, not a pack") from None
    except OSError as exc:
        raise MalformedPackError(
            f"{label}: cannot read ({_one_line(exc.strerror or str(exc))})"
        ) from None


def _read_bytes(data: bytes, trusted_keys: Mapping[str, Ed25519PublicKey]) -> Pack:
    # 1. size
    if not data:
        raise MalformedPackError("empty file, not a km-edge pack")
    if len(data) > MAX_PACK_BYTES:
        raise MalformedPackError(f"larger than {MAX_PACK_BYTES // 2**20} MiB, not a km-edge pack")

    # 2. envelope (magic first, so a foreign file is called that rather than "wrong fields")
    envelope = _unpack(data, "envelope", _ENVELOPE_LIMITS)
    if not isinstance(envelope, dict):
        raise MalformedPackError(
            f"not a km-edge pack (the file is a msgpack {type(envelope).__name__}, not a map)"
        )
    if envelope.get("magic") != MAGIC:
        raise MalformedPackError("not a km-edge pack (magic is missing or wrong)")
    version = envelope.get("format_version")
    if not _is_int(version):
        raise MalformedPackError(f"envelope format_version must be an int, got {_show(version)}")

    # 3. format version: checked before the exact field set so a future format is named as such
    if version != FORMAT_VERSION:
        raise UnknownFormatError(
            f"pack format version {version} is not supported "
            f"(this runtime reads version {FORMAT_VERSION})"
        )
    if set(envelope) != set(ENVELOPE_FIELDS):
        missing = sorted(set(ENVELOPE_FIELDS) - set(envelope))
        extra = sorted(_show(k) for k in set(envelope) - set(ENVELOPE_FIELDS))
        raise MalformedPackError(
            f"envelope fields are wrong: missing {missing}, unexpected {extra}"
        )
    signer, payload, signature = envelope["key_id"], envelope["payload"], envelope["signature"]
    if not _is_key_id(signer):
        raise MalformedPackError(
            f"envelope key_id must be {KEY_ID_HEX_CHARS} hex characters, got {_show(signer)}"
        )
    if not isinstance(payload, bytes) or not isinstance(signature, bytes):
        raise MalformedPackError("envelope payload and signature must be bin")
    if len(signature) != SIGNATURE_BYTES:
        raise MalformedPackError(
            f"signature is {len(signature)} bytes, an Ed25519 signature is {SIGNATURE_BYTES}"
        )

    # 4. key trust
    public_key = trusted_keys.get(signer)
    if public_key is None:
        known = ", ".join(sorted(trusted_keys)) or "none configured"
        raise UntrustedKeyError(
            f"signed by key {signer}, which is not trusted (trusted keys: {known})"
        )

    # 5. signature over exactly the payload bytes
    try:
        public_key.verify(signature, payload)
    except InvalidSignature:
        raise BadSignatureError("signature does not match (corrupt or tampered pack)") from None

    # 6. body
    body = _unpack(payload, "body", _BODY_LIMITS)
    return _parse_body(body, version, signer, len(data))


def _unpack(data: bytes, what: str, limits: dict):
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, **limits)
    except msgpack.ExtraData:
        raise MalformedPackError(f"not a km-edge pack (trailing bytes after the {what})") from None
    except msgpack.exceptions.StackError:
        raise MalformedPackError(f"not a km-edge pack ({what} is nested too deeply)") from None
    except msgpack.exceptions.FormatError:
        raise MalformedPackError(f"not a km-edge pack ({what} is not valid msgpack)") from None
    except UnicodeDecodeError:
        raise MalformedPackError(
            f"not a km-edge pack ({what} has a string that is not UTF-8)"
        ) from None
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError) as exc:
        reason = _one_line(str(exc)) or type(exc).__name__
        raise MalformedPackError(f"truncated or not a km-edge pack ({what}: {reason})") from None


def _parse_body(body, format_version: int, signer: str, n_bytes: int) -> Pack:
    """Validate a decoded body and decode its tensors; MalformedPackError names the bad field."""
    if not isinstance(body, dict):
        raise MalformedPackError(f"body must be a map, got a msgpack {type(body).__name__}")
    if set(body) != set(BODY_FIELDS):
        missing = sorted(set(BODY_FIELDS) - set(body))
        extra = sorted(_show(k) for k in set(body) - set(BODY_FIELDS))
        raise MalformedPackError(f"body fields are wrong: missing {missing}, unexpected {extra}")
    if not _is_int(body["format_version"]) or body["format_version"] != format_version:
        raise MalformedPackError(
            f"body format_version {_show(body['format_version'])} differs from the envelope's "
            f"{format_version}"
        )
    if body["key_id"] != signer:
        raise MalformedPackError(
            f"body key_id {_show(body['key_id'])} differs from the envelope's {signer}"
        )

    task, base_id, created = body["task"], body["base_id"], body["created"]
    for field in ("task", "base_id", "created"):
        if not isinstance(body[field], str) or not body[field]:
            raise MalformedPackError(
                f"{field} must be a non-empty string, got {_show(body[field])}"
            )
    if not _is_iso_time(created):
        raise MalformedPackError(f"created must be an ISO 8601 time, got {_show(created)}")
    pack_version = body["pack_version"]
    if not _is_int(pack_version) or pack_version < 1:
        raise MalformedPackError(f"pack_version must be an int >= 1, got {_show(pack_version)}")
    method = body["method"]
    if method not in METHODS:
        raise MalformedPackError(f"method must be one of {METHODS}, got {_show(method)}")
    storage_dtype = body["storage_dtype"]
    if storage_dtype not in STORAGE_DTYPES:
        raise MalformedPackError(
            f"storage_dtype must be one of {STORAGE_DTYPES}, got {_show(storage_dtype)}"
        )
    for field in ("preprocess", "metrics", "trainer"):
        _check_plain_map(body[field], field)
    modulator = _check_modulator(body["modulator"], method)

    labels = body["labels"]
    if (
        not isinstance(labels, list)
        or not labels
        or not all(isinstance(x, str) and x for x in labels)
    ):
        raise MalformedPackError("labels must be a non-empty list of non-empty strings")
    if len(set(labels)) != len(labels):
        raise MalformedPackError("labels must be unique")

    head = _decode_named(body["head"], "head", HEAD_TENSORS)
    weight, bias = head["weight"], head["bias"]
    if weight.ndim != 2 or bias.ndim != 1 or bias.shape[0] != weight.shape[0]:
        raise MalformedPackError(
            "head must be weight (classes, features) and bias (classes,), "
            f"got {weight.shape} and {bias.shape}"
        )
    if weight.shape[0] != len(labels):
        raise MalformedPackError(f"{len(labels)} labels but the head has {weight.shape[0]} classes")

    layers = [
        _parse_layer(entry, i, method) for i, entry in enumerate(_list(body["layers"], "layers"))
    ]
    bn = [_parse_bn(entry, i) for i, entry in enumerate(_list(body["bn"], "bn"))]
    for field, entries in (("layers", layers), ("bn", bn)):
        names = [e["name"] for e in entries]
        if len(set(names)) != len(names):
            raise MalformedPackError(f"{field} names the same layer twice")

    return Pack(
        format_version=format_version,
        key_id=signer,
        task=task,
        pack_version=pack_version,
        created=created,
        base_id=base_id,
        labels=labels,
        preprocess=body["preprocess"],
        method=method,
        modulator=modulator,
        storage_dtype=storage_dtype,
        layers=layers,
        head=head,
        bn=bn,
        metrics=body["metrics"],
        trainer=body["trainer"],
        n_bytes=n_bytes,
    )


def _check_modulator(modulator, method: str) -> dict | None:
    if modulator is None:
        if method == "km":
            raise MalformedPackError("a km pack needs a modulator spec, got nil")
        return None
    if not isinstance(modulator, dict) or set(modulator) != set(MODULATOR_FIELDS):
        raise MalformedPackError(
            f"modulator must be nil or a map with exactly {list(MODULATOR_FIELDS)}"
        )
    hidden = (modulator["kernel_hidden"], modulator["channel_hidden"])
    try:
        if not all(_is_int(h) for h in hidden) or not all(
            isinstance(modulator[k], str) for k in ("kind", "activation")
        ):
            raise ValueError("hidden sizes must be ints, kind and activation strings")
        ModulatorSpec(**modulator)
    except ValueError as exc:
        raise MalformedPackError(f"modulator: {exc}") from None
    return modulator


def _parse_layer(entry, index: int, method: str) -> dict:
    where = f"layers[{index}]"
    if not isinstance(entry, dict) or set(entry) != set(LAYER_FIELDS):
        raise MalformedPackError(f"{where} must be a map with exactly {list(LAYER_FIELDS)}")
    name, adapter, kind, activation, scale = (entry[k] for k in LAYER_FIELDS[:5])
    if not isinstance(name, str) or not name:
        raise MalformedPackError(f"{where}.name must be a non-empty string, got {_show(name)}")
    where = f"layer {_show(name)}"
    if adapter != method:
        raise MalformedPackError(f"{where}: adapter {_show(adapter)} does not fit a {method} pack")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise MalformedPackError(f"{where}: scale must be a finite number, got {_show(scale)}")
    if not isinstance(activation, str):
        raise MalformedPackError(f"{where}: activation must be a string, got {_show(activation)}")
    if adapter == "km":
        if kind not in ("kernel", "channel"):
            raise MalformedPackError(
                f"{where}: kind must be 'kernel' or 'channel', got {_show(kind)}"
            )
        if activation not in ACTIVATIONS:
            raise MalformedPackError(
                f"{where}: activation must be one of {ACTIVATIONS}, got {_show(activation)}"
            )
        if scale <= 0:
            raise MalformedPackError(f"{where}: scale must be > 0, got {scale}")
        names = MODULATOR_TENSORS
    else:
        if kind != "":
            raise MalformedPackError(f"{where}: a lora layer has kind '', got {_show(kind)}")
        names = LORA_TENSORS
    tensors = _decode_named(entry["tensors"], f"{where} tensors", names)
    return {
        "name": name,
        "adapter": adapter,
        "kind": kind,
        "activation": activation,
        "scale": float(scale),
        "tensors": tensors,
    }


def _parse_bn(entry, index: int) -> dict:
    where = f"bn[{index}]"
    if not isinstance(entry, dict) or set(entry) != {"name", "tensors"}:
        raise MalformedPackError(f"{where} must be a map with exactly ['name', 'tensors']")
    name = entry["name"]
    if not isinstance(name, str) or not name:
        raise MalformedPackError(f"{where}.name must be a non-empty string, got {_show(name)}")
    return {
        "name": name,
        "tensors": _decode_named(entry["tensors"], f"bn {_show(name)} tensors", BN_TENSORS),
    }


def _decode_named(named, where: str, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    if not isinstance(named, dict) or set(named) != set(names):
        got = sorted(_show(k) for k in named) if isinstance(named, dict) else type(named).__name__
        raise MalformedPackError(f"{where} must be a map with exactly {list(names)}, got {got}")
    return {n: decode_tensor(named[n], f"{where}: {n}") for n in names}


def _list(value, field: str) -> list:
    if not isinstance(value, list):
        raise MalformedPackError(f"{field} must be a list, got {_show(value)}")
    return value


def _check_plain_map(value, where: str) -> None:
    """Informational maps are JSON-like (str keys, no bin) so `inspect --json` can print them."""
    if not isinstance(value, dict):
        raise MalformedPackError(f"{where} must be a map, got {_show(value)}")
    try:
        _check_plain(value, where)
    except RecursionError:  # msgpack allows deeper nesting than Python's recursion limit
        raise MalformedPackError(f"{where} is nested too deeply") from None


def _check_plain(value, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise MalformedPackError(f"{where}: map keys must be strings")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not (value is None or isinstance(value, (bool, int, float, str))):
        raise MalformedPackError(f"{where}: {type(value).__name__} values are not allowed")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_key_id(value) -> bool:
    return (
        isinstance(value, str)
        and len(value) == KEY_ID_HEX_CHARS
        and all(c in "0123456789abcdef" for c in value)
    )


def _is_iso_time(value: str) -> bool:
    try:
        datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
    except ValueError:
        return False
    return True


def _show(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(text: str) -> str:
    return " ".join(text.split())
