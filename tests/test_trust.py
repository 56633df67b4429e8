"""Key management: named keys, several trusted keys with validity windows, revocation, rotation."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from device_runtime.errors import KeyFileError, KeyWindowError, RevokedKeyError, UntrustedKeyError
from device_runtime.keys import generate_keypair, load_private_key
from device_runtime.pack import build_pack, read_pack
from device_runtime.pack.trust import load_revocations, load_trust

from test_packformat import make_body

KM_EDGE = str(Path(sys.executable).with_name("km-edge"))


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """Two named pairs, as after a rotation: old (2026) and new (2027)."""
    folder = tmp_path_factory.mktemp("keys")
    generate_keypair(folder, name="old2026")
    generate_keypair(folder, name="new2027")
    (folder / "trust.json").write_text(json.dumps({"keys": [
        {"name": "old2026", "public_key": "old2026.pub", "not_before": "2026-01-01T00:00:00Z",
         "expires": "2027-02-01T00:00:00Z"},
        {"public_key": "new2027.pub", "not_before": "2026-12-01T00:00:00Z"},
    ]}))
    return folder


def signed(keys: Path, name: str, created: str, **extra) -> bytes:
    body = {**make_body(), "created": created, **extra}
    return build_pack(body, load_private_key(keys / f"{name}.key"))


def test_keygen_writes_named_pairs_side_by_side(keys):
    for name in ("old2026", "new2027"):
        assert stat.S_IMODE(os.stat(keys / f"{name}.key").st_mode) == 0o600
        assert (keys / f"{name}.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    with pytest.raises(KeyFileError):
        generate_keypair(keys, name="old2026")  # never replaced silently
    for bad in ("../evil", "a/b", "", ".hidden", "x" * 65, "a b"):
        with pytest.raises(KeyFileError):
            generate_keypair(keys, name=bad)


def test_keys_are_trusted_only_inside_their_window(keys):
    trusted = load_trust(trust_file=keys / "trust.json")
    assert sorted(k.name for k in trusted.values()) == ["new2027", "old2026"]
    old = signed(keys, "old2026", "2026-11-01T00:00:00Z")
    new = signed(keys, "new2027", "2026-12-02T00:00:00Z")
    # during the overlap both verify
    assert read_pack(old, trusted, now=utc(2026, 12, 15)).task == "birds"
    assert read_pack(new, trusted, now=utc(2026, 12, 15)).task == "birds"
    # after the old key's expiry its packs stop verifying, the new key's go on
    with pytest.raises(KeyWindowError, match="expired at 2027-02-01T00:00:00Z"):
        read_pack(old, trusted, now=utc(2027, 2, 1))
    assert read_pack(new, trusted, now=utc(2030, 1, 1)).task == "birds"
    # before not_before a key is not trusted yet, and a pack dated before its key's window is refused
    with pytest.raises(KeyWindowError, match="trusted only from"):
        read_pack(new, trusted, now=utc(2026, 11, 30))
    backdated = signed(keys, "new2027", "2026-06-01T00:00:00Z")
    with pytest.raises(KeyWindowError, match="outside the window"):
        read_pack(backdated, trusted, now=utc(2026, 12, 15))


def test_revoked_keys_are_refused_whatever_the_pack_says(keys, tmp_path):
    old = signed(keys, "old2026", "2026-11-01T00:00:00Z")
    trusted = load_trust(trust_file=keys / "trust.json")
    old_id = next(k for k, v in trusted.items() if v.name == "old2026")
    revoked = tmp_path / "revoked.json"
    revoked.write_text(json.dumps({"revoked": [{"key_id": old_id, "reason": "laptop stolen"}]}))
    assert load_revocations(revoked) == {old_id: "laptop stolen"}
    trusted = load_trust(trust_file=keys / "trust.json", revocation_file=revoked)
    with pytest.raises(RevokedKeyError, match="revoked \\(laptop stolen\\)"):
        read_pack(old, trusted, now=utc(2026, 12, 1))
    assert isinstance(RevokedKeyError("x"), UntrustedKeyError)
    # revocation also applies to a key given as a plain .pub file
    trusted = load_trust([keys / "old2026.pub"], revocation_file=revoked)
    with pytest.raises(RevokedKeyError):
        read_pack(old, trusted, now=utc(2026, 12, 1))


@pytest.mark.parametrize("content", [
    "not json", "[]", '{"revoked": {}}', '{"revoked": [{"key_id": "XYZ"}]}',
    '{"revoked": [], "extra": 1}', '{"revoked": [{"key_id": "0123456789abcdef", "when": 1}]}',
    '{"revoked": [], "revoked": []}',
])
def test_a_malformed_revocation_list_fails_closed(tmp_path, keys, content):
    path = tmp_path / "revoked.json"
    path.write_text(content)
    with pytest.raises(KeyFileError):
        load_trust(trust_file=keys / "trust.json", revocation_file=path)
    with pytest.raises(KeyFileError):
        load_revocations(tmp_path / "missing.json")


@pytest.mark.parametrize("entry", [
    {"public_key": "old2026.pub", "expires": "2027"},
    {"public_key": "old2026.pub", "not_before": "2027-01-01T00:00:00Z", "expires": "2026-01-01T00:00:00Z"},
    {"public_key": "old2026.key"},
    {"public_key": "missing.pub"},
    {"name": "x"},
    {"public_key": "old2026.pub", "threshold": 2},
])
def test_a_malformed_trust_file_is_refused(keys, tmp_path, entry):
    path = keys / "bad-trust.json"
    path.write_text(json.dumps({"keys": [entry]}))
    with pytest.raises(KeyFileError):
        load_trust(trust_file=path)


def run_cli(*args, cwd):
    return subprocess.run([KM_EDGE, *map(str, args)], cwd=cwd, capture_output=True, text=True)


def test_cli_keygen_name_and_verify_honour_trust_and_revocation_files(tmp_path):
    made = json.loads(run_cli("keygen", "--name", "k2027", "--json", cwd=tmp_path).stdout)
    assert made["name"] == "k2027" and Path(tmp_path / made["private_key"]).name == "k2027.key"
    assert made["trust_entry"] == {"name": "k2027", "public_key": "k2027.pub"}
    bad = run_cli("keygen", "--name", "../evil", cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path.parent / "evil.key").exists()

    pack = tmp_path / "birds.kmp"
    pack.write_bytes(build_pack(make_body(), load_private_key(tmp_path / "keys" / "k2027.key")))
    (tmp_path / "keys" / "trust.json").write_text(json.dumps({"keys": [made["trust_entry"]]}))
    ok = run_cli("verify", pack, "--json", cwd=tmp_path)  # keys/trust.json found by default
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["key_id"] == made["key_id"]

    (tmp_path / "keys" / "revoked.json").write_text(
        json.dumps({"revoked": [{"key_id": made["key_id"], "reason": "rotated out"}]}))
    refused = run_cli("verify", pack, cwd=tmp_path)  # keys/revoked.json found by default
    assert refused.returncode == 2 and "revoked (rotated out)" in refused.stderr
    elsewhere = tmp_path / "elsewhere.json"
    (tmp_path / "keys" / "revoked.json").rename(elsewhere)
    assert run_cli("verify", pack, cwd=tmp_path).returncode == 0
    assert run_cli("verify", pack, "--revoked", elsewhere, cwd=tmp_path).returncode == 2
    expired = tmp_path / "window.json"
    expired.write_text(json.dumps({"keys": [{**made["trust_entry"], "public_key": "keys/k2027.pub",
                                             "expires": "2026-01-01T00:00:00Z"}]}))
    late = run_cli("inspect", pack, "--trust", expired, cwd=tmp_path)
    assert late.returncode == 2 and "expired at 2026-01-01T00:00:00Z" in late.stderr
