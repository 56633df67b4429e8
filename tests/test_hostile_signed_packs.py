"""Validly signed packs that are hostile (a stolen key, a buggy host): refused, never used.

Each pack is built with the ordinary writer (``device_runtime.pack.build_pack``) and a test key, for the
tiny hand-built base of ``test_device_runtime``. The runtime must refuse it with a ``PackError``
subclass and one line, before allocating anything sized by the pack, and leave the active pack
untouched. Where a format-side check could refuse the same pack earlier, the test asks only for a
``PackError``; the runtime-side checks (sizes relative to the base, finite kernels and scores, crop
vs the graph) are asked for by class.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image

from device_runtime import keys, km, limits
from device_runtime.errors import (
    KmEdgeError,
    NonFiniteError,
    PackError,
    PackLimitError,
    ShapeMismatchError,
)
from device_runtime.pack.limits import MAX_ABS_VALUE
from device_runtime.runtime import Runtime

from test_device_runtime import PREPROCESS, SIZE, make_pack, random_modulators

KM_EDGE = str(Path(sys.executable).with_name("km-edge"))


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    keys.generate_keypair(folder)
    return folder


@pytest.fixture(scope="module")
def signing_key(key_dir) -> Ed25519PrivateKey:
    return keys.load_private_key(key_dir / "signing.key")


@pytest.fixture()
def runtime(tiny_base_dir, signing_key):
    return Runtime(tiny_base_dir, {keys.key_id(signing_key): signing_key.public_key()})


def modulators(runtime, hidden: int, seed: int = 2) -> list[dict]:
    return random_modulators(runtime.base, seed=seed, hidden=hidden)


def refused(runtime, signing_key, path: Path, error=PackError, probe: bool = False) -> str:
    """Load ``path`` on a runtime with a good pack active; assert the refusal contract."""
    good = runtime.load_pack(make_pack(path.with_name("good.kmp"), runtime.base,
                                       signing_key, task="good"))
    with pytest.raises(error) as caught:
        runtime.load_pack(path, probe=probe)
    message = str(caught.value)
    assert isinstance(caught.value, PackError) and "\n" not in message and path.name in message
    assert runtime.active is good  # nothing of it is used
    with pytest.raises(PackError):
        runtime.load_pack(path, probe=probe)  # refused again: nothing of it was kept
    assert runtime.load_pack(good.path).pack.task == "good"
    return message


# --- sizes and work relative to the base -----------------------------------------------------
def test_modulator_bigger_than_the_base_is_refused_before_rebuilding(runtime, signing_key, tmp_path):
    # hidden 30 on every layer: ~1,700 numbers for a base of 276 conv parameters
    path = make_pack(tmp_path / "wide.kmp", runtime.base, signing_key,
                     layers=modulators(runtime, hidden=30))
    message = refused(runtime, signing_key, path, PackLimitError)
    assert "conv parameters" in message
    with pytest.raises(PackLimitError):
        runtime.check_pack(path)  # `verify` refuses it too, nothing rebuilt


def test_hidden_size_is_bounded_per_input_length(runtime, signing_key, tmp_path):
    layers = modulators(runtime, hidden=2)
    # the 1x1 conv's channel modulator (vectors of 6) with 97 hidden units: 97 > 16 x 6
    rng = np.random.default_rng(0)
    layers[2] = _as_mapping(layers[2], tensors={n: rng.normal(0, 0.1, s).astype(np.float32)
                                                for n, s in km.modulator_shapes(6, 97).items()})
    path = make_pack(tmp_path / "deep.kmp", runtime.base, signing_key, layers=layers)
    assert "hidden size 97" in refused(runtime, signing_key, path, PackLimitError)


def test_rebuild_work_is_bounded_relative_to_the_base():
    """A layer with many short vectors: few parameters, much work (units = kernel x hidden)."""
    conv_shapes = {"big": (512, 512, 1, 1)}
    base_params = 512 * 512
    hidden = limits.MAX_REBUILD_WORK_RATIO + 1
    from device_runtime.pack import Layer

    def layer(hidden):
        return Layer(name="big", adapter="km", kind="channel", activation="relu", scale=1.0,
                     tensors={n: np.zeros(s, np.float32) for n, s in km.modulator_shapes(512, hidden).items()})

    assert 2 * 512 * hidden < base_params  # within the parameter limit
    with pytest.raises(PackLimitError, match="units of work"):
        limits.check_rebuild_budget("p.kmp", [layer(hidden)], conv_shapes)
    limits.check_rebuild_budget("p.kmp", [layer(8)], conv_shapes)  # the default size is fine


def test_default_sized_pack_is_within_every_limit(runtime, signing_key, tmp_path):
    loaded = runtime.load_pack(make_pack(tmp_path / "ok.kmp", runtime.base, signing_key))
    assert np.isfinite(runtime.logits(np.zeros((1, 3, SIZE, SIZE), np.float32))).all()
    assert runtime.active is loaded


# --- values that pass as finite floats but overflow float32 in use ---------------------------
# The format caps every stored number (device_runtime.pack.limits), so a pack that reads cannot
# overflow the rebuild or the scores any more; the runtime's own finite checks stay as a second
# line and are exercised here directly, and the hostile packs themselves are refused at read.
def _resigned_with_head(path, signing_key, value) -> bytes:
    """The pack at ``path`` with every head weight set to ``value`` at the msgpack level, re-signed
    (no writer checks in the way)."""
    import msgpack

    from device_runtime.pack import seal

    body = msgpack.unpackb(msgpack.unpackb(path.read_bytes(), raw=False)["payload"], raw=False)
    index = 4 * len(body["layers"])  # each km layer stores w1, b1, w2, b2; then head weight, bias
    offset, shape = body["tensors"][index]
    data = bytearray(body["data"])
    data[offset:offset + 4 * int(np.prod(shape))] = np.full(shape, value, "<f4").tobytes()
    return seal(msgpack.packb({**body, "data": bytes(data)}, use_bin_type=True), signing_key)


def _as_mapping(layer, **change) -> dict:
    """A layer record as the writer's mapping form, with fields changed (no record validation)."""
    return {**{f.name: getattr(layer, f.name) for f in dataclasses.fields(layer)}, **change}


def test_modulators_that_overflow_the_rebuild_are_refused(runtime, signing_key, tmp_path):
    layers = modulators(runtime, hidden=4)
    layers[0] = _as_mapping(layers[0], tensors={
        name: np.full_like(t, 1e20) if name in ("w1", "w2") else t for name, t in layers[0].tensors.items()})
    with pytest.raises(PackLimitError):  # the writer runs the reader's value check
        make_pack(tmp_path / "overflow.kmp", runtime.base, signing_key, layers=layers)
    kernels = {"features.0": np.array([[1.0, np.inf]], np.float32)}
    with pytest.raises(NonFiniteError, match="rebuilt kernel of layer 'features.0'"):
        limits.check_finite_kernels("overflow.kmp", kernels)


def test_head_that_overflows_the_scores_is_refused(runtime, signing_key, tmp_path):
    path = make_pack(tmp_path / "head.kmp", runtime.base, signing_key)
    path.write_bytes(_resigned_with_head(path, signing_key, 3e38))  # finite in float32; scores are not
    refused(runtime, signing_key, path, PackLimitError)
    with pytest.raises(NonFiniteError, match="not finite"):
        limits.check_finite_scores("head.kmp", np.array([[np.inf, 0.0]], np.float32))


def overflowing_modulators(runtime) -> list:
    """Modulators at the format's largest value on every layer: each rebuilt kernel is finite (a
    few 1e13), but three such convs in a row overflow float32 in the activations."""
    return [dataclasses.replace(layer, tensors={n: np.full_like(t, MAX_ABS_VALUE) for n, t in layer.tensors.items()})
            for layer in modulators(runtime, hidden=4)]


def test_pack_whose_scores_overflow_is_refused_by_the_probe_and_by_every_request(runtime, signing_key, tmp_path):
    path = make_pack(tmp_path / "overflow.kmp", runtime.base, signing_key, layers=overflowing_modulators(runtime))
    # with the probe (what serve does before a swap): refused at load, nothing of it kept
    message = refused(runtime, signing_key, path, NonFiniteError, probe=True)
    assert "not finite" in message
    good = runtime.active
    with pytest.raises(NonFiniteError):
        runtime.load_pack(path, probe=True)
    assert runtime.active is good and len(runtime.cached) == 1
    # without it (run, eval): loaded, and refused at its first image, never answered
    loaded = runtime.load_pack(path)
    assert loaded.timings_ms["probe"] == 0.0 and not loaded.probed
    images = np.random.default_rng(0).normal(size=(2, 3, SIZE, SIZE)).astype(np.float32)
    with pytest.raises(NonFiniteError, match="overflow.kmp"):
        runtime.logits(images)
    with pytest.raises(NonFiniteError):
        runtime.probe(loaded)
    # probing the cached session later refuses it too, and drops it from the cache
    with pytest.raises(NonFiniteError):
        runtime.load_pack(path, probe=True)
    assert loaded.sha256 not in runtime.cached


def test_probe_passes_a_sound_pack_and_is_not_repeated_on_a_cache_hit(runtime, signing_key, tmp_path):
    path = make_pack(tmp_path / "ok.kmp", runtime.base, signing_key)
    loaded = runtime.load_pack(path)
    assert not loaded.probed
    again = runtime.load_pack(path, probe=True)  # a cache hit: probed now, once
    assert again is loaded and loaded.probed
    runtime.clear_cache()
    probed = runtime.load_pack(path, probe=True)
    assert probed.probed and probed.timings_ms["probe"] > 0.0


def _body_of(pack) -> dict:
    return {
        "task": pack.task, "pack_version": pack.pack_version, "created": pack.created,
        "base_id": pack.base_id, "labels": list(pack.labels), "preprocess": dict(pack.preprocess),
        "method": pack.method, "modulator": pack.modulator, "layers": pack.layers,
        "head": {k: np.array(v) for k, v in pack.head.items()}, "bn": pack.bn,
        "metrics": pack.metrics, "trainer": pack.trainer,
    }


@pytest.mark.parametrize("case", ["negative variance", "scale 5e-324", "scale 1e-300", "lora 1e300"])
def test_signed_values_that_give_nan_are_refused(runtime, signing_key, tmp_path, case):
    layers, bn = modulators(runtime, hidden=4), None
    if case == "negative variance":
        bn = [{"name": "bn.0", "tensors": {
            "weight": np.ones(6, np.float32), "bias": np.zeros(6, np.float32),
            "running_mean": np.zeros(6, np.float32), "running_var": np.full(6, -1.0, np.float32)}}]
    elif case.startswith("scale"):
        layers[0] = _as_mapping(layers[0], scale=float(case.split()[1]))
    if case == "lora 1e300":
        from device_runtime import pack as packformat

        weight_shape = runtime.base.conv_shapes["features.0"]
        fan_in = int(np.prod(weight_shape[1:]))
        lora = [{"name": "features.0", "adapter": "lora", "kind": "", "activation": "", "scale": 1e300,
                 "tensors": {"a": np.ones((2, fan_in), np.float32),
                             "b": np.ones((weight_shape[0], 2), np.float32)}}]
        body = _body_of(packformat.read_pack(
            make_pack(tmp_path / "x.kmp", runtime.base, signing_key).read_bytes(), runtime.trusted_keys))
        body.update(method="lora", modulator=None, layers=lora)
        path = tmp_path / "lora.kmp"
        try:
            path.write_bytes(packformat.build_pack(body, signing_key))
        except PackError:
            return  # the writer refuses it with the reader's own check (tests/test_pack_limits.py)
    else:
        try:
            path = make_pack(tmp_path / "nan.kmp", runtime.base, signing_key, layers=layers, bn=bn)
        except PackError:
            return  # the writer refuses it with the reader's own check (tests/test_pack_limits.py)
    refused(runtime, signing_key, path)


# --- preprocessing against the base ---------------------------------------------------------
@pytest.mark.parametrize("change", [
    {"resize": 10**5}, {"resize": float("inf")}, {"resize": "32"}, {"resize": 32.9},
    {"interpolation": ["bilinear"]}, {"mean": [3e38, 0, 0]},
])
def test_unusable_preprocessing_is_refused_by_verify(runtime, signing_key, tmp_path, change):
    try:
        path = make_pack(tmp_path / "pre.kmp", runtime.base, signing_key,
                         preprocess={**PREPROCESS, **change})
    except PackError as exc:  # the writer runs the reader's own check (tests/test_pack_limits.py)
        assert "\n" not in str(exc)
        return
    with pytest.raises(PackError) as caught:
        runtime.check_pack(path)
    assert "\n" not in str(caught.value)
    refused(runtime, signing_key, path)


def test_crop_that_does_not_fit_the_graph_is_refused_by_verify(runtime, signing_key, tmp_path):
    path = make_pack(tmp_path / "crop.kmp", runtime.base, signing_key,
                     preprocess={**PREPROCESS, "resize": 2 * SIZE, "crop": 2 * SIZE})
    with pytest.raises(ShapeMismatchError, match=f"crops {2 * SIZE} x {2 * SIZE} pixels"):
        runtime.check_pack(path)
    refused(runtime, signing_key, path, ShapeMismatchError)


# --- the CLI edge -----------------------------------------------------------------------------
@pytest.mark.parametrize("hostile", ["head beyond the format's limit", "scores that overflow"])
def test_run_refuses_a_nan_pack_with_one_line_and_valid_json(tiny_base_dir, key_dir, signing_key, tmp_path,
                                                              hostile):
    runtime = Runtime(tiny_base_dir, {keys.key_id(signing_key): signing_key.public_key()})
    if hostile.startswith("head"):  # refused when read
        path = make_pack(tmp_path / "hostile.kmp", runtime.base, signing_key)
        path.write_bytes(_resigned_with_head(path, signing_key, 3e38))
    else:  # refused at the first image's scores
        path = make_pack(tmp_path / "hostile.kmp", runtime.base, signing_key, layers=overflowing_modulators(runtime))
    image = tmp_path / "x.png"
    Image.new("RGB", (SIZE, SIZE), (1, 2, 3)).save(image)
    for extra in ([], ["--json"]):
        result = subprocess.run([KM_EDGE, "run", "--pack", path, "--base", tiny_base_dir, "--pubkey",
                                 key_dir / "signing.pub", image, *extra],
                                capture_output=True, text=True)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("km-edge: error:") and "hostile.kmp" in lines[0]
        if extra:  # strict JSON: a bare NaN or Infinity would raise here
            error = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(name))
            assert error["exit_code"] == 2 and "hostile.kmp" in error["error"]
        else:
            assert result.stdout == ""  # no predictions printed


def test_verify_probe_refuses_a_pack_whose_scores_overflow(tiny_base_dir, key_dir, signing_key, tmp_path):
    """`verify` checks what it can without building; `verify --probe` builds the pack and refuses
    it as serve would, one line, exit 2; a sound pack passes and says it was probed."""
    runtime = Runtime(tiny_base_dir, {keys.key_id(signing_key): signing_key.public_key()})
    hostile = make_pack(tmp_path / "hostile.kmp", runtime.base, signing_key, layers=overflowing_modulators(runtime))
    sound = make_pack(tmp_path / "sound.kmp", runtime.base, signing_key)

    def verify(path, *extra):
        return subprocess.run([KM_EDGE, "verify", path, "--base", tiny_base_dir, "--pubkey",
                               key_dir / "signing.pub", "--json", *extra], capture_output=True, text=True)

    assert verify(hostile).returncode == 0  # nothing refuses it before it is built
    result = verify(hostile, "--probe")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "hostile.kmp" in lines[0] and "not finite" in lines[0]
    result = verify(sound, "--probe")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["probed"] is True and report["probe_ms"] > 0 and report["base_checked"] is True
    result = subprocess.run([KM_EDGE, "verify", sound, "--base", tmp_path / "nowhere", "--pubkey",
                             key_dir / "signing.pub", "--probe"], capture_output=True, text=True)
    assert result.returncode == 2 and "--probe" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_json_output_never_holds_nan():
    from km_edge.cli import _emit

    with pytest.raises(KmEdgeError, match="not finite"):
        _emit({"probability": float("nan")}, True)


def test_labels_and_task_names_that_would_garble_a_terminal_are_refused(tiny_base_dir, signing_key, tmp_path):
    """ANSI escapes, newlines and huge names never reach a device's output: the format refuses
    them (writer and reader share the check); what is printed also goes through
    device_runtime.text.printable (tests/test_host_hygiene.py)."""
    runtime = Runtime(tiny_base_dir, {keys.key_id(signing_key): signing_key.public_key()})
    from device_runtime import pack as packformat

    body = _body_of(packformat.read_pack(
        make_pack(tmp_path / "p.kmp", runtime.base, signing_key).read_bytes(), runtime.trusted_keys))
    for field, value in (("labels", ["ant\x1b[31mRED", "bee", "cat"]), ("labels", ["ant", "bee\nfake line", "cat"]),
                         ("labels", ["ant", "bee", "c" * 5000]), ("task", "t" * 100_000)):
        with pytest.raises(PackError) as caught:
            packformat.build_pack({**body, field: value}, signing_key)
        assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value) and len(str(caught.value)) < 1000


def test_eval_text_output_lists_unreadable_images(tiny_base_dir, key_dir, signing_key, tmp_path):
    runtime = Runtime(tiny_base_dir, {keys.key_id(signing_key): signing_key.public_key()})
    path = make_pack(tmp_path / "p.kmp", runtime.base, signing_key)
    folder = tmp_path / "val" / "ant"
    folder.mkdir(parents=True)
    Image.new("RGB", (SIZE, SIZE), (1, 2, 3)).save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    result = subprocess.run([KM_EDGE, "eval", "--pack", path, tmp_path / "val", "--base", tiny_base_dir,
                             "--pubkey", key_dir / "signing.pub"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "on 1 images" in result.stdout
    assert "1 unreadable images skipped" in result.stdout and "broken.png" in result.stdout
