"""The RAM copy of the base files (device_runtime.ramcopy): sessions created from it predict what
in-memory kernels predict, whatever packs came before; the copy never outlives its Runtime, a dead
process's copy is cleaned up, and without room or support the runtime falls back."""

from __future__ import annotations

import dataclasses
import gc
import os
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_device_runtime import export, make_pack, random_images, random_modulators

from device_runtime import keys, ramcopy
from device_runtime.errors import NonFiniteError
from device_runtime.pack.limits import MAX_ABS_VALUE
from device_runtime.runtime import Runtime

fcntl = pytest.importorskip("fcntl")  # the copy is for POSIX systems with a RAM file system


@pytest.fixture(scope="module")
def signer():
    key = Ed25519PrivateKey.generate()
    return key, {keys.key_id(key): key.public_key()}


@pytest.fixture()
def ram_dir(tmp_path, monkeypatch):
    """A folder standing in for /dev/shm, so each test sees only its own copies."""
    folder = tmp_path / "ram"
    folder.mkdir()
    monkeypatch.setenv(ramcopy.ENV, str(folder))
    return folder


def in_memory_features(base_dir, trusted, pack_path, monkeypatch):
    """What the pack predicts with every kernel handed over in memory (no RAM copy)."""
    with monkeypatch.context() as patch:
        patch.setenv(ramcopy.ENV, "off")
        runtime = Runtime(base_dir, trusted)
        runtime.load_pack(pack_path)
        assert runtime.fused_kernels_via.startswith("add_external_initializers")
        return runtime.features(random_images(4))


def test_sessions_from_the_ram_copy_predict_what_in_memory_kernels_predict(tmp_path, signer, ram_dir, monkeypatch):
    key, trusted = signer
    export(tmp_path / "base")
    runtime = Runtime(tmp_path / "base", trusted)
    path = make_pack(tmp_path / "a.kmp", runtime.base, key, seed=3)
    runtime.load_pack(path)
    assert runtime.fused_kernels_via == f"RAM copy of the base files ({ram_dir})"
    [folder] = list(ram_dir.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ["base.onnx", "base.weights", "lock"]
    assert (folder / "base.onnx").read_bytes() == runtime.base.graph_path.read_bytes()
    np.testing.assert_allclose(runtime.features(random_images(4)),
                               in_memory_features(tmp_path / "base", trusted, path, monkeypatch),
                               rtol=1e-5, atol=1e-6)


def test_a_pack_adapting_fewer_layers_gets_the_base_kernels_for_the_rest(tmp_path, signer, ram_dir, monkeypatch):
    """A pack that adapts every layer (here refused by the probe after its rebuild, so nothing of it
    is kept), then one adapting the first layer only: the second sees base kernels elsewhere."""
    key, trusted = signer
    export(tmp_path / "base")
    runtime = Runtime(tmp_path / "base", trusted)
    base = runtime.base
    loud = [dataclasses.replace(layer, tensors={n: np.full_like(t, MAX_ABS_VALUE) for n, t in layer.tensors.items()})
            for layer in random_modulators(base, seed=4)]
    overflowing = make_pack(tmp_path / "overflow.kmp", base, key, task="loud", layers=loud)
    with pytest.raises(NonFiniteError):
        runtime.load_pack(overflowing, probe=True)
    runtime.load_pack(make_pack(tmp_path / "all.kmp", base, key, task="all", seed=5))
    first_only = make_pack(tmp_path / "first.kmp", base, key, task="first",
                           layers=random_modulators(base, seed=6)[:1])
    runtime.load_pack(first_only)
    np.testing.assert_allclose(runtime.features(random_images(4)),
                               in_memory_features(tmp_path / "base", trusted, first_only, monkeypatch),
                               rtol=1e-5, atol=1e-6)
    # and the copy of base.weights is the base's file again, but for that one layer
    [folder] = list(ram_dir.iterdir())
    copy = np.fromfile(folder / "base.weights", dtype=np.uint8)
    original = np.fromfile(base.weights_path, dtype=np.uint8)
    start = base.conv_offsets()["features.0"]
    end = start + base.conv_kernels()["features.0"].nbytes
    assert np.array_equal(copy[:start], original[:start]) and np.array_equal(copy[end:], original[end:])
    assert not np.array_equal(copy[start:end], original[start:end])


def test_the_copy_goes_with_its_runtime_and_a_dead_process_copy_with_the_next(tmp_path, signer, ram_dir):
    key, trusted = signer
    export(tmp_path / "base")
    dead = ram_dir / f"{ramcopy.PREFIX}999999-dead"  # its process died holding nothing
    dead.mkdir()
    (dead / ramcopy.LOCK_FILE).touch()
    (dead / "base.weights").write_bytes(b"\0" * 64)
    alive = ram_dir / f"{ramcopy.PREFIX}1-alive"  # another live runtime's: its lock is held
    alive.mkdir()
    held = os.open(alive / ramcopy.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        runtime = Runtime(tmp_path / "base", trusted)
        runtime.load_pack(make_pack(tmp_path / "a.kmp", runtime.base, key))
        ours = runtime._ram_copy.folder
        assert not dead.exists() and alive.exists() and ours.exists()
        assert (ours.stat().st_mode & 0o777) == 0o700
        del runtime
        gc.collect()
        assert not ours.exists() and alive.exists()
    finally:
        os.close(held)


def test_without_room_or_support_the_runtime_hands_kernels_over_in_memory(tmp_path, signer, ram_dir, monkeypatch):
    key, trusted = signer
    export(tmp_path / "base")
    path = make_pack(tmp_path / "a.kmp", Runtime(tmp_path / "base", trusted).base, key)
    expected = in_memory_features(tmp_path / "base", trusted, path, monkeypatch)
    monkeypatch.setattr(ramcopy, "HEADROOM_BYTES", 2**62)  # no RAM file system is that free
    runtime = Runtime(tmp_path / "base", trusted)
    runtime.load_pack(path)
    assert "MiB free" in runtime.fused_kernels_via and not list(ram_dir.iterdir())
    np.testing.assert_array_equal(runtime.features(random_images(4)), expected)
    monkeypatch.setenv(ramcopy.ENV, str(tmp_path / "missing"))
    runtime = Runtime(tmp_path / "base", trusted)
    runtime.load_pack(path)
    assert "not a writable folder" in runtime.fused_kernels_via
    np.testing.assert_array_equal(runtime.features(random_images(4)), expected)


@pytest.mark.skipif(not os.path.isdir(ramcopy.DEFAULT_DIR), reason=f"no {ramcopy.DEFAULT_DIR} here")
def test_the_default_ram_folder_is_used_and_left_clean(tmp_path, signer, monkeypatch):
    monkeypatch.delenv(ramcopy.ENV, raising=False)
    key, trusted = signer
    export(tmp_path / "base")
    runtime = Runtime(tmp_path / "base", trusted)
    runtime.load_pack(make_pack(tmp_path / "a.kmp", runtime.base, key))
    if runtime._ram_copy is None:  # e.g. a container's small /dev/shm, already used by others
        pytest.skip(f"no RAM copy on this machine: {runtime.fused_kernels_via}")
    folder = runtime._ram_copy.folder
    assert folder.parent == Path(ramcopy.DEFAULT_DIR) and folder.exists()
    runtime._ram_copy.close()
    assert not folder.exists()
