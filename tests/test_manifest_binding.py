"""The base manifest is part of the base identity, corrupt manifests are BaseErrors, and files
changed after the runtime opened the base are noticed before the next pack load.

Issue 12 found that moving one conv layer's offset in manifest.json, or pointing a layer at another
initializer, passed every check and silently changed a task's accuracy; and that ``"graph": 5``,
negative lengths, an overflowing shape or ``feature_size: "abc"`` crashed with exit 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_runtime import keys
from device_runtime.basefiles import Base, manifest_identity_bytes
from device_runtime.errors import BaseError, BaseMismatchError
from device_runtime.runtime import Runtime

from test_device_runtime import SIZE, make_pack

KM_EDGE = str(Path(sys.executable).with_name("km-edge"))


@pytest.fixture()
def base(tiny_base_dir, tmp_path) -> Path:
    copy = tmp_path / "base"
    shutil.copytree(tiny_base_dir, copy)
    return copy


@pytest.fixture(scope="module")
def signing_key():
    return Ed25519PrivateKey.generate()


def edit(base: Path, change, rehash: bool = False) -> None:
    path = base / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    if rehash:  # what an attacker who knows the rule would do
        digest = hashlib.sha256((base / "base.onnx").read_bytes() + (base / "base.weights").read_bytes())
        digest.update(manifest_identity_bytes(manifest))
        manifest["base_id"] = digest.hexdigest()
    path.write_text(json.dumps(manifest, indent=2))


def swap_conv_offsets(manifest: dict) -> None:
    """Move the depthwise conv's offset by one alignment step (still inside base.weights)."""
    manifest["conv_layers"][1]["offset"] += 64


def point_at_other_initializer(manifest: dict) -> None:
    manifest["conv_layers"][0]["initializer"] = manifest["conv_layers"][1]["initializer"]


@pytest.mark.parametrize("change", [swap_conv_offsets, point_at_other_initializer,
                                    lambda m: m["preprocess"].update(mean=[0.1, 0.1, 0.1])],
                         ids=["offset moved", "initializer swapped", "preprocess edited"])
def test_any_manifest_edit_is_refused(base, change):
    edit(base, change)
    with pytest.raises(BaseError, match="do not match manifest base_id"):
        Base.open(base)


@pytest.mark.parametrize("change", [swap_conv_offsets, point_at_other_initializer])
def test_manifest_edit_with_base_id_recomputed_fits_no_existing_pack(base, tiny_base_dir, signing_key, tmp_path,
                                                                    change):
    trusted = {keys.key_id(signing_key): signing_key.public_key()}
    pack = make_pack(tmp_path / "p.kmp", Base.open(tiny_base_dir), signing_key)
    edit(base, change, rehash=True)
    runtime = Runtime(base, trusted)  # consistent in itself, so it opens ...
    with pytest.raises(BaseMismatchError):
        runtime.load_pack(pack)  # ... but it is another base: the pack is refused


def test_base_format_1_is_refused_with_the_way_out(base):
    edit(base, lambda m: m.update(format_version=1))
    with pytest.raises(BaseError, match="re-export the base"):
        Base.open(base)


def _tensor(manifest, layer=0):
    return manifest["conv_layers"][layer]


@pytest.mark.parametrize("change, words", [
    (lambda m: m.update(graph=5), "graph must be a file name"),
    (lambda m: m.update(graph="../base.onnx"), "graph must be a file name"),
    (lambda m: m.update(weights_file="/etc/passwd"), "weights_file must be a file name"),
    (lambda m: m.update(feature_size="abc"), "feature_size must be a positive int"),
    (lambda m: m.update(feature_size=True), "feature_size must be a positive int"),
    (lambda m: m.update(weights_bytes=-1), "weights_bytes must be a non-negative int"),
    (lambda m: m.update(conv_layers=5), "conv_layers must be a list"),
    (lambda m: m.update(input_name=None), "input_name must be a non-empty string"),
    (lambda m: m.update(input_name="pixels"), "no input named 'pixels'|do not match manifest base_id"),
    (lambda m: m.update(base_id=7), "base_id must be 64"),
    (lambda m: m["preprocess"].update(resize=10**6), "preprocess"),
    (lambda m: m["preprocess"].update(resize=16, crop=16),
     "differs from the graph's input size 8 x 8|do not match manifest base_id"),
    (lambda m: m["conv_layers"].append(dict(m["conv_layers"][0])), "unique"),
    (lambda m: _tensor(m).update(shape=[-6, -3, 3, 3], length=4 * 162), "non-negative ints"),
    (lambda m: _tensor(m).update(length=-4), "non-negative int offset and length"),
    (lambda m: _tensor(m).update(offset=-64), "non-negative int offset and length"),
    (lambda m: _tensor(m).update(shape=[2**32, 2**32, 2**32, 0]), "do not fit its shape"),
    (lambda m: _tensor(m).update(shape=[2**62, 2**62, 1, 1], length=0), "do not fit its shape"),
    (lambda m: _tensor(m).update(shape=[6, 3, 3, 3.5]), "non-negative ints"),
    (lambda m: _tensor(m).update(offset="0"), "non-negative int offset"),
    (lambda m: _tensor(m).update(groups=0), "groups"),
    (lambda m: _tensor(m).update(offset=10**9), "beyond the end"),
    (lambda m: m["bn_layers"][0].update(tensors=[1, 2]), "tensors must be a map"),
    (lambda m: m["bn_layers"][0]["tensors"].update(gamma=m["bn_layers"][0]["tensors"]["weight"]),
     "tensors must be a map"),
])
@pytest.mark.parametrize("verify", [True, False])
def test_corrupt_manifest_is_a_one_line_base_error(base, change, words, verify):
    edit(base, change)
    with pytest.raises(BaseError) as caught:
        Base.open(base, verify=verify)
    message = str(caught.value)
    assert re.search(words, message) and "\n" not in message


@pytest.mark.parametrize("text, words", [
    ('{"format": "km-edge-base", "format": "x"}', "duplicate key"),
    ('{"format": NaN}', "NaN is not a JSON number"),
    ("[" * 100_000, "cannot read manifest"),
    ("\xff\xfe", "cannot read manifest"),
])
def test_unparseable_manifest_is_a_base_error(base, text, words):
    (base / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(BaseError, match=words):
        Base.open(base)


def test_corrupt_manifest_is_exit_2_on_the_cli(base, tmp_path, signing_key):
    edit(base, lambda m: m.update(graph=5))
    keys_dir = tmp_path / "keys"
    keys.generate_keypair(keys_dir)
    pack = tmp_path / "p.kmp"
    pack.write_bytes(b"not needed: the base is refused first")
    result = subprocess.run([KM_EDGE, "verify", pack, "--base", base, "--pubkey", keys_dir / "signing.pub"],
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "graph must be a file name" in lines[0] and "Traceback" not in result.stderr


# --- files changed after the runtime opened them ----------------------------------------------
@pytest.mark.parametrize("name", ["base.weights", "base.onnx", "manifest.json"])
def test_files_changed_after_open_are_refused_before_the_next_load(base, signing_key, tmp_path, name):
    trusted = {keys.key_id(signing_key): signing_key.public_key()}
    runtime = Runtime(base, trusted)
    first = runtime.load_pack(make_pack(tmp_path / "a.kmp", runtime.base, signing_key, task="a"))
    path = base / name
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF if name != "manifest.json" else ord("\n") ^ ord(" ")  # same size, one byte
    path.write_bytes(bytes(data))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    with pytest.raises(BaseError, match=f"{name} changed since the runtime opened the base"):
        runtime.load_pack(make_pack(tmp_path / "b.kmp", runtime.base, signing_key, task="b"))
    assert runtime.active is first


def test_replaced_file_is_noticed_too(base, signing_key, tmp_path):
    trusted = {keys.key_id(signing_key): signing_key.public_key()}
    runtime = Runtime(base, trusted)
    weights = base / "base.weights"
    replacement = base / "new.weights"
    replacement.write_bytes(weights.read_bytes())  # same bytes, new inode
    os.replace(replacement, weights)
    with pytest.raises(BaseError, match="base.weights changed"):
        runtime.load_pack(make_pack(tmp_path / "a.kmp", runtime.base, signing_key))


def test_unchanged_base_loads_again_and_again(base, signing_key, tmp_path):
    trusted = {keys.key_id(signing_key): signing_key.public_key()}
    runtime = Runtime(base, trusted)
    for task in ("a", "b", "a"):
        runtime.load_pack(make_pack(tmp_path / f"{task}.kmp", runtime.base, signing_key, task=task))
    assert runtime.base.input_hw == (SIZE, SIZE)
