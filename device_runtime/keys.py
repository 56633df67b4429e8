"""Ed25519 signing keys for task packs: make a pair, load it back, name a key by its id.

A pack names the key that signed it by ``key_id`` so the device can pick the right trusted public
key before it verifies anything; the id is derived from the key itself, so it cannot drift.
Key files are plain PEM (PKCS8 private, SubjectPublicKeyInfo public) so `openssl` can read them.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import KeyFileError, OutputError
from .files import read_bounded, write_atomic

__all__ = [
    "PRIVATE_KEY_NAME",
    "PUBLIC_KEY_NAME",
    "REVOCATION_FILE_NAME",
    "TRUST_FILE_NAME",
    "KEY_NAME_PATTERN",
    "key_paths",
    "key_id",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "load_trusted_keys",
]

DEFAULT_KEY_NAME = "signing"
PRIVATE_KEY_NAME = f"{DEFAULT_KEY_NAME}.key"
PUBLIC_KEY_NAME = f"{DEFAULT_KEY_NAME}.pub"
# A device's optional trust file (keys with validity windows) and revocation list, in its keys folder.
TRUST_FILE_NAME = "trust.json"
REVOCATION_FILE_NAME = "revoked.json"
# key names become file names: NAME.key / NAME.pub in the keys folder
KEY_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
KEY_ID_HEX_CHARS = 16
# A PEM Ed25519 key is ~120 bytes; anything far larger is not a key file (and is not read whole).
MAX_KEY_FILE_BYTES = 64 * 1024


def key_id(public_key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """First 16 hex chars of sha256 over the raw 32-byte public key (or a private key's public)."""
    if isinstance(public_key, Ed25519PrivateKey):
        public_key = public_key.public_key()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_HEX_CHARS]


def key_paths(keys_dir: str | os.PathLike, name: str = DEFAULT_KEY_NAME) -> tuple[Path, Path]:
    """(private, public) paths of the key pair called ``name`` in ``keys_dir``."""
    if not isinstance(name, str) or not re.fullmatch(KEY_NAME_PATTERN, name):
        raise KeyFileError(
            f"key name {name!r} is not allowed: use letters, digits, '-' and '_' (at most 64)"
        )
    keys_dir = Path(keys_dir)
    return keys_dir / f"{name}.key", keys_dir / f"{name}.pub"


def generate_keypair(
    keys_dir: str | os.PathLike, force: bool = False, name: str = DEFAULT_KEY_NAME
) -> tuple[Path, Path, str]:
    """Write a new pair ``NAME.key`` / ``NAME.pub`` to ``keys_dir``; returns (private, public, id).

    Refuses to replace an existing key unless ``force``: losing a signing key orphans every device
    that trusts it. The private key file is created 0600 (never readable by others, not even for a
    moment: the temporary file is made by mkstemp, which opens with 0600) and renamed into place.
    Several named pairs live side by side, which is how keys are rotated (packs/README.md).
    """
    private_path, public_path = key_paths(keys_dir, name)
    keys_dir = Path(keys_dir)
    existing = [str(p) for p in (private_path, public_path) if p.exists() or p.is_symlink()]
    if existing and not force:
        raise KeyFileError(
            f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
            "pass --force to replace the key pair (packs signed with the old key stop verifying)"
        )
    if not keys_dir.is_dir():
        try:
            keys_dir.mkdir(parents=True, mode=0o700)
        except OSError as exc:  # a file in the way, no permission: the user's to fix, not a crash
            raise OutputError(f"{keys_dir}: cannot create the keys folder ({exc.strerror or exc})") from None

    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_atomic(private_path, private_pem, mode=0o600)
    write_atomic(public_path, public_pem, mode=0o644)
    return private_path, public_path, key_id(private_key)


# What to do about a missing key, on the machine that misses it.
MISSING_PRIVATE_KEY = "key file not found: make one with `km-edge keygen` (or `km-edge init`) on the host"
MISSING_PUBLIC_KEY = ("key file not found: copy the host's public key (keys/signing.pub) here, or point "
                      "--pubkey (or KM_EDGE_PUBKEY) at it")


@dataclass(frozen=True)
class _KeyHalf:
    """What reading one half of a key pair expects, and what it says when the file is not that."""

    missing: str      # the way out when the file is not there, on the machine that misses it
    other_half: bytes  # the PEM marker of the other half: refused, never used or derived from
    is_other_half: str
    parse: Callable[[bytes], object]
    key_type: type
    other_algorithm: str


_HALVES = {
    "private": _KeyHalf(
        MISSING_PRIVATE_KEY, b"PUBLIC KEY-----",
        f"is a public key; signing needs the private key ({PRIVATE_KEY_NAME})",
        lambda data: serialization.load_pem_private_key(data, password=None),
        Ed25519PrivateKey, "km-edge signs with Ed25519"),
    # copying a private key onto a device is the mistake to catch
    "public": _KeyHalf(
        MISSING_PUBLIC_KEY, b"PRIVATE KEY-----",
        f"is a private key; devices trust the public key ({PUBLIC_KEY_NAME})",
        serialization.load_pem_public_key, Ed25519PublicKey, "km-edge packs use Ed25519"),
}


def _load_key(path: str | os.PathLike, half: str):
    """The Ed25519 ``half`` ("private" or "public") of a pair from its PEM file, or one KeyFileError line."""
    path, expected = Path(path), _HALVES[half]
    data = read_bounded(path, MAX_KEY_FILE_BYTES, KeyFileError, "key file", missing=expected.missing)
    if expected.other_half in data:
        raise KeyFileError(f"{path}: {expected.is_other_half}")
    try:
        key = expected.parse(data)
    except TypeError:  # for a private key, cryptography's way of saying "encrypted, and no password given"
        if half == "private":
            raise KeyFileError(f"{path}: private key is encrypted; km-edge needs an unencrypted key") from None
        raise KeyFileError(f"{path}: not a PEM {half} key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path}: not a PEM {half} key") from None
    if not isinstance(key, expected.key_type):
        raise KeyFileError(f"{path}: is a {type(key).__name__} key; {expected.other_algorithm}")
    return key


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """The Ed25519 signing key in an unencrypted PEM (PKCS8) file."""
    return _load_key(path, "private")


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    """The Ed25519 public key in a PEM (SubjectPublicKeyInfo) file."""
    return _load_key(path, "public")


def load_trusted_keys(
    paths: Iterable[str | os.PathLike] | str | os.PathLike,
) -> dict[str, Ed25519PublicKey]:
    """Public keys a device accepts packs from, keyed by :func:`key_id` (one path also works)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    trusted: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        key = load_public_key(path)
        trusted[key_id(key)] = key
    return trusted
