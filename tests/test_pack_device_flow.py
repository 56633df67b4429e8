"""The host -> pack -> device flow end to end, through the `km-edge` CLI where a user would use it.

The trained demo project comes from conftest (`demo_project`, `letters_pack`). What is checked:
the device runs the pack's kernels (logits of host torch, onnxruntime and onnx.reference agree, and
differ from the unmodulated base), device accuracy equals the host's, fp16 packs, a deterministic
base export, the JSON outputs, every refusal (exit 2, one line, no traceback, nothing predicted),
bad images among good ones, inspect, keygen and pack versions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from pathlib import Path

import msgpack
import numpy as np
import pytest

from device_runtime.basefiles import ALIGNMENT, Base
from device_runtime.errors import ExpiredPackError
from device_runtime.imagefolder import list_image_folder
from device_runtime.keys import generate_keypair, load_private_key, load_trusted_keys
from device_runtime.pack import build_pack, read_pack, seal, write_pack
from device_runtime.preprocess import load_image, preprocess
from device_runtime.runtime import Runtime

from conftest import FP16_UNIT_ROUNDOFF, assert_same_predictions, images_allowed, run_cli

PARITY_IMAGES = 24  # the onnx.reference backend is slow; a few dozen images make the point


# --- helpers ---------------------------------------------------------------------------------------
def _json(result) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _assert_refused(result, *reason_words: str) -> None:
    """Exit 2, exactly one stderr line naming the reason, no traceback, nothing on stdout."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("km-edge: error: "), lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout.strip() == "", result.stdout
    for word in reason_words:
        assert word.lower() in lines[0].lower(), (word, lines[0])


def _body_of(pack) -> dict:
    """A build_pack body equal to a read pack (tensors as float32 arrays)."""
    return {
        "task": pack.task,
        "pack_version": pack.pack_version,
        "created": pack.created,
        "expires": pack.expires,
        "base_id": pack.base_id,
        "labels": list(pack.labels),
        "preprocess": pack.preprocess,
        "method": pack.method,
        "modulator": pack.modulator,
        "layers": list(pack.layers),
        "head": dict(pack.head),
        "bn": list(pack.bn),
        "metrics": pack.metrics,
        "trainer": pack.trainer,
    }


def _val_images(project, task: str = "letters", limit: int | None = None) -> list[Path]:
    """Val images spread over the classes (every k-th of the sorted listing)."""
    _, samples = list_image_folder(project.data / task / "val")
    paths = [path for path, _ in samples]
    if limit is not None and len(paths) > limit:
        paths = paths[:: max(1, len(paths) // limit)][:limit]
    return paths


# --- module fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trusted(demo_project):
    return load_trusted_keys([demo_project.keys / "signing.pub"])


@pytest.fixture(scope="module")
def project_key(demo_project):
    return load_private_key(demo_project.keys / "signing.key")


@pytest.fixture(scope="module")
def letters_read(letters_pack, trusted):
    return read_pack(letters_pack.pack, trusted)


@pytest.fixture(scope="module")
def checkpoint(letters_pack):
    from km_edge.checkpoint import load_checkpoint

    return load_checkpoint(letters_pack.checkpoint)


def _restore(project, checkpoint):
    """The host's parametrized torch model of a checkpoint (its base weights path is relative to
    the project folder, as `km-edge` sees it)."""
    from km_edge.checkpoint import restore_task_model

    cwd = os.getcwd()
    os.chdir(project.root)
    try:
        model, _, _ = restore_task_model(checkpoint)
    finally:
        os.chdir(cwd)
    return model


@pytest.fixture(scope="module")
def host_model(demo_project, checkpoint):
    return _restore(demo_project, checkpoint)


@pytest.fixture(scope="module")
def other_base(demo_project, tmp_path_factory):
    """A base with other (random) weights: same architecture, another base_id."""
    out = tmp_path_factory.mktemp("otherbase") / "otherbase"
    report = _json(demo_project.run("export-base", "--weights", "none", "--arch", "demo", "--input-size", "32",
                                    "--out", out, "--json"))
    assert report["base_id"] != Base.open(demo_project.base_dir).base_id
    return out


# --- the pack's kernels are what the device runs ---------------------------------------------------
@pytest.mark.slow
def test_logits_of_host_ort_and_reference_agree_and_differ_from_the_base(
        demo_project, letters_pack, letters_read, checkpoint, host_model, trusted, project_key, tmp_path):
    import torch

    paths = _val_images(demo_project, limit=PARITY_IMAGES)
    batch = np.stack([preprocess(load_image(p), letters_read.preprocess) for p in paths])
    with torch.no_grad():
        host = host_model(torch.from_numpy(batch)).numpy()

    device = {}
    for backend in ("ort", "reference"):
        runtime = Runtime(demo_project.base_dir, trusted, backend=backend)
        runtime.load_pack(letters_pack.pack)
        device[backend] = runtime.logits(batch)
    assert host.shape == device["ort"].shape == (len(paths), len(letters_read.labels))
    np.testing.assert_allclose(device["ort"], host, rtol=0, atol=1e-4)
    np.testing.assert_allclose(device["reference"], host, rtol=0, atol=1e-4)
    np.testing.assert_allclose(device["ort"], device["reference"], rtol=0, atol=1e-4)

    # the same head (and BatchNorm, which the default KM trains) on the unmodulated kernels: a "bn"
    # pack of the same task, same key
    body = _body_of(letters_read)
    assert body["bn"], "the default KM trains BatchNorm"
    body.update(method="bn", modulator=None, layers=[])
    head_only = tmp_path / "letters-head.kmp"
    write_pack(head_only, build_pack(body, project_key))
    runtime = Runtime(demo_project.base_dir, trusted)
    runtime.load_pack(head_only)
    base_logits = runtime.logits(batch)
    assert np.abs(base_logits - host).max() > 1e-3, "the pack's modulated kernels are not used"
    # and it matches torch with the modulators taken off (the frozen weights put back)
    from torch.nn.utils import parametrize

    unmodulated = _restore(demo_project, checkpoint)
    convs = [m for m in unmodulated.backbone.modules() if parametrize.is_parametrized(m, "weight")]
    assert convs, "the host model has no parametrized convs"
    for conv in convs:
        parametrize.remove_parametrizations(conv, "weight", leave_parametrized=False)
    with torch.no_grad():
        host_base = unmodulated(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(base_logits, host_base, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_device_eval_accuracy_equals_host_val_accuracy(demo_project, letters_pack, checkpoint, host_model,
                                                       letters_read, trusted):
    """Device logits = host logits within 1e-4 on every val image; so the two predict the same
    class wherever the top-1/top-2 margin is clear, and accuracies differ by at most the
    near-ties (in whole images, never more than max(1, 1 %))."""
    import torch

    val_dir = demo_project.data / "letters" / "val"
    result = _json(demo_project.run("eval", "--pack", letters_pack.pack, val_dir, "--json"))
    classes, samples = list_image_folder(val_dir)
    n = len(samples)
    assert checkpoint["val_source"] == "val"
    assert result["n_images"] == n == len(_val_images(demo_project))

    # the host model and the device runtime, on the device's preprocessing of the same files
    batch = np.stack([preprocess(load_image(p), letters_read.preprocess) for p, _ in samples])
    with torch.no_grad():
        host = host_model(torch.from_numpy(batch)).numpy()
    runtime = Runtime(demo_project.base_dir, trusted)
    runtime.load_pack(letters_pack.pack)
    device = runtime.logits(batch)
    near_ties = assert_same_predictions(host, device, atol=1e-4)

    truth = np.array([letters_read.labels.index(classes[y]) for _, y in samples])
    device_correct = int(np.sum(device.argmax(1) == truth))
    # eval counts what the runtime predicts (its batches of 64 may round differently from ours)
    assert abs(round(result["accuracy"] * n) - device_correct) <= images_allowed(n)
    for host_accuracy in (checkpoint["val_accuracy"], letters_pack.pack_report["host_val_accuracy"],
                          letters_read.metrics["host_val_accuracy"]):
        assert abs(round(host_accuracy * n) - device_correct) <= images_allowed(n), (host_accuracy, result)
    assert abs(int(np.sum(host.argmax(1) == truth)) - device_correct) <= near_ties


def _tensor_bytes(path: Path) -> tuple[int, int]:
    """(bytes of tensor elements, number of tensors) of a pack, from its tensor index."""
    body = msgpack.unpackb(msgpack.unpackb(path.read_bytes(), raw=False)["payload"], raw=False)
    itemsize = {"float32": 4, "float16": 2}[body["storage_dtype"]]
    return sum(math.prod(shape) * itemsize for _, shape in body["tensors"]), len(body["tensors"])


@pytest.mark.slow
def test_fp16_pack_halves_the_tensors_and_keeps_the_accuracy(demo_project, letters_pack, trusted):
    fp32, fp16 = letters_pack.pack.stat().st_size, letters_pack.pack_fp16.stat().st_size
    assert letters_pack.pack_fp16_report["storage_dtype"] == "float16"
    assert letters_pack.pack_fp16_report["pack_bytes"] == fp16
    assert read_pack(letters_pack.pack_fp16, trusted).storage_dtype == "float16"
    # every tensor byte is halved and nothing else changes size (give or take alignment padding,
    # at most 3 bytes a tensor, and the index's offsets); format 2 keeps only a shape and an offset
    # per tensor, so even the tiny demo net's pack is within 55 %
    (tensors32, count), (tensors16, _) = _tensor_bytes(letters_pack.pack), _tensor_bytes(letters_pack.pack_fp16)
    assert 2 * tensors16 == tensors32
    assert abs((fp32 - tensors32) - (fp16 - tensors16)) <= 4 * count
    assert fp16 <= 0.55 * fp32, fp16 / fp32

    # what fp16 storage promises: each tensor is the fp32 one rounded to the nearest float16 ...
    pack32, pack16 = read_pack(letters_pack.pack, trusted), read_pack(letters_pack.pack_fp16, trusted)
    pairs = list(zip(_pack_tensors(pack32), _pack_tensors(pack16), strict=True))
    assert pairs
    for (where, stored32), (where16, stored16) in pairs:
        assert where == where16
        np.testing.assert_array_equal(stored16, stored32.astype(np.float16).astype(np.float32), err_msg=where)

    # ... so the logits move by no more than fp16 rounding allows: a relative change of at most
    # 2**-11 per stored number, compounded over the adapted layers and the head, on the logit scale
    val_dir = demo_project.data / "letters" / "val"
    _, samples = list_image_folder(val_dir)
    batch = np.stack([preprocess(load_image(p), pack32.preprocess) for p, _ in samples])
    runtime = Runtime(demo_project.base_dir, trusted)
    runtime.load_pack(letters_pack.pack)
    logits32 = runtime.logits(batch)
    runtime.load_pack(letters_pack.pack_fp16)
    logits16 = runtime.logits(batch)
    depth = len(pack32.layers) + 1
    bound = FP16_UNIT_ROUNDOFF * depth * float(np.abs(logits32).max())
    assert np.abs(logits16 - logits32).max() <= bound, (np.abs(logits16 - logits32).max(), bound)
    # top-1 is the same wherever the fp32 margin is more than twice the largest logit difference
    assert_same_predictions(logits32, logits16, atol=bound)

    # and eval through the CLI counts the same images right, but for those near-ties
    acc32 = _json(demo_project.run("eval", "--pack", letters_pack.pack, val_dir, "--json"))["accuracy"]
    acc16 = _json(demo_project.run("eval", "--pack", letters_pack.pack_fp16, val_dir, "--json"))["accuracy"]
    n = len(samples)
    assert abs(round(acc16 * n) - round(acc32 * n)) <= images_allowed(n), (acc16, acc32)


def _pack_tensors(pack) -> list[tuple[str, np.ndarray]]:
    """Every tensor a decoded pack carries, named by where it sits."""
    named = [(f"layers[{i}].{k}", t) for i, layer in enumerate(pack.layers) for k, t in layer.tensors.items()]
    named += [(f"head.{k}", t) for k, t in pack.head.items()]
    named += [(f"bn[{i}].{k}", t) for i, entry in enumerate(pack.bn) for k, t in entry.tensors.items()]
    return named


def test_fp16_pack_of_mobilenet_v2_is_at_most_55_percent_of_fp32():
    """The default base with the default modulators (random values: sizes do not depend on them)."""
    from device_runtime.km import ModulatorSpec, modulator_shapes
    from km_edge.adapters import conv_layers
    from km_edge.models import build_base

    base = build_base("mobilenet_v2", None)
    spec, rng = ModulatorSpec(), np.random.default_rng(0)
    layers = []
    for name, conv in conv_layers(base.backbone):
        kind, d, h = spec.resolve(tuple(conv.weight.shape))
        tensors = {n: rng.normal(size=shape).astype(np.float32) for n, shape in modulator_shapes(d, h).items()}
        layers.append({"name": name, "adapter": "km", "kind": kind, "activation": spec.activation, "scale": 0.1,
                       "tensors": tensors})
    labels = [f"class{i}" for i in range(10)]
    body = {"task": "t", "pack_version": 1, "created": None, "base_id": "0" * 64, "labels": labels,
            "preprocess": base.preprocess, "method": "km", "modulator": spec.to_dict(), "layers": layers,
            "head": {"weight": rng.normal(size=(10, base.feature_size)).astype(np.float32),
                     "bias": np.zeros(10, np.float32)},
            "bn": [], "metrics": {"host_val_accuracy": 0.9}, "trainer": {"epochs": 10}}
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    fp32, fp16 = len(build_pack(body, key, "float32")), len(build_pack(body, key, "float16"))
    assert fp16 <= 0.55 * fp32, (fp16, fp32)


# --- the exported base -----------------------------------------------------------------------------
@pytest.mark.slow
def test_export_base_is_deterministic_aligned_and_keeps_batchnorm(demo_project, tmp_path):
    import onnx

    from km_edge.export import export_base
    from km_edge.models import build_base

    first = export_base(build_base(**demo_project.base_spec), tmp_path / "a")
    second = export_base(build_base(**demo_project.base_spec), tmp_path / "b")
    assert first["base_id"] == second["base_id"] == Base.open(demo_project.base_dir).base_id
    for name in ("base.onnx", "base.weights", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
        assert (tmp_path / "a" / name).read_bytes() == (demo_project.base_dir / name).read_bytes(), name

    manifest = first
    entries = list(manifest["conv_layers"])
    entries += [t for layer in manifest["bn_layers"] for t in layer["tensors"].values()]
    assert entries and all(entry["offset"] % ALIGNMENT == 0 for entry in entries)
    assert ALIGNMENT == 64

    graph = onnx.load(str(tmp_path / "a" / "base.onnx"), load_external_data=False)
    ops = [node.op_type for node in graph.graph.node]
    assert ops.count("BatchNormalization") == len(manifest["bn_layers"]) > 0
    assert ops.count("Conv") == len(manifest["conv_layers"])
    assert not {"Gemm", "MatMul"} & set(ops), "the classifier must not be in the graph"
    (output,) = graph.graph.output
    dims = output.type.tensor_type.shape.dim
    assert len(dims) == 2 and dims[1].dim_value == manifest["feature_size"]

    from device_runtime.backends import make_backend

    features = make_backend("ort", tmp_path / "a" / "base.onnx", {}).features(
        np.zeros((2, 3, 32, 32), np.float32))
    assert features.shape == (2, manifest["feature_size"])


# --- JSON outputs -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_run_json_has_pack_backend_predictions_and_timings(demo_project, letters_pack, letters_read):
    images = _val_images(demo_project, limit=3)
    report = _json(demo_project.run("run", "--pack", letters_pack.pack, *images, "--top-k", "3", "--json"))
    assert set(report) >= {"pack", "backend", "predictions", "timings_ms"}
    assert report["pack"] == {"task": "letters", "version": letters_read.pack_version,
                              "base_id": letters_read.base_id}
    assert report["backend"] == "ort"
    assert set(report["timings_ms"]) >= {"verify", "rebuild", "session", "preprocess", "infer"}
    assert all(isinstance(v, (int, float)) and v >= 0 for v in report["timings_ms"].values())
    assert [p["image"] for p in report["predictions"]] == [str(p) for p in images]
    for prediction in report["predictions"]:
        top = prediction["top"]
        assert len(top) == 3
        for entry in top:
            assert set(entry) == {"label", "index", "probability"}
            assert letters_read.labels[entry["index"]] == entry["label"]
            assert 0.0 <= entry["probability"] <= 1.0
        probabilities = [entry["probability"] for entry in top]
        assert probabilities == sorted(probabilities, reverse=True)

    default = _json(demo_project.run("run", "--pack", letters_pack.pack, images[0], "--json"))
    assert len(default["predictions"][0]["top"]) == min(5, len(letters_read.labels))

    reference = _json(demo_project.run("run", "--pack", letters_pack.pack, *images, "--top-k", "3",
                                       "--backend", "reference", "--json"))
    assert reference["backend"] == "reference"
    for ours, ref in zip(report["predictions"], reference["predictions"]):
        assert [t["index"] for t in ours["top"]][0] == [t["index"] for t in ref["top"]][0]
        np.testing.assert_allclose([t["probability"] for t in ours["top"]],
                                   [t["probability"] for t in ref["top"]], atol=1e-4)

    text = demo_project.run("run", "--pack", letters_pack.pack, images[0], "--top-k", "1")
    assert text.returncode == 0 and text.stdout.strip().startswith(str(images[0]))


@pytest.mark.slow
def test_eval_json_has_accuracy_count_and_per_class(demo_project, letters_pack, letters_read):
    val_dir = demo_project.data / "letters" / "val"
    report = _json(demo_project.run("eval", "--pack", letters_pack.pack, val_dir, "--json"))
    assert set(report) >= {"accuracy", "n_images", "per_class"}
    assert 0.0 <= report["accuracy"] <= 1.0
    assert set(report["per_class"]) == set(letters_read.labels)
    assert sum(c["n"] for c in report["per_class"].values()) == report["n_images"] > 0
    correct = sum(c["accuracy"] * c["n"] for c in report["per_class"].values())
    assert correct / report["n_images"] == pytest.approx(report["accuracy"])


# --- refusals through the CLI ---------------------------------------------------------------------
def _flip(data: bytes, position: int) -> bytes:
    out = bytearray(data)
    out[position] ^= 0xFF
    return bytes(out)


def _positions(data: bytes) -> dict[str, int]:
    envelope = msgpack.unpackb(data, raw=False)
    payload_at = data.index(envelope["payload"])
    signature_at = data.index(envelope["signature"])
    return {
        "start": 0,
        "payload-middle": payload_at + len(envelope["payload"]) // 2,
        "signature": signature_at + 10,
        "end": len(data) - 1,
    }


BAD_PACKS = ["flip-start", "flip-payload-middle", "flip-signature", "flip-end", "truncated", "empty",
             "png", "format-1", "format-3", "untrusted", "other-base", "w1-shape", "head-features"]
REASONS = {
    "flip-start": ["not a km-edge pack"],
    "flip-payload-middle": ["signature"],
    "flip-signature": ["signature"],
    "flip-end": ["signature"],
    "truncated": ["truncated"],
    "empty": ["empty"],
    "png": ["not a km-edge pack"],
    "format-1": ["format version 1", "km-edge pack"],
    "format-3": ["format version 3"],
    "untrusted": ["not trusted"],
    "other-base": ["was made for base", "this base is"],
    "w1-shape": ["shape", "w1"],
    "head-features": ["head", "shape"],
}


@pytest.fixture(scope="module")
def bad_packs(demo_project, letters_pack, letters_read, project_key, other_base, tmp_path_factory):
    """{case: (pack path, extra CLI args)}."""
    folder = tmp_path_factory.mktemp("bad-packs")
    data = letters_pack.pack.read_bytes()
    made: dict[str, tuple[Path, list]] = {}

    def put(case: str, content: bytes, *extra) -> None:
        path = folder / f"{case}.kmp"
        path.write_bytes(content)
        made[case] = (path, list(extra))

    for where, position in _positions(data).items():
        put(f"flip-{where}", _flip(data, position))
    put("truncated", data[: len(data) * 2 // 3])
    put("empty", b"")
    put("png", _val_images(demo_project, limit=1)[0].read_bytes())
    envelope = msgpack.unpackb(data, raw=False)
    put("format-1", seal(envelope["payload"], project_key, format_version=1))
    put("format-3", seal(envelope["payload"], project_key, format_version=3))
    generate_keypair(folder / "stranger")
    stranger = load_private_key(folder / "stranger" / "signing.key")
    put("untrusted", build_pack(_body_of(letters_read), stranger))
    put("other-base", data, "--base", other_base)

    body = _body_of(letters_read)
    layer = body["layers"][0]  # a modulator for vectors one longer than the base's: consistent, wrong
    d, h = layer.tensors["w1"].shape
    shapes = {"w1": (d + 1, h), "b1": (h,), "w2": (h, d + 1), "b2": (d + 1,)}
    body["layers"][0] = dataclasses.replace(
        layer, tensors={n: np.zeros(s, np.float32) for n, s in shapes.items()})
    put("w1-shape", build_pack(body, project_key))
    body = _body_of(letters_read)
    weight = body["head"]["weight"]
    body["head"]["weight"] = np.zeros((weight.shape[0], weight.shape[1] + 3), np.float32)
    put("head-features", build_pack(body, project_key))
    assert sorted(made) == sorted(BAD_PACKS)
    return made


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "verify"])
@pytest.mark.parametrize("case", BAD_PACKS)
def test_bad_pack_is_refused_by_the_cli(demo_project, bad_packs, case, command):
    path, extra = bad_packs[case]
    image = _val_images(demo_project, limit=1)[0]
    args = ["run", "--pack", path, image] if command == "run" else ["verify", path]
    _assert_refused(demo_project.run(*args, *extra), *REASONS[case])


@pytest.mark.slow
def test_refusal_with_json_prints_an_error_object_only(demo_project, bad_packs):
    path, _ = bad_packs["flip-signature"]
    result = demo_project.run("run", "--pack", path, _val_images(demo_project, limit=1)[0], "--json")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert json.loads(result.stdout) == {"error": json.loads(result.stdout)["error"], "exit_code": 2}
    assert "signature" in json.loads(result.stdout)["error"]


@pytest.mark.slow
def test_the_good_pack_passes_verify(demo_project, letters_pack, letters_read):
    report = _json(demo_project.run("verify", letters_pack.pack, "--json"))
    assert report["ok"] is True and report["base_checked"] is True
    assert report["base_id"] == letters_read.base_id and report["task"] == "letters"


@pytest.mark.slow
def test_env_vars_choose_the_base_and_the_trusted_key(demo_project, letters_pack, bad_packs, other_base,
                                                      tmp_path):
    """Outside the project folder, KM_EDGE_BASE and KM_EDGE_PUBKEY say where the base and key are."""
    image = _val_images(demo_project, limit=1)[0]
    env = {"KM_EDGE_BASE": str(demo_project.base_dir), "KM_EDGE_PUBKEY": str(demo_project.keys / "signing.pub")}
    ok = _json(run_cli("run", "--pack", letters_pack.pack, image, "--json", cwd=tmp_path, env=env))
    assert ok["pack"]["task"] == "letters"
    verified = _json(run_cli("verify", letters_pack.pack, "--json", cwd=tmp_path, env=env))
    assert verified["base_checked"] is True

    # without them there is no base or key here
    missing = run_cli("run", "--pack", letters_pack.pack, image, cwd=tmp_path,
                      env={"KM_EDGE_BASE": "", "KM_EDGE_PUBKEY": ""})
    assert missing.returncode == 2 and "Traceback" not in missing.stderr

    other = run_cli("run", "--pack", letters_pack.pack, image, cwd=tmp_path,
                    env={**env, "KM_EDGE_BASE": str(other_base)})
    _assert_refused(other, "base")

    stranger_pub = bad_packs["untrusted"][0].parent / "stranger" / "signing.pub"
    untrusted = run_cli("run", "--pack", letters_pack.pack, image, cwd=tmp_path,
                        env={**env, "KM_EDGE_PUBKEY": str(stranger_pub)})
    _assert_refused(untrusted, "not trusted")
    # and the stranger's own pack is accepted when the device trusts the stranger's key
    accepted = run_cli("verify", bad_packs["untrusted"][0], "--json", cwd=tmp_path,
                       env={**env, "KM_EDGE_PUBKEY": str(stranger_pub)})
    assert _json(accepted)["ok"] is True


# --- bad images among good ones ---------------------------------------------------------------------
@pytest.mark.slow
def test_bad_images_get_one_line_errors_and_the_good_ones_predictions(demo_project, letters_pack, tmp_path):
    good = _val_images(demo_project, limit=2)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(good[0].read_bytes()[:40])
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    missing = tmp_path / "missing.jpg"
    images = [good[0], corrupt, good[1], text, missing]

    result = demo_project.run("run", "--pack", letters_pack.pack, *images, "--json")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    by_image = {p["image"]: p for p in report["predictions"]}
    assert [p["image"] for p in report["predictions"]] == [str(p) for p in images]
    for path in good:
        assert len(by_image[str(path)]["top"]) >= 1 and "error" not in by_image[str(path)]
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 3
    for bad in (corrupt, text, missing):
        entry = by_image[str(bad)]
        assert "top" not in entry and "\n" not in entry["error"] and str(bad) in entry["error"]
        assert sum(str(bad) in line for line in errors) == 1

    plain = demo_project.run("run", "--pack", letters_pack.pack, good[0], corrupt)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stdout.startswith(str(good[0]) + ": ")
    assert len(plain.stderr.strip().splitlines()) == 1 and str(corrupt) in plain.stderr


# --- inspect ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_inspect_json_shows_everything_pack_wrote(demo_project, letters_pack, letters_read, checkpoint, trusted):
    info = _json(demo_project.run("inspect", letters_pack.pack, "--json"))
    base = Base.open(demo_project.base_dir)
    assert info["task"] == "letters"
    assert info["pack_version"] == letters_pack.pack_report["pack_version"]
    assert info["base_id"] == base.base_id == letters_pack.pack_report["base_id"]
    assert info["labels"] == list(checkpoint["labels"])
    assert info["preprocess"] == base.preprocess
    assert info["method"] == "km"
    assert info["modulator"] == {"kind": "auto", "kernel_hidden": 8, "channel_hidden": 1, "activation": "gelu"}
    assert [entry["name"] for entry in info["bn"]] == [entry["name"] for entry in base.manifest["bn_layers"]]
    assert info["storage_dtype"] == "float32"
    assert info["key_id"] == next(iter(trusted))
    assert info["created"].endswith("Z") and info["created"] == letters_read.created
    assert info["metrics"]["host_val_accuracy"] == checkpoint["val_accuracy"]  # copied, not recomputed

    conv_shapes = base.conv_shapes
    assert [layer["name"] for layer in info["layers"]] == list(conv_shapes)  # every conv, graph order
    for layer in info["layers"]:
        shape = conv_shapes[layer["name"]]
        kind = "kernel" if shape[2] * shape[3] > 1 else "channel"
        d = shape[2] * shape[3] if kind == "kernel" else shape[1]
        h = 8 if kind == "kernel" else 1
        assert layer["adapter"] == "km" and layer["kind"] == kind and layer["activation"] == "gelu"
        assert layer["scale"] > 0
        assert {n: t["shape"] for n, t in layer["tensors"].items()} == {
            "w1": [d, h], "b1": [h], "w2": [h, d], "b2": [d]}
    n_classes, features = len(info["labels"]), base.feature_size
    assert {n: t["shape"] for n, t in info["head"].items()} == {"weight": [n_classes, features],
                                                              "bias": [n_classes]}

    text = demo_project.run("inspect", letters_pack.pack)
    assert text.returncode == 0 and "letters" in text.stdout and f"layers: {len(conv_shapes)}" in text.stdout


# --- keygen and pack versions -------------------------------------------------------------------------
def test_keygen_writes_0600_refuses_overwrite_and_force_replaces(tmp_path):
    first = _json(run_cli("keygen", "--json", cwd=tmp_path))
    private, public = tmp_path / "keys" / "signing.key", tmp_path / "keys" / "signing.pub"
    assert Path(first["private_key"]).name == "signing.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    before = private.read_bytes()

    again = run_cli("keygen", cwd=tmp_path)
    assert again.returncode == 2
    assert len(again.stderr.strip().splitlines()) == 1 and "--force" in again.stderr
    assert "Traceback" not in again.stderr
    assert private.read_bytes() == before

    forced = _json(run_cli("keygen", "--force", "--json", cwd=tmp_path))
    assert forced["key_id"] != first["key_id"]
    assert private.read_bytes() != before
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert list(load_trusted_keys([public])) == [forced["key_id"]]


@pytest.mark.slow
def test_pack_version_is_recorded_and_a_repack_increases_it(demo_project, letters_pack, trusted):
    out = "packs/letters-versioned.kmp"
    seven = _json(demo_project.run("pack", "--task", "letters", "--version", "7", "--out", out, "--json"))
    assert seven["pack_version"] == 7 and "trained" not in seven  # the checkpoint is reused
    assert read_pack(demo_project.root / out, trusted).pack_version == 7
    eight = _json(demo_project.run("pack", "--task", "letters", "--out", out, "--json"))
    assert eight["pack_version"] == 8
    assert read_pack(demo_project.root / out, trusted).pack_version == 8
    info = _json(demo_project.run("inspect", out, "--json"))
    assert info["pack_version"] == 8


@pytest.mark.slow
def test_pack_expires_and_is_refused_after_it_and_renumbers_from_it(demo_project, letters_pack, trusted):
    from datetime import datetime, timezone

    out = "packs/letters-expiring.kmp"
    made = _json(demo_project.run("pack", "--task", "letters", "--expires", "2099-01-01T00:00:00Z",
                                  "--version", "4", "--out", out, "--json"))
    assert made["expires"] == "2099-01-01T00:00:00Z"
    assert _json(demo_project.run("inspect", out, "--json"))["expires"] == "2099-01-01T00:00:00Z"
    with pytest.raises(ExpiredPackError):
        read_pack(demo_project.root / out, trusted, now=datetime(2099, 1, 1, tzinfo=timezone.utc))
    # a pack that would be born expired, and a time that is not one, are refused (exit 2)
    _assert_refused(demo_project.run("pack", "--task", "letters", "--expires", "2020-01-01T00:00:00Z",
                                     "--out", out), "expires")
    _assert_refused(demo_project.run("pack", "--task", "letters", "--expires", "tomorrow", "--out", out),
                    "--expires")
    again = _json(demo_project.run("pack", "--task", "letters", "--out", out, "--json"))
    assert again["pack_version"] == 5 and again["expires"] is None
