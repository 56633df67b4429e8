"""Which signing keys a device accepts packs from, and when.

The model is TUF's root of trust, reduced to one operator: the device holds a local list of
trusted public keys (``--pubkey`` files, or a trust file naming several keys, each with an optional
validity window ``not_before`` / ``expires``) and a revocation list of key ids it must refuse
whatever the pack says. Both files are device configuration, installed the way the keys are; the
rotation procedure is in packs/README.md. A pack is accepted only if its key is trusted, not
revoked, inside its window now, and the pack's ``created`` time is inside the window too.
Thresholds of signatures are not implemented: one valid signature from one trusted key suffices.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..errors import KeyFileError, KeyWindowError, PackError, RevokedKeyError
from ..files import read_bounded
from ..keys import KEY_ID_HEX_CHARS, key_id, load_public_key
from .codec import check_text, parse_time, show

__all__ = ["TrustedKey", "as_trusted", "load_trust", "load_trust_file", "load_revocations"]

MAX_TRUST_FILE_BYTES = 1024 * 1024
TRUST_KEY_FIELDS = {"name", "public_key", "not_before", "expires"}
REVOKED_FIELDS = {"key_id", "reason"}


@dataclass(frozen=True)
class TrustedKey:
    """A public key the device trusts, its optional window and, if revoked, the reason."""

    public_key: Ed25519PublicKey
    name: str = ""
    not_before: datetime | None = None
    expires: datetime | None = None
    revoked: str | None = None

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    def _label(self) -> str:
        return f"key {self.key_id}" + (f" ({self.name})" if self.name else "")

    def check_now(self, now: datetime) -> None:
        """Refuse a revoked key, or one used outside its window (before the signature is checked)."""
        if self.revoked is not None:
            raise RevokedKeyError(f"signed by {self._label()}, which is revoked ({self.revoked})")
        if self.not_before is not None and now < self.not_before:
            raise KeyWindowError(f"signed by {self._label()}, which is trusted only from {_iso(self.not_before)}")
        if self.expires is not None and now >= self.expires:
            raise KeyWindowError(f"signed by {self._label()}, which expired at {_iso(self.expires)}")

    def check_created(self, created: datetime) -> None:
        """Refuse a pack that says it was made outside the key's window."""
        if (self.not_before is not None and created < self.not_before) or (
            self.expires is not None and created >= self.expires
        ):
            raise KeyWindowError(
                f"created {_iso(created)}, outside the window of {self._label()} "
                f"({_iso(self.not_before) or 'any time'} to {_iso(self.expires) or 'no expiry'})"
            )


def _iso(moment: datetime | None) -> str:
    return "" if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def as_trusted(value) -> TrustedKey:
    """A trusted-keys mapping may hold bare public keys (no window): both become TrustedKey."""
    if isinstance(value, TrustedKey):
        return value
    if isinstance(value, Ed25519PublicKey):
        return TrustedKey(value)
    raise TypeError(f"trusted keys must be Ed25519 public keys or TrustedKey, got {type(value).__name__}")


def load_trust(
    pubkeys: Iterable[str | os.PathLike] = (),
    trust_file: str | os.PathLike | None = None,
    revocation_file: str | os.PathLike | None = None,
) -> dict[str, TrustedKey]:
    """Trusted keys by key id: plain ``.pub`` files (no window) plus a trust file's keys, with the
    revocation list applied (a revoked key stays listed, so its refusal says "revoked")."""
    trusted: dict[str, TrustedKey] = {}
    for path in pubkeys:
        key = TrustedKey(load_public_key(path), name=Path(path).stem)
        trusted[key.key_id] = key
    if trust_file is not None:
        for key in load_trust_file(trust_file):
            trusted[key.key_id] = key  # the trust file's window wins over a bare .pub of the same key
    if revocation_file is not None:
        for revoked_id, reason in load_revocations(revocation_file).items():
            if revoked_id in trusted:
                old = trusted[revoked_id]
                trusted[revoked_id] = TrustedKey(old.public_key, old.name, old.not_before, old.expires, reason)
    return trusted


def _read_json(path: Path, what: str):
    def unique(pairs):
        result = {}
        for key, value in pairs:
            if key in result:
                raise ValueError(f"the key {key!r} appears twice")
            result[key] = value
        return result

    data = read_bounded(path, MAX_TRUST_FILE_BYTES, KeyFileError, what)
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=unique)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise KeyFileError(f"{path}: not a valid {what} ({show(str(exc), 100)})") from None


def _entries(document, path: Path, list_key: str, fields: set[str], what: str) -> list[dict]:
    if not isinstance(document, dict) or set(document) != {list_key} or not isinstance(document[list_key], list):
        raise KeyFileError(f'{path}: a {what} is {{"{list_key}": [...]}}')
    for i, entry in enumerate(document[list_key]):
        if not isinstance(entry, dict) or not set(entry) <= fields:
            raise KeyFileError(f"{path}: {list_key}[{i}] may only have {sorted(fields)}, got {show(entry)}")
    return document[list_key]


def load_trust_file(path: str | os.PathLike) -> list[TrustedKey]:
    """Keys of a trust file (JSON): ``{"keys": [{"name", "public_key": PATH, "not_before", "expires"}]}``.

    ``public_key`` paths are relative to the trust file's folder; times are UTC
    ``YYYY-MM-DDTHH:MM:SSZ``; ``not_before`` and ``expires`` are optional.
    """
    path = Path(path)
    keys = []
    for i, entry in enumerate(_entries(_read_json(path, "trust file"), path, "keys", TRUST_KEY_FIELDS, "trust file")):
        where = f"{path}: keys[{i}]"
        if "public_key" not in entry or not isinstance(entry["public_key"], str):
            raise KeyFileError(f"{where} needs public_key, the path of a .pub file")
        try:
            name = check_text(entry.get("name", ""), f"{where} name", 64, allow_empty=True)
            window = {k: parse_time(entry[k], f"{where} {k}") for k in ("not_before", "expires") if k in entry}
        except PackError as exc:
            raise KeyFileError(str(exc)) from None
        if "not_before" in window and "expires" in window and window["expires"] <= window["not_before"]:
            raise KeyFileError(f"{where}: expires is not after not_before")
        public = load_public_key(path.parent / entry["public_key"])
        keys.append(TrustedKey(public, name or Path(entry["public_key"]).stem, **window))
    return keys


def load_revocations(path: str | os.PathLike) -> dict[str, str]:
    """Revoked key ids and reasons from ``{"revoked": [{"key_id", "reason"}]}``.

    A device fails closed: an unreadable or malformed revocation list refuses every pack.
    """
    path = Path(path)
    revoked = {}
    for i, entry in enumerate(_entries(_read_json(path, "revocation list"), path, "revoked", REVOKED_FIELDS,
                                       "revocation list")):
        kid, reason = entry.get("key_id"), entry.get("reason", "no reason given")
        if not isinstance(kid, str) or len(kid) != KEY_ID_HEX_CHARS or any(c not in "0123456789abcdef" for c in kid):
            raise KeyFileError(f"{path}: revoked[{i}].key_id must be {KEY_ID_HEX_CHARS} lowercase hex characters")
        try:
            revoked[kid] = check_text(reason, f"{path}: revoked[{i}].reason", 200, allow_empty=True)
        except PackError as exc:
            raise KeyFileError(str(exc)) from None
    return revoked


def trusted_map(trusted_keys: Mapping) -> dict[str, TrustedKey]:
    """Normalise a mapping of key id -> public key or TrustedKey (ids must match the keys)."""
    return {kid: as_trusted(value) for kid, value in trusted_keys.items()}
