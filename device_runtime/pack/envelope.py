"""The signed container: magic, format version, key id, the body's bytes and their signature.

The envelope is checked (magic, version, exact fields, canonical bytes), the key chosen and judged
(trusted, not revoked, inside its window) and the Ed25519 signature verified before one byte of the
body is parsed, so a tampered or foreign file never reaches the body parser or numpy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..errors import BadSignatureError, MalformedPackError, UnknownFormatError, UntrustedKeyError
from ..keys import key_id
from .trust import TrustedKey, as_trusted
from .codec import is_canonical, is_int, pack_canonical, show, unpack
from .limits import FORMAT_VERSION, MAGIC, MAX_PACK_BYTES, SIGNATURE_BYTES

__all__ = ["Envelope", "ENVELOPE_FIELDS", "seal"]

ENVELOPE_FIELDS = ("magic", "format_version", "key_id", "payload", "signature")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
# Why version 1 is refused rather than read: see packs/README.md, "Format versions".
_OLD_FORMATS = {1: "rebuild it with `km-edge pack` (format 1 had no value limits, expiry or single tensor blob)"}


@dataclass(frozen=True)
class Envelope:
    """The outer msgpack map of a ``.kmp`` file."""

    key_id: str
    payload: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.key_id, str) or not _KEY_ID.fullmatch(self.key_id):
            raise MalformedPackError(f"envelope key_id must be 16 lowercase hex characters, got {show(self.key_id)}")
        if not isinstance(self.payload, bytes) or not isinstance(self.signature, bytes):
            raise MalformedPackError("envelope payload and signature must be bin")
        if len(self.signature) != SIGNATURE_BYTES:
            raise MalformedPackError(
                f"signature is {len(self.signature)} bytes, an Ed25519 signature is {SIGNATURE_BYTES}"
            )

    @classmethod
    def sign(cls, payload: bytes, private_key: Ed25519PrivateKey) -> Envelope:
        return cls(key_id(private_key), bytes(payload), private_key.sign(bytes(payload)))

    def to_msgpack(self) -> dict:
        return {"magic": MAGIC, "format_version": FORMAT_VERSION, "key_id": self.key_id,
                "payload": self.payload, "signature": self.signature}

    def to_bytes(self) -> bytes:
        return pack_canonical(self.to_msgpack())

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        """Magic first (a foreign file is called that), then the version, then the exact fields."""
        obj = unpack(data, "envelope", max_bin_len=MAX_PACK_BYTES, max_array_len=16, max_map_len=16)
        if not isinstance(obj, dict):
            raise MalformedPackError(f"not a km-edge pack (the file is a msgpack {type(obj).__name__}, not a map)")
        if obj.get("magic") != MAGIC:
            raise MalformedPackError("not a km-edge pack (magic is missing or wrong)")
        version = obj.get("format_version")
        if not is_int(version):
            raise MalformedPackError(f"envelope format_version must be an int, got {show(version)}")
        if version != FORMAT_VERSION:
            advice = _OLD_FORMATS.get(version, "it was written by another km-edge version")
            raise UnknownFormatError(
                f"pack format version {version} is not read by this runtime (it reads version "
                f"{FORMAT_VERSION}); {advice}"
            )
        if set(obj) != set(ENVELOPE_FIELDS):
            missing = sorted(set(ENVELOPE_FIELDS) - set(obj))
            extra = sorted(show(k) for k in set(obj) - set(ENVELOPE_FIELDS))
            raise MalformedPackError(f"envelope fields are wrong: missing {missing}, unexpected {extra}")
        envelope = cls(obj["key_id"], obj["payload"], obj["signature"])
        if not is_canonical(data, envelope.to_msgpack(), "payload"):
            raise MalformedPackError("envelope is not in km-edge's canonical msgpack encoding")
        return envelope

    def verify(self, trusted_keys: Mapping, now: datetime) -> TrustedKey:
        """The trusted key that signed this envelope, after trust, window and signature checks."""
        value = trusted_keys.get(self.key_id)
        if value is None:
            known = ", ".join(sorted(trusted_keys)) or "none configured"
            raise UntrustedKeyError(f"signed by key {self.key_id}, which is not trusted (trusted keys: {known})")
        key = as_trusted(value)
        key.check_now(now)
        try:
            key.public_key.verify(self.signature, self.payload)
        except InvalidSignature:
            raise BadSignatureError("signature does not match (corrupt or tampered pack)") from None
        return key


def seal(payload: bytes, private_key: Ed25519PrivateKey, *, format_version: int = FORMAT_VERSION) -> bytes:
    """Signed envelope bytes around ``payload`` (``format_version`` other than the current one only
    for testing how readers refuse it)."""
    envelope = Envelope.sign(payload, private_key).to_msgpack()
    envelope["format_version"] = format_version
    return pack_canonical(envelope)
