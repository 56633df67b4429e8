"""The device's persistent anti-rollback state, on its own and as run / eval / verify honour it."""

from __future__ import annotations

import json
import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from serving import Device

from device_runtime.errors import KmEdgeError, RollbackError, StateError
from device_runtime.keys import load_trusted_keys
from device_runtime.pack import read_pack
from device_runtime.rollback import STATE_ENV, RollbackState, default_state_path
from device_runtime.runtime import Runtime


@pytest.fixture(scope="module")
def device(tmp_path_factory) -> Device:
    return Device(tmp_path_factory.mktemp("device"))


@pytest.fixture()
def state(tmp_path) -> RollbackState:
    return RollbackState(tmp_path / "state" / "rollback.json")


def _pack(device: Device, task: str, version: int, key=None):
    data = device.pack_bytes(task, version, key=key)
    trusted = load_trusted_keys([device.pubkey])
    if key is not None:
        from device_runtime.keys import key_id

        trusted[key_id(key)] = key.public_key()
    return read_pack(data, trusted)


def test_state_records_the_highest_version_per_task_and_key(device, state):
    other_key = Ed25519PrivateKey.generate()
    assert state.highest() == {} and not state.path.exists()  # nothing recorded yet is not an error
    assert state.record(_pack(device, "birds", 3)) is True
    assert state.record(_pack(device, "birds", 2)) is False  # lower: the record stays
    assert state.record(_pack(device, "birds", 3)) is False
    state.record(_pack(device, "bees", 1))
    signer = _pack(device, "birds", 1).key_id
    state.record(_pack(device, "birds", 1, key=other_key))
    highest = RollbackState(state.path).highest()  # a new process reads the same
    assert highest["birds"][signer] == 3 and highest["bees"][signer] == 1
    assert len(highest["birds"]) == 2 and 1 in highest["birds"].values()


def test_an_older_pack_is_refused_equal_and_newer_pass(device, state):
    state.record(_pack(device, "birds", 5))
    with pytest.raises(RollbackError) as caught:
        state.check(_pack(device, "birds", 4), "birds-v4.kmp")
    message = str(caught.value)
    assert "birds-v4.kmp" in message and "version 4" in message and "version 5" in message
    assert str(state.path) in message and "\n" not in message
    state.check(_pack(device, "birds", 5), "same.kmp")
    state.check(_pack(device, "birds", 6), "newer.kmp")
    state.check(_pack(device, "owls", 1), "other-task.kmp")


def test_the_file_is_replaced_atomically_and_leaves_no_temporary_files(device, state):
    for version in (1, 2, 3):
        state.record(_pack(device, "birds", version))
    document = json.loads(state.path.read_text())
    assert document["format"] == "km-edge-rollback-state" and document["format_version"] == 1
    assert list(document["highest"]["birds"].values()) == [3]
    leftovers = [p.name for p in state.path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    assert stat.S_IMODE(state.path.stat().st_mode) == 0o644


@pytest.mark.parametrize("damage", ["not json", "truncated", "wrong format", "bad version", "bad key id",
                                    "empty"])
def test_a_corrupt_state_file_is_an_error_and_is_never_reset(device, state, damage):
    state.record(_pack(device, "birds", 3))
    text = state.path.read_text()
    document = json.loads(text)
    signer = next(iter(document["highest"]["birds"]))
    broken = {
        "not json": "{not json",
        "truncated": text[: len(text) // 2],
        "wrong format": json.dumps({**document, "format": "something-else"}),
        "bad version": json.dumps({**document, "highest": {"birds": {signer: "three"}}}),
        "bad key id": json.dumps({**document, "highest": {"birds": {"XYZ": 3}}}),
        "empty": "",
    }[damage]
    state.path.write_text(broken)
    for attempt in (lambda: state.check(_pack(device, "birds", 1), "p.kmp"),
                    lambda: state.record(_pack(device, "birds", 9))):
        with pytest.raises(StateError) as caught:
            attempt()
        assert str(state.path) in str(caught.value) and "corrupt" in str(caught.value)
        assert "\n" not in str(caught.value)
    assert state.path.read_text() == broken  # never silently reset


def test_default_state_path_follows_the_env_var_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv(STATE_ENV, str(tmp_path / "explicit.json"))
    assert default_state_path() == tmp_path / "explicit.json"
    monkeypatch.delenv(STATE_ENV)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_path() == tmp_path / "xdg" / "km-edge" / "rollback.json"


def test_runtime_with_state_refuses_an_older_pack_across_restarts(device, tmp_path):
    state_path = tmp_path / "rollback.json"
    trusted = load_trusted_keys([device.pubkey])
    v1 = device.drop("r1.kmp", device.pack_bytes("rt", 1))
    v2 = device.drop("r2.kmp", device.pack_bytes("rt", 2))
    Runtime(device.base_dir, trusted, rollback=RollbackState(state_path)).load_pack(v2)
    restarted = Runtime(device.base_dir, trusted, rollback=RollbackState(state_path))
    with pytest.raises(RollbackError, match="older than version 2"):
        restarted.load_pack(v1)
    assert restarted.active is None
    Runtime(device.base_dir, trusted).load_pack(v1)  # without a state the Runtime keeps no record


def test_run_and_eval_exit_2_on_an_older_pack_and_verify_says_why(device, tmp_path):
    state_path = tmp_path / "rollback.json"
    old = device.drop("cli-v1.kmp", device.pack_bytes("cli", 1))
    new = device.drop("cli-v2.kmp", device.pack_bytes("cli", 2))
    image = device.images / "img0.png"
    assert device.cli("run", "--pack", old, image, state=state_path).returncode == 0
    assert device.cli("run", "--pack", new, image, state=state_path).returncode == 0
    assert json.loads(state_path.read_text())["highest"]["cli"]

    refused = device.cli("run", "--pack", old, image, "--json", state=state_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    error = json.loads(refused.stdout)["error"]
    assert "cli-v1.kmp" in error and "older than version 2" in error

    folder = tmp_path / "val" / "ant"
    folder.mkdir(parents=True)
    folder.joinpath("a.png").write_bytes(device.image_bytes())
    evaluated = device.cli("eval", "--pack", old, tmp_path / "val", state=state_path)
    assert evaluated.returncode == 2 and "older than version 2" in evaluated.stderr
    assert device.cli("eval", "--pack", new, tmp_path / "val", state=state_path).returncode == 0

    verified = device.cli("verify", old, state=state_path)
    assert verified.returncode == 2 and "older than version 2" in verified.stderr
    ok = json.loads(device.cli("verify", new, "--json", state=state_path).stdout)
    assert ok["ok"] is True and ok["recorded_version"] == 2 and ok["version_relation"] == "the recorded v2"
    newer = device.drop("cli-v3.kmp", device.pack_bytes("cli", 3))
    said = device.cli("verify", newer, state=state_path)
    assert said.returncode == 0 and "newer than recorded v2" in said.stdout


def test_run_refuses_to_start_on_a_corrupt_state_file(device, tmp_path):
    state_path = tmp_path / "rollback.json"
    state_path.write_text("garbage")
    result = device.cli("run", "--pack", device.drop("c.kmp", device.pack_bytes("c", 1)),
                        device.images / "img0.png", state=state_path)
    assert result.returncode == 2 and "corrupt" in result.stderr and "Traceback" not in result.stderr
    assert state_path.read_text() == "garbage"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_an_unwritable_state_file_is_a_clear_error(device, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        state = RollbackState(folder / "sub" / "rollback.json")
        with pytest.raises(StateError, match="cannot") as caught:
            state.record(_pack(device, "birds", 1))
        assert isinstance(caught.value, KmEdgeError) and "--state" in str(caught.value)
    finally:
        folder.chmod(0o700)


def test_operator_rolls_back_by_signing_the_old_content_as_a_new_version(device, tmp_path):
    """The README's procedure: the old pack's content, signed again with a higher version."""
    from device_runtime.keys import load_private_key
    from device_runtime.pack import build_pack, write_pack

    state_path = tmp_path / "rollback.json"
    trusted = load_trusted_keys([device.pubkey])
    v1 = device.drop("op-v1.kmp", device.pack_bytes("op", 1, seed=11))
    v2 = device.drop("op-v2.kmp", device.pack_bytes("op", 2, seed=22))
    Runtime(device.base_dir, trusted, rollback=RollbackState(state_path)).load_pack(v2)

    old = read_pack(v1, trusted)
    body = {field: getattr(old, field) for field in ("task", "base_id", "labels", "preprocess", "method",
                                                     "modulator", "layers", "head", "bn", "metrics", "trainer")}
    body["pack_version"] = 3
    v3 = tmp_path / "op-v3.kmp"
    write_pack(v3, build_pack(body, load_private_key(device.root / "keys" / "signing.key"),
                              storage_dtype=old.storage_dtype))

    images = [device.images / "img0.png", device.images / "img1.png"]
    rolled_back = Runtime(device.base_dir, trusted, rollback=RollbackState(state_path))
    assert rolled_back.load_pack(v3).pack.pack_version == 3
    plain = Runtime(device.base_dir, trusted)
    plain.load_pack(v1)
    assert rolled_back.predict(images) == [dict(p) for p in plain.predict(images)]  # v1's model again
    assert RollbackState(state_path).recorded("op", old.key_id) == 3
