"""Promises of the pack format (packs/README.md): round trip, summary, and every refusal."""

from __future__ import annotations

import json
import os
import stat

import msgpack
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_runtime.errors import (
    BadSignatureError,
    MalformedPackError,
    PackError,
    UnknownFormatError,
    UntrustedKeyError,
)
from device_runtime.keys import key_id
from device_runtime.pack import (
    FORMAT_VERSION,
    MAGIC,
    MAX_PACK_BYTES,
    Layer,
    Pack,
    TensorEntry,
    build_pack,
    decode_tensors,
    encode_tensors,
    read_pack,
    seal,
    write_pack,
)

def make_body(n_classes: int = 3, feature_size: int = 16, seed: int = 0) -> dict:
    """A small, complete km body: a kernel layer, a channel layer, a head, one BN override.
    The same arguments give the same tensors, whatever ran before."""
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "task": "birds",
        "pack_version": 3,
        "created": "2026-11-28T02:10:00Z",
        "base_id": "ab" * 32,
        "labels": [f"class{i}" for i in range(n_classes)],
        "preprocess": {
            "resize": 32,
            "crop": 32,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25],
            "interpolation": "bilinear",
        },
        "method": "km",
        "modulator": {
            "kind": "auto",
            "kernel_hidden": 4,
            "channel_hidden": 2,
            "activation": "relu",
        },
        "layers": [
            {
                "name": "features.0.0",
                "adapter": "km",
                "kind": "kernel",
                "activation": "relu",
                "scale": 0.25,
                "tensors": {"w1": rand(9, 4), "b1": rand(4), "w2": rand(4, 9), "b2": rand(9)},
            },
            {
                "name": "features.1.0",
                "adapter": "km",
                "kind": "channel",
                "activation": "relu",
                "scale": 0.5,
                "tensors": {"w1": rand(8, 2), "b1": rand(2), "w2": rand(2, 8), "b2": rand(8)},
            },
        ],
        "head": {"weight": rand(n_classes, feature_size), "bias": rand(n_classes)},
        "bn": [
            {
                "name": "features.0.1",
                "tensors": {
                    "weight": rand(8),
                    "bias": rand(8),
                    "running_mean": rand(8),
                    "running_var": np.abs(rand(8)),
                },
            }
        ],
        "metrics": {"host_val_accuracy": 0.93},
        "trainer": {"epochs": 2, "lr": 0.01, "method": "km", "augment": True, "seed": None},
    }


@pytest.fixture(scope="module")
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def trusted(signing_key) -> dict:
    return {key_id(signing_key): signing_key.public_key()}


@pytest.fixture(scope="module")
def pack_bytes(signing_key) -> bytes:
    return build_pack(make_body(), signing_key)


def unseal(data: bytes) -> tuple[dict, dict]:
    """Envelope and body of a pack, for tests that forge packs by hand."""
    envelope = msgpack.unpackb(data, raw=False)
    return envelope, msgpack.unpackb(envelope["payload"], raw=False)


def refusal(exc_info, name: str | None = None) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message and "\r" not in message
    if name is not None:
        assert message.startswith(f"{name}: "), message
    return message


# --- round trip -----------------------------------------------------------------------------
def test_round_trip_float32_is_exact(signing_key, trusted, pack_bytes):
    body = make_body()
    data = build_pack(body, signing_key)
    pack = read_pack(data, trusted)
    assert isinstance(pack, Pack)
    assert pack.format_version == FORMAT_VERSION and pack.key_id == key_id(signing_key)
    assert (pack.task, pack.pack_version, pack.created, pack.base_id) == (
        "birds",
        3,
        "2026-11-28T02:10:00Z",
        "ab" * 32,
    )
    assert pack.labels == body["labels"] and pack.preprocess == body["preprocess"]
    assert pack.method == "km" and pack.modulator == body["modulator"]
    assert pack.storage_dtype == "float32" and pack.n_bytes == len(data)
    assert pack.metrics == body["metrics"] and pack.trainer == body["trainer"]
    assert pack.expires is None
    for got, want in zip(pack.layers, body["layers"], strict=True):
        assert isinstance(got, Layer)
        assert {k: getattr(got, k) for k in ("name", "adapter", "kind", "activation", "scale")} == {
            k: want[k] for k in ("name", "adapter", "kind", "activation", "scale")
        }
        assert isinstance(got.scale, float)
        for name, array in want["tensors"].items():
            assert got.tensors[name].dtype == np.float32
            np.testing.assert_array_equal(got.tensors[name], array)
    for name in ("weight", "bias"):
        np.testing.assert_array_equal(pack.head[name], body["head"][name])
    assert pack.bn[0].name == "features.0.1"
    for name, array in body["bn"][0]["tensors"].items():
        np.testing.assert_array_equal(pack.bn[0].tensors[name], array)


def test_round_trip_float16_is_close_and_smaller(signing_key, trusted):
    body = make_body(n_classes=10, feature_size=256)
    fp32 = build_pack(body, signing_key, storage_dtype="float32")
    fp16 = build_pack(body, signing_key, storage_dtype="float16")
    assert len(fp16) <= 0.55 * len(fp32)
    pack = read_pack(fp16, trusted)
    assert pack.storage_dtype == "float16"
    np.testing.assert_allclose(pack.head["weight"], body["head"]["weight"], rtol=1e-3, atol=1e-3)
    assert pack.head["weight"].dtype == np.float32
    got = pack.layers[0].tensors["w1"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, body["layers"][0]["tensors"]["w1"], rtol=1e-3, atol=1e-3)
    assert pack.layers[0].scale == 0.25  # scales stay float64, not rounded to the storage dtype


def test_build_is_deterministic_and_created_defaults_to_utc_now(signing_key, trusted):
    body = make_body()
    assert build_pack(body, signing_key) == build_pack(body, signing_key)
    del body["created"]
    created = read_pack(build_pack(body, signing_key), trusted).created
    assert created.endswith("Z") and len(created) == len("2026-11-28T02:10:00Z")


def test_pack_files_round_trip_and_are_written_atomically(tmp_path, trusted, pack_bytes):
    path = write_pack(tmp_path / "packs" / "birds.kmp", pack_bytes)
    assert path.read_bytes() == pack_bytes
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["birds.kmp"]
    assert read_pack(path, trusted).n_bytes == len(pack_bytes)
    assert read_pack(str(path), trusted).task == "birds"


def test_summary_has_everything_but_tensor_data(trusted, pack_bytes):
    pack = read_pack(pack_bytes, trusted)
    summary = pack.summary()
    text = json.dumps(summary)  # JSON-serialisable
    assert len(text) < len(pack_bytes)
    assert json.loads(text) == summary
    for field in (
        "format_version",
        "key_id",
        "task",
        "pack_version",
        "created",
        "expires",
        "base_id",
        "labels",
        "preprocess",
        "method",
        "modulator",
        "storage_dtype",
        "metrics",
        "trainer",
        "n_bytes",
    ):
        assert summary[field] == getattr(pack, field), field
    assert summary["n_classes"] == 3
    assert summary["layers"][0] == {
        "name": "features.0.0",
        "adapter": "km",
        "kind": "kernel",
        "activation": "relu",
        "scale": 0.25,
        "tensors": {
            "w1": {"shape": [9, 4], "dtype": "float32"},
            "b1": {"shape": [4], "dtype": "float32"},
            "w2": {"shape": [4, 9], "dtype": "float32"},
            "b2": {"shape": [9], "dtype": "float32"},
        },
    }
    assert summary["head"] == {
        "weight": {"shape": [3, 16], "dtype": "float32"},
        "bias": {"shape": [3], "dtype": "float32"},
    }
    assert summary["bn"][0]["tensors"]["running_var"] == {"shape": [8], "dtype": "float32"}
    expected = (36 + 4 + 36 + 9) + (16 + 2 + 16 + 8) + (3 * 16 + 3) + 4 * 8
    assert pack.n_parameters() == summary["n_parameters"] == expected


def test_lora_head_and_bn_packs_round_trip(signing_key, trusted):
    body = make_body()
    body.update(method="lora", modulator=None, bn=[])
    body["layers"] = [
        {
            "name": "features.0.0",
            "adapter": "lora",
            "kind": "",
            "activation": "",
            "scale": 2.0,
            "tensors": {"a": np.ones((2, 27), np.float32), "b": np.zeros((16, 2), np.float32)},
        }
    ]
    pack = read_pack(build_pack(body, signing_key), trusted)
    assert pack.method == "lora" and pack.modulator is None and pack.bn == []
    assert pack.layers[0].tensors["a"].shape == (2, 27)
    for method in ("head", "bn"):
        body = make_body()
        body.update(method=method, modulator=None, layers=[])
        assert read_pack(build_pack(body, signing_key), trusted).method == method


# --- tensors --------------------------------------------------------------------------------
def test_tensors_are_one_aligned_little_endian_c_order_blob():
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    odd = np.array([1.5, -2.0, 3.25], np.float32)
    entries, blob = encode_tensors([odd, array.T], "float16")  # a transposed view is stored in C order
    assert entries == [TensorEntry(0, (3,)), TensorEntry(8, (3, 2))]  # 6 bytes, padded to 8
    assert blob == odd.astype("<f2").tobytes() + b"\0\0" + np.ascontiguousarray(array.T).astype("<f2").tobytes()
    back = decode_tensors(entries, blob, "float16")
    np.testing.assert_array_equal(back[0], odd)
    np.testing.assert_array_equal(back[1], array.T)
    entries, blob = encode_tensors([odd, array], "float32")
    views = decode_tensors(entries, blob, "float32")
    assert all(v.dtype == np.float32 and v.flags.aligned and not v.flags.writeable for v in views)


@pytest.mark.parametrize(
    "entries, blob",
    [
        ([TensorEntry(4, (1,))], b"\0" * 8),  # not where the previous tensor ends
        ([TensorEntry(0, (3,))], b"\0" * 8),  # runs past the blob
        ([TensorEntry(0, (1,))], b"\0" * 8),  # bytes no tensor uses
        ([], b"\0"),
    ],
)
def test_decode_tensors_refuses_an_index_that_does_not_tile_the_blob(entries, blob):
    with pytest.raises(MalformedPackError) as exc_info:
        decode_tensors(entries, blob, "float32")
    refusal(exc_info)


@pytest.mark.parametrize(
    "obj",
    [None, [0], [0, 2], [-4, [2]], [2, [2]], [0, []], [0, [1, 1, 1]], [0, [0]], [0, [True]],
     [0, [2**64 - 1, 0]], [0, [2**31]], [0, ["2"]], [0.0, [2]]],
)
def test_tensor_index_entries_are_bounded(obj):
    with pytest.raises(MalformedPackError) as exc_info:
        TensorEntry.from_msgpack(obj, "tensors[0]")
    refusal(exc_info)


def test_encode_tensors_refuses_bad_input():
    with pytest.raises(PackError):
        encode_tensors([np.zeros(2, np.float32)], "float64")
    with pytest.raises(PackError):
        encode_tensors([np.array([1e5], np.float32)], "float16")  # overflows to inf


# --- build_pack refuses bodies that are not packs (the reader's own checks) ------------------
@pytest.mark.parametrize(
    "change",
    [
        lambda b: b.pop("task"),
        lambda b: b.update(extra=1),
        lambda b: b.update(format_version=1),
        lambda b: b.update(pack_version=0),
        lambda b: b.update(pack_version=1.5),
        lambda b: b.update(labels=["a", "b"]),
        lambda b: b.update(labels=["a", "a", "b"]),
        lambda b: b.update(method="prune"),
        lambda b: b.update(modulator=None),
        lambda b: b.update(
            modulator={
                "kind": "diagonal",
                "kernel_hidden": 4,
                "channel_hidden": 2,
                "activation": "relu",
            }
        ),
        lambda b: b.update(created="yesterday"),
        lambda b: b.update(trainer={"out": object()}),
        lambda b: b["layers"][0].update(adapter="lora"),
        lambda b: b["layers"][0].update(kind="auto"),
        lambda b: b["layers"][0].update(scale=float("nan")),
        lambda b: b["layers"][0]["tensors"].pop("b2"),
        lambda b: b["layers"][1].update(name="features.0.0"),
        lambda b: b["head"].update(bias=np.zeros(4, np.float32)),
        lambda b: b["bn"][0]["tensors"].pop("running_var"),
    ],
)
def test_build_pack_refuses_invalid_bodies(signing_key, change):
    body = make_body()
    change(body)
    with pytest.raises(PackError):
        build_pack(body, signing_key)


def test_build_pack_refuses_unknown_storage_dtype(signing_key):
    with pytest.raises(PackError):
        build_pack(make_body(), signing_key, storage_dtype="int8")


# --- refusals when reading ------------------------------------------------------------------
def test_every_flipped_byte_is_refused(tmp_path, trusted, pack_bytes):
    n = len(pack_bytes)
    positions = sorted({0, n - 1, *np.linspace(0, n - 1, 200).astype(int).tolist()})
    seen = set()
    for position in positions:
        for mask in (0x01, 0xFF):
            data = bytearray(pack_bytes)
            data[position] ^= mask
            with pytest.raises(PackError) as exc_info:
                read_pack(bytes(data), trusted)
            refusal(exc_info, "pack")
            seen.add(type(exc_info.value))
    # the payload is most of the file: most flips must be caught by the signature
    assert BadSignatureError in seen and MalformedPackError in seen
    path = tmp_path / "birds.kmp"
    data = bytearray(pack_bytes)
    data[n // 2] ^= 0x10
    path.write_bytes(data)
    with pytest.raises(BadSignatureError) as exc_info:
        read_pack(path, trusted)
    assert (
        refusal(exc_info, "birds.kmp")
        == "birds.kmp: signature does not match (corrupt or tampered pack)"
    )


def test_truncated_packs_are_refused(tmp_path, trusted, pack_bytes):
    n = len(pack_bytes)
    for length in (1, 2, 10, 40, 100, n // 3, n // 2, n - 65, n - 64, n - 2, n - 1):
        path = tmp_path / "birds.kmp"
        path.write_bytes(pack_bytes[:length])
        with pytest.raises(MalformedPackError) as exc_info:
            read_pack(path, trusted)
        refusal(exc_info, "birds.kmp")


def test_trailing_bytes_are_refused(trusted, pack_bytes):
    with pytest.raises(MalformedPackError) as exc_info:
        read_pack(pack_bytes + b"\0", trusted)
    assert "trailing" in refusal(exc_info)


def test_empty_and_missing_files_are_refused(tmp_path, trusted):
    path = tmp_path / "empty.kmp"
    path.write_bytes(b"")
    with pytest.raises(MalformedPackError) as exc_info:
        read_pack(path, trusted)
    assert "empty" in refusal(exc_info, "empty.kmp")
    with pytest.raises(MalformedPackError) as exc_info:
        read_pack(b"", trusted)
    refusal(exc_info, "pack")
    with pytest.raises(MalformedPackError) as exc_info:
        read_pack(tmp_path / "missing.kmp", trusted)
    refusal(exc_info, "missing.kmp")
    with pytest.raises(MalformedPackError) as exc_info:
        read_pack(tmp_path, trusted, name="dir")
    refusal(exc_info, "dir")


@pytest.mark.parametrize(
    "content",
    [
        np.random.default_rng(11).integers(0, 256, 1000, dtype=np.uint8).tobytes(),
        bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8)),
        b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10\0\0\0\x10\x08\x02\0\0\0",
        msgpack.packb(
            {"format_version": 1, "key_id": "0" * 16, "payload": b"x", "signature": b"s" * 64}
        ),
        msgpack.packb({"magic": "other-format", "format_version": 1}),
        msgpack.packb([MAGIC, 1, "0" * 16, b"", b""]),
        msgpack.packb("km-edge-pack"),
        json.dumps({"magic": MAGIC, "format_version": 1}).encode(),
        b"\xc1",
        b"\x91" * 5000,
        b"\xdd\xff\xff\xff\xff",
        b"\xc6\xff\xff\xff\xff",
        b"\xd6\xff\0\0\0\0",
    ],
    ids=[
        "random",
        "random-long",
        "png",
        "map-without-magic",
        "wrong-magic",
        "array",
        "string",
        "json",
        "never-used-byte",
        "deep-nesting",
        "huge-array",
        "huge-bin",
        "timestamp-ext",
    ],
)
def test_files_that_are_not_packs_are_refused(tmp_path, trusted, content):
    path = tmp_path / "notapack.kmp"
    path.write_bytes(content)
    with pytest.raises(MalformedPackError) as exc_info:
        read_pack(path, trusted)
    refusal(exc_info, "notapack.kmp")


def test_envelope_with_wrong_fields_is_refused(signing_key, trusted, pack_bytes):
    envelope, _ = unseal(pack_bytes)
    for change in (
        lambda e: e.pop("signature"),
        lambda e: e.update(extra=1),
        lambda e: e.update(format_version="1"),
        lambda e: e.update(format_version=True),
        lambda e: e.update(key_id=key_id(signing_key).upper()),
        lambda e: e.update(key_id=b"0123456789abcdef"),
        lambda e: e.update(payload="text"),
        lambda e: e.update(signature=e["signature"][:63]),
    ):
        forged = dict(envelope)
        change(forged)
        with pytest.raises(MalformedPackError) as exc_info:
            read_pack(msgpack.packb(forged, use_bin_type=True), trusted)
        refusal(exc_info)


def test_unknown_format_version_is_refused(tmp_path, signing_key, trusted, pack_bytes):
    _, body = unseal(pack_bytes)
    body["format_version"] = 3
    data = seal(msgpack.packb(body, use_bin_type=True), signing_key, format_version=3)
    path = tmp_path / "future.kmp"
    path.write_bytes(data)
    with pytest.raises(UnknownFormatError) as exc_info:
        read_pack(path, trusted)
    assert "version 3" in refusal(exc_info, "future.kmp")
    # a future format may change the envelope too; it is still named as an unknown format
    envelope, _ = unseal(data)
    envelope["compression"] = "zstd"
    with pytest.raises(UnknownFormatError):
        read_pack(msgpack.packb(envelope, use_bin_type=True), trusted)


def test_format_1_packs_are_refused_with_the_way_out(signing_key, trusted, pack_bytes):
    _, body = unseal(pack_bytes)
    with pytest.raises(UnknownFormatError) as exc_info:
        read_pack(seal(msgpack.packb(body, use_bin_type=True), signing_key, format_version=1), trusted)
    message = refusal(exc_info, "pack")
    assert "version 1" in message and "km-edge pack" in message


def test_pack_signed_by_an_untrusted_key_is_refused(tmp_path, trusted):
    stranger = Ed25519PrivateKey.generate()
    path = tmp_path / "birds.kmp"
    write_pack(path, build_pack(make_body(), stranger))
    with pytest.raises(UntrustedKeyError) as exc_info:
        read_pack(path, trusted)
    assert key_id(stranger) in refusal(exc_info, "birds.kmp")
    with pytest.raises(UntrustedKeyError) as exc_info:
        read_pack(path, {})
    refusal(exc_info, "birds.kmp")
    # trusting the stranger makes it readable
    assert read_pack(path, {key_id(stranger): stranger.public_key()}).task == "birds"


def test_pack_claiming_a_trusted_key_but_signed_by_another_is_refused(
    signing_key, trusted, pack_bytes
):
    stranger = Ed25519PrivateKey.generate()
    envelope, _ = unseal(pack_bytes)
    envelope["signature"] = stranger.sign(envelope["payload"])
    with pytest.raises(BadSignatureError) as exc_info:
        read_pack(msgpack.packb(envelope, use_bin_type=True), trusted)
    refusal(exc_info)


def resealed(body: dict, signing_key) -> bytes:
    return seal(msgpack.packb(body, use_bin_type=True), signing_key)


@pytest.mark.parametrize(
    "field, value",
    [
        ("format_version", 3),
        ("format_version", True),
        ("key_id", "0123456789abcdef"),
        ("key_id", None),
    ],
)
def test_body_that_disagrees_with_the_envelope_is_refused(
    signing_key, trusted, pack_bytes, field, value
):
    _, body = unseal(pack_bytes)
    body[field] = value
    with pytest.raises(MalformedPackError) as exc_info:
        read_pack(resealed(body, signing_key), trusted)
    assert field in refusal(exc_info)


@pytest.mark.parametrize(
    "change",
    [
        lambda b: b.pop("labels"),
        lambda b: b.update(unknown=1),
        lambda b: b.update(pack_version=0),
        lambda b: b.update(labels=["only-one"]),
        lambda b: b.update(storage_dtype="int8"),
        lambda b: b.update(metrics={"blob": b"\0"}),
        lambda b: b.update(preprocess=[]),
        lambda b: b.update(data=b["data"][:-1]),
        lambda b: b["tensors"][0].__setitem__(1, [9, 5]),
        lambda b: b["layers"][0].__setitem__(2, "0.25"),
        lambda b: b["tensors"].pop(),
        lambda b: b.update(layers={}),
        lambda b: b.update(bn=[{"name": "x"}]),
    ],
)
def test_signed_but_malformed_bodies_are_refused(signing_key, trusted, pack_bytes, change):
    _, body = unseal(pack_bytes)
    change(body)
    with pytest.raises(MalformedPackError) as exc_info:
        read_pack(resealed(body, signing_key), trusted)
    refusal(exc_info)


def test_signed_body_that_is_not_msgpack_is_refused(signing_key, trusted):
    for payload in (b"", b"\xc1", msgpack.packb({"a": 1}) + b"x", msgpack.packb([1, 2])):
        with pytest.raises(MalformedPackError) as exc_info:
            read_pack(seal(payload, signing_key), trusted)
        refusal(exc_info)


def test_oversized_file_is_refused_unread(tmp_path, trusted):
    path = tmp_path / "huge.kmp"
    with open(path, "wb") as handle:
        handle.truncate(MAX_PACK_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(MalformedPackError) as exc_info:
        read_pack(path, trusted)
    assert "512 MiB" in refusal(exc_info, "huge.kmp")


def test_signed_body_nested_too_deeply_is_refused(signing_key, trusted, pack_bytes):
    _, body = unseal(pack_bytes)
    body["trainer"] = {"x": 0}
    payload = msgpack.packb(body, use_bin_type=True)
    deep = b"\x81\xa1x" + b"\x91" * 1000 + b"\x90"  # {"x": [[[...]]]}, 1000 levels
    payload = payload.replace(msgpack.packb({"x": 0}), deep)
    with pytest.raises(MalformedPackError) as exc_info:
        read_pack(seal(payload, signing_key), trusted)
    assert "nested" in refusal(exc_info)
