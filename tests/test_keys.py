"""Promises of device_runtime.keys: key files, modes, refusals, key ids."""

from __future__ import annotations

import hashlib
import os
import stat

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from device_runtime.errors import KeyFileError
from device_runtime.keys import (
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    load_trusted_keys,
)


def assert_one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message
    return message


def test_key_id_is_sha256_prefix_of_raw_public_key():
    private = Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert len(raw) == 32
    assert key_id(private.public_key()) == hashlib.sha256(raw).hexdigest()[:16]
    assert key_id(private) == key_id(private.public_key())


def test_generate_keypair_writes_pem_files_with_modes(tmp_path):
    private_path, public_path, kid = generate_keypair(tmp_path / "keys")
    assert private_path == tmp_path / "keys" / "signing.key"
    assert public_path == tmp_path / "keys" / "signing.pub"
    assert stat.S_IMODE(os.stat(private_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(public_path).st_mode) == 0o644
    assert private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert [p.name for p in (tmp_path / "keys").iterdir() if p.name.endswith(".tmp")] == []

    private, public = load_private_key(private_path), load_public_key(public_path)
    assert isinstance(private, Ed25519PrivateKey) and isinstance(public, Ed25519PublicKey)
    assert key_id(private) == key_id(public) == kid
    public.verify(private.sign(b"payload"), b"payload")


def test_generate_keypair_refuses_to_overwrite_without_force(tmp_path):
    _, _, first = generate_keypair(tmp_path)
    before = (tmp_path / "signing.key").read_bytes()
    with pytest.raises(KeyFileError) as exc_info:
        generate_keypair(tmp_path)
    assert "--force" in assert_one_line(exc_info)
    assert (tmp_path / "signing.key").read_bytes() == before

    # one half of a pair is enough to refuse
    (tmp_path / "signing.key").unlink()
    with pytest.raises(KeyFileError):
        generate_keypair(tmp_path)

    _, _, second = generate_keypair(tmp_path, force=True)
    assert second != first
    assert stat.S_IMODE(os.stat(tmp_path / "signing.key").st_mode) == 0o600


def test_load_missing_key_file_is_refused(tmp_path):
    with pytest.raises(KeyFileError) as exc_info:
        load_private_key(tmp_path / "nope.key")
    assert "not found" in assert_one_line(exc_info)
    with pytest.raises(KeyFileError):
        load_public_key(tmp_path / "nope.pub")
    with pytest.raises(KeyFileError):
        load_public_key(tmp_path)  # a directory


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads anything")
def test_load_unreadable_key_file_is_refused(tmp_path):
    private_path, _, _ = generate_keypair(tmp_path)
    private_path.chmod(0)
    with pytest.raises(KeyFileError) as exc_info:
        load_private_key(private_path)
    assert "cannot read" in assert_one_line(exc_info)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"hello\n",
        b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n",
        np.random.default_rng(12).integers(0, 256, 200, dtype=np.uint8).tobytes(),
    ],
)
def test_load_garbage_key_files_is_refused(tmp_path, content):
    path = tmp_path / "bad.pem"
    path.write_bytes(content)
    with pytest.raises(KeyFileError) as exc_info:
        load_private_key(path)
    assert_one_line(exc_info)
    with pytest.raises(KeyFileError) as exc_info:
        load_public_key(path)
    assert_one_line(exc_info)


def test_keys_of_another_algorithm_are_refused(tmp_path):
    ec_key = generate_private_key(SECP256R1())
    private_path, public_path = tmp_path / "ec.key", tmp_path / "ec.pub"
    private_path.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public_path.write_bytes(
        ec_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(KeyFileError) as exc_info:
        load_private_key(private_path)
    assert "Ed25519" in assert_one_line(exc_info)
    with pytest.raises(KeyFileError) as exc_info:
        load_public_key(public_path)
    assert "Ed25519" in assert_one_line(exc_info)


def test_encrypted_private_key_is_refused(tmp_path):
    path = tmp_path / "enc.key"
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(KeyFileError) as exc_info:
        load_private_key(path)
    assert "encrypted" in assert_one_line(exc_info)


def test_swapped_key_files_are_refused_with_a_hint(tmp_path):
    private_path, public_path, _ = generate_keypair(tmp_path)
    with pytest.raises(KeyFileError) as exc_info:
        load_public_key(private_path)
    assert "private key" in assert_one_line(exc_info)
    with pytest.raises(KeyFileError) as exc_info:
        load_private_key(public_path)
    assert "public key" in assert_one_line(exc_info)


def test_load_trusted_keys_keys_by_key_id(tmp_path):
    _, pub_a, id_a = generate_keypair(tmp_path / "a")
    _, pub_b, id_b = generate_keypair(tmp_path / "b")
    trusted = load_trusted_keys([pub_a, str(pub_b), pub_a])
    assert set(trusted) == {id_a, id_b}
    assert all(key_id(key) == kid for kid, key in trusted.items())
    assert set(load_trusted_keys(pub_a)) == {id_a}
    assert load_trusted_keys([]) == {}
    with pytest.raises(KeyFileError):
        load_trusted_keys([pub_a, tmp_path / "missing.pub"])
