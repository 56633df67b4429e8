"""Signed but hostile packs (a stolen key, a buggy host): every format-side limit refuses them.

Each case starts from a valid pack, changes one thing at the msgpack level, and re-signs it with
the trusted test key, so only the limit itself stands between the value and the device. Every
refusal must be a one-line PackError naming the pack (exit 2 at the CLI), never another exception.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import msgpack
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_runtime.errors import ExpiredPackError, MalformedPackError, PackError, PackLimitError
from device_runtime.keys import key_id
from device_runtime.pack import build_pack, read_pack, seal
from device_runtime.pack.tensors import TensorEntry

from test_packformat import make_body

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
TRUSTED = {key_id(KEY): KEY.public_key()}
NOW = datetime(2026, 11, 28, 12, tzinfo=timezone.utc)
# index positions in make_body's pack: 2 km layers x 4 tensors, head (weight, bias), one BN layer
W1, HEAD_WEIGHT, RUNNING_VAR = 0, 8, 13


def lora_body() -> dict:
    body = make_body()
    body.update(method="lora", modulator=None, layers=[{
        "name": "features.0.0", "adapter": "lora", "kind": "", "activation": "", "scale": 2.0,
        "tensors": {"a": np.ones((2, 27), np.float32), "b": np.zeros((16, 2), np.float32)},
    }])
    return body


def body_of(data: bytes) -> dict:
    return msgpack.unpackb(msgpack.unpackb(data, raw=False)["payload"], raw=False)


def resign(body: dict) -> bytes:
    return seal(msgpack.packb(body, use_bin_type=True), KEY)


def with_array(body: dict, index: int, change) -> dict:
    """The body with tensor ``index``'s bytes rewritten by ``change`` (no writer checks)."""
    entry = TensorEntry(*body["tensors"][index])
    dtype = {"float32": "<f4", "float16": "<f2"}[body["storage_dtype"]]
    size = entry.nbytes(body["storage_dtype"])
    array = np.frombuffer(body["data"], dtype, size // np.dtype(dtype).itemsize, entry.offset).copy()
    array = array.reshape(entry.shape)
    change(array)
    data = bytearray(body["data"])
    data[entry.offset:entry.offset + size] = array.astype(dtype).tobytes()
    return {**body, "data": bytes(data)}


def refused(data: bytes, error=PackError, now=NOW) -> str:
    with pytest.raises(error) as exc_info:
        read_pack(data, TRUSTED, now=now)
    message = str(exc_info.value)
    assert message.startswith("pack: ") and "\n" not in message and len(message) < 400, message
    return message


@pytest.fixture(scope="module")
def km_body() -> dict:
    return body_of(build_pack(make_body(), KEY))


@pytest.fixture(scope="module")
def lora_pack_body() -> dict:
    return body_of(build_pack(lora_body(), KEY))


def test_the_unchanged_pack_is_accepted(km_body, lora_pack_body):
    assert read_pack(resign(km_body), TRUSTED, now=NOW).task == "birds"
    assert read_pack(resign(lora_pack_body), TRUSTED, now=NOW).method == "lora"


def _set(path, value):
    def change(body):
        target = body
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
        return body
    return change


HOSTILE = {
    # floats must stay finite and in range after float32 conversion
    "km-scale-1e-300": _set(("layers", 0, 2), 1e-300),
    "km-scale-5e-324": _set(("layers", 0, 2), 5e-324),
    "km-scale-zero": _set(("layers", 0, 2), 0.0),
    "km-scale-negative": _set(("layers", 0, 2), -0.25),
    "km-scale-int": _set(("layers", 0, 2), 1),
    "weights-3e38": lambda b: with_array(b, W1, lambda a: a.__setitem__((0, 0), 3e38)),
    "head-3e38": lambda b: with_array(b, HEAD_WEIGHT, lambda a: a.__setitem__((0, 0), -3e38)),
    "bn-variance-negative": lambda b: with_array(b, RUNNING_VAR, lambda a: a.__setitem__(0, -1.0)),
    "weights-nan": lambda b: with_array(b, W1, lambda a: a.__setitem__((0, 0), np.nan)),
    # preprocessing: ints really ints, bounded; mean / std sane; interpolation a known name
    "mean-3e38": _set(("preprocess", "mean"), [3e38, 0.5, 0.5]),
    "std-zero": _set(("preprocess", "std"), [0.0, 0.25, 0.25]),
    "std-tiny": _set(("preprocess", "std"), [1e-30, 0.25, 0.25]),
    "mean-two-values": _set(("preprocess", "mean"), [0.5, 0.5]),
    "resize-string": _set(("preprocess", "resize"), "32"),
    "resize-float": _set(("preprocess", "resize"), 32.9),
    "resize-inf": _set(("preprocess", "resize"), float("inf")),
    "resize-1e5": _set(("preprocess", "resize"), 100_000),
    "resize-bool": _set(("preprocess", "resize"), True),
    "crop-over-resize": _set(("preprocess", "crop"), 64),
    "crop-zero": _set(("preprocess", "crop"), 0),
    "interpolation-list": _set(("preprocess", "interpolation"), ["bilinear"]),
    "interpolation-unknown": _set(("preprocess", "interpolation"), "lanczos"),
    "preprocess-extra-key": _set(("preprocess", "gamma"), 2.2),
    # tensor index
    "shape-2**64-1-by-0": _set(("tensors", 0), [0, [2**64 - 1, 0]]),
    "shape-zero": _set(("tensors", 0), [0, [0, 4]]),
    "shape-three-dims": _set(("tensors", 0), [0, [9, 4, 1]]),
    "offset-unaligned": _set(("tensors", 1), [145, [4]]),
    "tensor-with-dtype": _set(("tensors", 0), [0, [9, 4], "float16"]),
    "storage-dtype-float64": _set(("storage_dtype",), "float64"),
    "storage-dtype-map": _set(("storage_dtype",), {}),  # found by the fuzzer (was a TypeError)
    "method-map": _set(("method",), {"km": 1}),
    # hidden sizes and records
    "kernel-hidden-huge": _set(("modulator", "kernel_hidden"), 10**6),
    "kernel-hidden-disagrees": _set(("modulator", "kernel_hidden"), 5),
    "layer-kind-auto": _set(("layers", 0, 1), "auto"),
    "layer-name-traversal": _set(("layers", 0, 0), "../features"),
    "layer-extra-field": _set(("layers", 0), ["features.0.0", "kernel", 0.25, "relu"]),
    # names and labels: bounded and printable
    "task-traversal": _set(("task",), "../../evil_task"),
    "task-absolute": _set(("task",), "/etc"),
    "task-1MiB": _set(("task",), "t" * 2**20),
    "task-newline": _set(("task",), "birds\nOK"),
    "label-ansi": _set(("labels", 0), "\x1b[31mred"),
    "label-newline": _set(("labels", 0), "a\nb"),
    "label-bidi": _set(("labels", 0), "\u202egnp.exe"),
    "label-too-long": _set(("labels", 0), "x" * 129),
    "labels-empty": _set(("labels",), []),
    "base-id-not-hex": _set(("base_id",), "not-a-base-id"),
    # times: one strict spelling
    "created-space": _set(("created",), "2026-11-28 02:10:00"),
    "created-offset": _set(("created",), "2026-11-28T02:10:00+00:00"),
    "created-not-a-date": _set(("created",), "2026-02-30T00:00:00Z"),
    "expires-before-created": _set(("expires",), "2026-01-01T00:00:00Z"),
    # informational maps: finite, printable, bounded
    "metrics-nan": _set(("metrics", "host_val_accuracy"), float("nan")),
    "metrics-inf": _set(("metrics", "host_val_accuracy"), float("inf")),
    "trainer-bin": _set(("trainer", "blob"), b"\0"),
    "trainer-escape": _set(("trainer", "note"), "\x1b]0;pwned\x07"),
    "trainer-deep": _set(("trainer", "deep"), [[[[[[1]]]]]]),
    "pack-version-zero": _set(("pack_version",), 0),
    "modulator-on-lora": None,  # below
}


@pytest.mark.parametrize("case", [c for c in HOSTILE if HOSTILE[c] is not None])
def test_signed_hostile_values_are_refused(km_body, case):
    body = HOSTILE[case](msgpack.unpackb(msgpack.packb(km_body, use_bin_type=True), raw=False))
    refused(resign(body), MalformedPackError)


@pytest.mark.parametrize("scale", [1e300, 0.0, -1.0, 1e5])
def test_lora_scale_is_bounded(lora_pack_body, scale):
    body = dict(lora_pack_body, layers=[["features.0.0", "", scale]])
    assert "scale" in refused(resign(body), PackLimitError)


def test_lora_pack_with_a_modulator_is_refused(lora_pack_body, km_body):
    refused(resign(dict(lora_pack_body, modulator=km_body["modulator"])), PackLimitError)


def _accepted(call) -> bool:
    try:
        call()
    except (PackError, ValueError):
        return False
    return True


@pytest.mark.parametrize("field, value, accepted", [
    ("mean", [10.0, 0.5, 0.5], True), ("mean", [-10.5, 0.5, 0.5], False),
    ("std", [10.0, 0.25, 0.25], True), ("std", [10.5, 0.25, 0.25], False), ("std", [0.0009, 0.25, 0.25], False),
    ("resize", 4096, True), ("resize", 4097, False),
    ("interpolation", "bicubic", True), ("interpolation", "lanczos", False),
])
def test_a_pack_and_a_base_manifest_follow_one_preprocessing_rule(km_body, field, value, accepted):
    """The bounds are written once (device_runtime.limits): what a pack may carry, a base may too."""
    from device_runtime.preprocess import check_spec

    body = msgpack.unpackb(msgpack.packb(km_body, use_bin_type=True), raw=False)
    body["preprocess"][field] = value
    assert _accepted(lambda: read_pack(resign(body), TRUSTED, now=NOW)) is accepted
    assert _accepted(lambda: check_spec(body["preprocess"])) is accepted


@pytest.mark.parametrize("name, accepted", [
    ("a" * 64, True), ("a" * 65, False), ("birds.v2_x-1", True), ("-birds", False), (".birds", False),
    ("bird s", False), ("vögel", False),
])
def test_a_pack_and_the_host_follow_one_task_name_rule(km_body, name, accepted):
    """`km-edge train --task NAME` and a pack's task: the same rule (device_runtime.text)."""
    from device_runtime.text import check_task_name

    assert _accepted(lambda: read_pack(resign(dict(km_body, task=name)), TRUSTED, now=NOW)) is accepted
    assert _accepted(lambda: check_task_name(name)) is accepted


def test_the_writer_refuses_the_same_values_with_the_same_message():
    """One validator: build_pack refuses a hostile value with the reader's own sentence."""
    body = make_body()
    body["layers"][0]["scale"] = 1e-300
    with pytest.raises(PackLimitError) as writer:
        build_pack(body, KEY)
    km = body_of(build_pack(make_body(), KEY))
    km["layers"][0][2] = 1e-300
    assert refused(resign(km), PackLimitError) == f"pack: {writer.value}"
    body = make_body()
    body["bn"][0]["tensors"]["running_var"][0] = -1.0
    with pytest.raises(PackLimitError, match="running_var"):
        build_pack(body, KEY)


def test_duplicate_keys_are_refused(km_body):
    packer = msgpack.Packer(use_bin_type=True)
    body = packer.pack_map_header(len(km_body) + 1)
    for k, v in km_body.items():
        body += packer.pack(k) + packer.pack(v)
    body += packer.pack("task") + packer.pack("other")  # last-wins would make this the task
    assert "twice" in refused(seal(body, KEY), MalformedPackError)
    envelope = msgpack.unpackb(resign(km_body), raw=False)
    data = packer.pack_map_header(6)
    for k, v in envelope.items():
        data += packer.pack(k) + packer.pack(v)
    data += packer.pack("key_id") + packer.pack("0" * 16)
    assert "twice" in refused(data, MalformedPackError)


def test_non_canonical_encodings_are_refused(km_body):
    """Same values, other bytes (float 32 scales, a widened int): one encoding per pack."""
    refused(seal(msgpack.packb(km_body, use_bin_type=True, use_single_float=True), KEY), MalformedPackError)
    payload = msgpack.packb(km_body, use_bin_type=True)
    widened = payload.replace(b"\xacpack_version\x03", b"\xacpack_version\xce\x00\x00\x00\x03")
    assert widened != payload
    assert "canonical" in refused(seal(widened, KEY), MalformedPackError)
    reordered = dict(reversed(list(km_body.items())))
    assert "canonical" in refused(resign(reordered), MalformedPackError)


def test_padding_bytes_must_be_zero():
    body = make_body()
    body["layers"][0]["tensors"]["b1"] = np.ones(3, np.float32)  # odd fp16 length: padding follows
    body["layers"][0]["tensors"]["w1"] = np.ones((9, 3), np.float32)
    body["layers"][0]["tensors"]["w2"] = np.ones((3, 9), np.float32)
    body["modulator"]["kernel_hidden"] = 3
    km = body_of(build_pack(body, KEY, storage_dtype="float16"))
    entries = [TensorEntry(*e) for e in km["tensors"]]
    end = entries[1].offset + entries[1].nbytes("float16")
    assert entries[2].offset > end
    km["data"] = km["data"][:end] + b"\x01" + km["data"][end + 1:]
    refused(resign(km), MalformedPackError)


def test_expired_packs_are_refused_after_expiry_only():
    body = make_body()
    body["expires"] = "2026-12-01T00:00:00Z"
    data = build_pack(body, KEY)
    assert read_pack(data, TRUSTED, now=NOW).expires == "2026-12-01T00:00:00Z"
    message = refused(data, ExpiredPackError, now=datetime(2026, 12, 1, tzinfo=timezone.utc))
    assert "expired at 2026-12-01T00:00:00Z" in message
    body["expires"] = datetime(2027, 1, 1, tzinfo=timezone.utc)  # the writer takes datetimes too
    assert read_pack(build_pack(body, KEY), TRUSTED, now=NOW).expires == "2027-01-01T00:00:00Z"


def test_fp16_pack_is_at_most_55_percent_of_fp32_on_the_demo_base():
    """The demo base's real layer shapes (KM auto k8/c1, BatchNorm trained, 8 labels)."""
    pytest.importorskip("torch")
    from km_edge.methods import MethodConfig
    from km_edge.models import build_base
    from km_edge.pack import task_tensors
    from km_edge.methods import build_task_model

    config = MethodConfig("km", train_bn=True)
    model = build_task_model(build_base("demo", None, input_size=32), 8, config, 0)
    body = {**make_body(), "labels": list("ACEHKMRX"), "modulator": config.modulator.to_dict(),
            **task_tensors(model, config)}
    body["trainer"] = {"epochs": 10, "batch_size": 32, "lr": 0.003, "seed": 0, "modulator": "auto",
                       "kernel_hidden": 8, "channel_hidden": 1, "activation": "gelu", "weight_decay": 1e-4}
    fp32, fp16 = len(build_pack(body, KEY)), len(build_pack(body, KEY, storage_dtype="float16"))
    assert fp16 <= 0.55 * fp32, (fp16, fp32, fp16 / fp32)


def test_cli_verify_refuses_a_signed_hostile_pack_with_exit_2(tmp_path, km_body):
    km_body = dict(km_body, labels=["\x1b[2J", *km_body["labels"][1:]])
    (tmp_path / "hostile.kmp").write_bytes(resign(km_body))
    (tmp_path / "test.pub").write_bytes(KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    km_edge = str(Path(sys.executable).with_name("km-edge"))
    result = subprocess.run([km_edge, "verify", "hostile.kmp", "--pubkey", "test.pub"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "hostile.kmp" in lines[0] and "\x1b" not in result.stderr
