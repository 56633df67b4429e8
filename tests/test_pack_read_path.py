"""The reader's one-pass path (tensors.read_tensors, codec.is_canonical) refuses what the checks one
by one refuse, with their messages: a bad value anywhere names its tensor, in the usual order.

Packs are changed at the msgpack level and re-signed with the trusted test key (the helpers of
test_pack_limits), so only the reader stands between the value and the device.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from device_runtime.errors import MalformedPackError, PackLimitError
from device_runtime.pack import BnEntry, Layer, build_pack, decode_tensors, read_pack
from device_runtime.pack.codec import is_canonical, pack_canonical
from device_runtime.pack.records import BN_TENSORS
from device_runtime.pack.tensors import TensorEntry, read_tensors

from test_pack_limits import KEY, NOW, TRUSTED, body_of, refused, resign, with_array
from test_packformat import make_body

# make_body's tensors in index order: 2 km layers x (w1, b1, w2, b2), the head, one BN layer
NAMES = ([f"layer features.0.0: {n}" for n in ("w1", "b1", "w2", "b2")]
         + [f"layer features.1.0: {n}" for n in ("w1", "b1", "w2", "b2")]
         + ["head weight", "head bias"] + [f"BN layer features.0.1: {n}" for n in BN_TENSORS])
POSITIONS = {"first": lambda a: (0,) * a.ndim, "middle": lambda a: np.unravel_index(a.size // 2, a.shape),
             "last": lambda a: tuple(n - 1 for n in a.shape)}


@pytest.fixture(scope="module", params=["float32", "float16"])
def stored(request) -> dict:
    return body_of(build_pack(make_body(), KEY, storage_dtype=request.param))


def copy(body: dict) -> dict:
    return msgpack.unpackb(msgpack.packb(body, use_bin_type=True), raw=False)


def set_value(body: dict, index: int, position: str, value: float) -> dict:
    def change(array):
        array[POSITIONS[position](array)] = value
    with np.errstate(over="ignore"):  # 2e6 is inf in float16
        return with_array(body, index, change)


@pytest.mark.parametrize("value, problem", [
    (np.nan, "values that are not finite"), (np.inf, "values that are not finite"),
    (-np.inf, "values that are not finite"), (2e6, None), (-1.5e6, None),
])
def test_a_bad_value_in_any_tensor_is_refused_naming_that_tensor(stored, value, problem):
    assert len(stored["tensors"]) == len(NAMES)
    if problem is None:  # beyond the bound in float32; float16 cannot hold it at all
        problem = "values beyond +-1e+06" if stored["storage_dtype"] == "float32" else "values that are not finite"
    for index, name in enumerate(NAMES):
        for position in POSITIONS:
            message = refused(resign(set_value(stored, index, position, value)), PackLimitError)
            assert message == f"pack: {name} has {problem} in float32", (index, position, message)


def test_values_at_the_bound_are_accepted(stored):
    """1e6 itself is allowed (|value| <= MAX_ABS_VALUE), in float32; float16's largest is 65504."""
    largest = 1e6 if stored["storage_dtype"] == "float32" else 65504.0
    body = stored
    for index in range(len(NAMES)):
        if index != len(NAMES) - 1:  # running_var must stay >= 0
            body = set_value(body, index, "first", -largest)
        body = set_value(body, index, "last", largest)
    pack = read_pack(resign(body), TRUSTED, now=NOW)
    assert pack.head["weight"][0, 0] == -largest and pack.bn[0].tensors["running_var"][-1] == largest


def test_the_first_fault_in_record_order_is_the_one_named(stored):
    """A bad value does not jump the queue: the records are checked in their usual order."""
    body = copy(stored)
    body["layers"][0][0] = "bad name"
    body = set_value(body, len(NAMES) - 1, "last", np.nan)  # running_var of the BN layer
    assert "layer name must match" in refused(resign(body), PackLimitError)
    body = set_value(copy(stored), 5, "middle", np.inf)  # features.1.0: b1
    body["bn"][0] = "bad name"
    assert refused(resign(body), PackLimitError) == "pack: layer features.1.0: b1 has values that are not finite in float32"
    body = set_value(copy(stored), 0, "first", np.nan)
    body["tensors"][12][1] = [True]  # a later index entry that is not an int shape
    assert "tensors[12]: tensor shape dimensions must be ints" in refused(resign(body), PackLimitError)


def test_nonzero_padding_is_refused_wherever_it_is():
    body = make_body()  # odd float16 lengths: b1 (3) and the head bias (3) are followed by padding
    body["layers"][0]["tensors"].update(w1=np.ones((9, 3), np.float32), b1=np.ones(3, np.float32),
                                        w2=np.ones((3, 9), np.float32))
    body["modulator"]["kernel_hidden"] = 3
    km = body_of(build_pack(body, KEY, storage_dtype="float16"))
    ends = [offset + 2 * int(np.prod(shape)) for offset, shape in km["tensors"]]
    gaps = [(i + 1, end) for i, (end, (start, _)) in enumerate(zip(ends, km["tensors"][1:])) if start > end]
    assert len(gaps) >= 3
    for index, at in gaps:
        for byte in range(at, km["tensors"][index][0]):
            data = bytearray(km["data"])
            data[byte] = 0x3C  # 1.0 in float16's high byte: a fine value, but not padding
            message = refused(resign({**km, "data": bytes(data)}), MalformedPackError)
            assert message == f"pack: tensors[{index}] is preceded by padding that is not zero"


@pytest.mark.parametrize(
    "obj",
    [None, [0], [0, 2], [-4, [2]], [2, [2]], [0, []], [0, [1, 1, 1]], [0, [0]], [0, [True]],
     [0, [2**64 - 1, 0]], [0, [2**31]], [0, ["2"]], [0.0, [2]], [True, [2]], (0, [2]), [0, (2,)]],
)
def test_the_one_pass_refuses_every_index_entry_the_checks_refuse(obj):
    """read_tensors hands these back to the entry-by-entry checks (which give the message)."""
    blob = np.zeros(2, "<f4").tobytes()
    assert read_tensors([obj], blob, "float32") is None
    with pytest.raises(MalformedPackError):
        TensorEntry.from_msgpack(obj, "tensors[0]")
    assert read_tensors([[0, [2]]], blob, "float32")[0].shape == (2,)


@pytest.mark.parametrize("blob", [b"\0" * 4, b"\0" * 12, b"\0" * 9])
def test_the_one_pass_refuses_an_index_that_does_not_tile_the_blob(blob):
    assert read_tensors([[0, [2]]], blob, "float32") is None
    with pytest.raises(MalformedPackError):
        decode_tensors([TensorEntry(0, (2,))], blob, "float32")


@pytest.mark.parametrize("storage_dtype", ["float32", "float16"])
def test_the_one_pass_gives_the_arrays_decode_tensors_gives(storage_dtype):
    body = body_of(build_pack(make_body(), KEY, storage_dtype=storage_dtype))
    fast = read_tensors(body["tensors"], body["data"], storage_dtype)
    slow = decode_tensors([TensorEntry(*e) for e in body["tensors"]], body["data"], storage_dtype)
    assert len(fast) == len(slow) == len(NAMES)
    for got, want in zip(fast, slow):
        assert got.dtype == np.float32 and not got.flags.writeable and got.flags.c_contiguous
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_records_built_outside_the_reader_still_scan_their_values():
    """Only the reader's own arrays skip the per-tensor scan; a read-only float32 array from
    elsewhere (the no-copy case) is still bounded, by the writer and the records alike."""
    bad = np.array([1.0, np.nan, 2.0], np.float32)
    bad.flags.writeable = False
    with pytest.raises(PackLimitError, match="BN layer bn1: bias has values that are not finite"):
        BnEntry("bn1", {"weight": np.ones(3, np.float32), "bias": bad, "running_mean": np.zeros(3, np.float32),
                        "running_var": np.ones(3, np.float32)})
    big = np.full((3, 2), 2e6, np.float32)
    big.flags.writeable = False
    with pytest.raises(PackLimitError, match=r"layer c: w1 has values beyond \+-1e\+06"):
        Layer("c", "km", "channel", "relu", 1.0, {"w1": big, "b1": np.zeros(2), "w2": np.zeros((2, 3)),
                                                  "b2": np.zeros(3)})
    body = make_body()
    body["head"]["bias"] = bad
    with pytest.raises(PackLimitError, match="head bias has values that are not finite"):
        build_pack(body, KEY)


@pytest.mark.parametrize("size", [0, 1, 255, 256, 65535, 65536, 70000])
def test_is_canonical_agrees_with_re_encoding(size):
    """The in-place comparison says yes exactly when pack_canonical's bytes are the bytes read."""
    obj = {"a": 1, "blob": bytes(range(256)) * (size // 256) + bytes(size % 256), "z": [1.5, "x"]}
    data = pack_canonical(obj)
    assert is_canonical(data, obj, "blob")
    tail = pack_canonical("z") + pack_canonical([1.5, "x"])
    changed = [data + b"\0", data[:-1], data.replace(b"\xa1z", b"\xd9\x01z"),  # str 8 for a fixstr
               data[:-len(tail)] + b"\xc0" + data[-len(tail):],  # a byte between the blob and the rest
               msgpack.packb(dict(reversed(obj.items())), use_bin_type=True),
               msgpack.packb({**obj, "z": [1.5, "y"]}, use_bin_type=True)]
    for position in {0, 5, len(data) // 2, len(data) - 1}:
        flipped = bytearray(data)
        flipped[position] ^= 1
        changed.append(bytes(flipped))
    for other in changed:
        assert is_canonical(other, obj, "blob") is (pack_canonical(obj) == other)
        assert not is_canonical(other, obj, "blob")
    widened = msgpack.packb({"a": 1, "blob": b"", "z": [1.5, "x"]}, use_bin_type=True)
    if size == 0:  # an empty bin written as bin 16: same value, other bytes
        assert not is_canonical(widened.replace(b"\xc4\x00", b"\xc5\x00\x00"), obj, "blob")
