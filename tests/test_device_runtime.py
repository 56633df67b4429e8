"""Device runtime: base files, backends, preprocessing, ImageFolder listing and the Runtime.

Everything runs on a tiny hand-built ONNX graph (Conv -> BN -> ReLU, depthwise Conv -> BN -> ReLU,
1x1 Conv -> BN -> ReLU, global pool) checked against a numpy forward written here, so the tests
need neither torch nor a download.
"""

from __future__ import annotations

import dataclasses

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from device_runtime import keys, km
from device_runtime.backends import OrtBackend, ReferenceBackend, make_backend
from device_runtime.basefiles import ALIGNMENT, Base, write_base
from device_runtime.errors import (
    BaseError,
    BaseMismatchError,
    DataError,
    DowngradeError,
    ImageError,
    KmEdgeError,
    MalformedPackError,
    ShapeMismatchError,
    UntrustedKeyError,
)
from device_runtime.imagefolder import list_image_folder
from device_runtime.pack import Layer, build_pack
from device_runtime.preprocess import load_image, preprocess, preprocess_batch
from device_runtime.runtime import Runtime

SIZE = 8          # input height = width of the tiny graph
CHANNELS = 6      # channels of the first two convs
FEATURES = 10     # output feature size
PREPROCESS = {"resize": SIZE, "crop": SIZE, "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3],
              "interpolation": "bilinear"}
# (layer name, in channels, out channels, kernel size, groups, has bias)
CONV_TABLE = [
    ("features.0", 3, CHANNELS, 3, 1, False),
    ("features.1", CHANNELS, CHANNELS, 3, CHANNELS, False),  # depthwise
    ("features.2", CHANNELS, FEATURES, 1, 1, True),          # its bias stays inside base.onnx
]


# --- the tiny base ---------------------------------------------------------------------------
def tiny_model(seed: int = 0):
    """(model with embedded initializers, conv_layers, bn_layers, numpy params)."""
    rng = np.random.default_rng(seed)
    initializers, nodes, conv_layers, bn_layers, params = [], [], [], [], {}

    def add(name, array):
        params[name] = np.asarray(array, dtype=np.float32)
        initializers.append(numpy_helper.from_array(params[name], name))

    current = "images"
    for index, (name, cin, cout, k, groups, has_bias) in enumerate(CONV_TABLE):
        add(f"{name}.weight", rng.normal(0, 0.6, (cout, cin // groups, k, k)))
        inputs = [current, f"{name}.weight"]
        if has_bias:
            add(f"{name}.bias", rng.normal(0, 0.1, cout))
            inputs.append(f"{name}.bias")
        nodes.append(helper.make_node("Conv", inputs, [f"{name}.out"], name=name, group=groups,
                                      kernel_shape=[k, k], pads=[k // 2] * 4))
        conv_layers.append({"name": name, "initializer": f"{name}.weight", "groups": groups})
        bn = f"bn.{index}"
        tensors = {}
        for tensor_name, values in (("weight", rng.uniform(0.5, 1.5, cout)),
                                    ("bias", rng.normal(0, 0.1, cout)),
                                    ("running_mean", rng.normal(0, 0.1, cout)),
                                    ("running_var", rng.uniform(0.5, 1.5, cout))):
            add(f"{bn}.{tensor_name}", values)
            tensors[tensor_name] = f"{bn}.{tensor_name}"
        nodes.append(helper.make_node(
            "BatchNormalization",
            [f"{name}.out"] + [tensors[t] for t in ("weight", "bias", "running_mean", "running_var")],
            [f"{bn}.out"], name=bn, epsilon=1e-5))
        bn_layers.append({"name": bn, "tensors": tensors})
        nodes.append(helper.make_node("Relu", [f"{bn}.out"], [f"relu.{index}"]))
        current = f"relu.{index}"
    nodes.append(helper.make_node("GlobalAveragePool", [current], ["pooled"]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["features"], axis=1))
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", FEATURES])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="km-edge-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, conv_layers, bn_layers, params


META = {"arch": "tiny", "weights": "tests", "input_size": SIZE, "preprocess": PREPROCESS,
        "feature_size": FEATURES, "input_name": "images", "output_name": "features",
        "base_params": 0, "bn_eps": {"bn.0": 1e-5, "bn.1": 1e-5, "bn.2": 1e-5}}


def export(out_dir, seed: int = 0) -> dict:
    model, conv_layers, bn_layers, _ = tiny_model(seed)
    return write_base(out_dir, model, conv_layers, bn_layers, META)


def device_folder(root: Path) -> tuple[Base, Ed25519PrivateKey]:
    """The tiny base in ``root/base`` and a signing pair in ``root/keys``, where device commands look
    by default; returns the opened base and the private key (to sign packs for it)."""
    export(root / "base")
    keys.generate_keypair(root / "keys")
    return Base.open(root / "base"), keys.load_private_key(root / "keys" / keys.PRIVATE_KEY_NAME)


@pytest.fixture(scope="module")
def params():
    return tiny_model()[3]


# --- a numpy forward of the tiny graph --------------------------------------------------------
def conv2d(x, weight, groups, bias=None):
    n, _, h, w = x.shape
    out_ch, in_per_group, kh, kw = weight.shape
    pad = kh // 2
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.zeros((n, out_ch, h, w))
    out_per_group = out_ch // groups
    for g in range(groups):
        xs = padded[:, g * in_per_group:(g + 1) * in_per_group]
        ws = weight[g * out_per_group:(g + 1) * out_per_group]
        for i in range(kh):
            for j in range(kw):
                out[:, g * out_per_group:(g + 1) * out_per_group] += np.einsum(
                    "nchw,oc->nohw", xs[:, :, i:i + h, j:j + w], ws[:, :, i, j])
    if bias is not None:
        out += bias.reshape(1, -1, 1, 1)
    return out


def numpy_features(images, params, kernels=None, bn=None):
    """The tiny graph in float64; ``kernels``/``bn`` replace base tensors by layer name."""
    kernels, bn = kernels or {}, bn or {}
    x = images.astype(np.float64)
    for index, (name, _, _, _, groups, has_bias) in enumerate(CONV_TABLE):
        weight = kernels.get(name, params[f"{name}.weight"]).astype(np.float64)
        x = conv2d(x, weight, groups, params[f"{name}.bias"] if has_bias else None)
        t = {k: params[f"bn.{index}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")}
        t.update(bn.get(f"bn.{index}", {}))
        shape = (1, -1, 1, 1)
        x = (x - t["running_mean"].reshape(shape)) / np.sqrt(t["running_var"].reshape(shape) + 1e-5)
        x = np.maximum(x * t["weight"].reshape(shape) + t["bias"].reshape(shape), 0.0)
    return x.mean(axis=(2, 3))


def random_images(n, seed=1):
    return np.random.default_rng(seed).normal(size=(n, 3, SIZE, SIZE)).astype(np.float32)


def random_modulators(base: Base, seed=2, hidden=4) -> list[Layer]:
    """Pack layer records with nonzero modulators for every conv of the base (kind auto)."""
    rng = np.random.default_rng(seed)
    layers = []
    for name, weight in base.conv_kernels().items():
        kind = km.resolve_kind("auto", weight.shape)
        d = km.vector_length(kind, weight.shape)
        tensors = {n: rng.normal(0, 0.5, s).astype(np.float32)
                   for n, s in km.modulator_shapes(d, hidden).items()}
        layers.append(Layer(name=name, adapter="km", kind=kind, activation="relu",
                            scale=km.kernel_scale(weight), tensors=tensors))
    return layers


# --- base files ------------------------------------------------------------------------------
def test_write_base_is_deterministic(tmp_path):
    first = export(tmp_path / "a")
    second = export(tmp_path / "b")
    assert first["base_id"] == second["base_id"]
    for name in ("base.onnx", "base.weights", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    graph = (tmp_path / "a" / "base.onnx").read_bytes()
    weights = (tmp_path / "a" / "base.weights").read_bytes()
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    del manifest["base_id"]  # base_id covers graph, weights and the rest of the manifest
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    assert first["base_id"] == hashlib.sha256(graph + weights + canonical).hexdigest()
    assert first["graph_bytes"] == len(graph) and first["weights_bytes"] == len(weights)
    assert export(tmp_path / "c", seed=5)["base_id"] != first["base_id"]
    assert not list(tmp_path.glob("*/*.tmp")) and not list(tmp_path.glob("*/.*"))


def test_manifest_records_layers_meta_and_aligned_offsets(tiny_base_dir):
    manifest = json.loads((tiny_base_dir / "manifest.json").read_text())
    assert manifest["format"] == "km-edge-base" and manifest["format_version"] == 2
    for key, value in META.items():
        assert manifest[key] == value
    assert [c["name"] for c in manifest["conv_layers"]] == [row[0] for row in CONV_TABLE]
    assert manifest["conv_layers"][1]["groups"] == CHANNELS
    assert manifest["conv_layers"][1]["shape"] == [CHANNELS, 1, 3, 3]
    entries = list(manifest["conv_layers"])
    entries += [t for layer in manifest["bn_layers"] for t in layer["tensors"].values()]
    assert len(entries) == 3 + 3 * 4
    for entry in entries:
        assert entry["offset"] % ALIGNMENT == 0
        assert entry["dtype"] == "float32"
        assert entry["length"] == 4 * int(np.prod(entry["shape"]))


def test_graph_references_base_weights_as_external_data(tiny_base_dir):
    manifest = json.loads((tiny_base_dir / "manifest.json").read_text())
    model = onnx.load(str(tiny_base_dir / "base.onnx"), load_external_data=False)
    by_name = {t.name: t for t in model.graph.initializer}
    for entry in manifest["conv_layers"]:
        tensor = by_name[entry["initializer"]]
        assert tensor.data_location == TensorProto.EXTERNAL and not tensor.raw_data
        info = {e.key: e.value for e in tensor.external_data}
        assert info == {"location": "base.weights", "offset": str(entry["offset"]),
                        "length": str(entry["length"])}
    bias = by_name["features.2.bias"]  # not a replaceable tensor: stays embedded
    assert bias.data_location == TensorProto.DEFAULT and bias.raw_data


def test_base_open_maps_the_exported_kernels(tiny_base_dir, params):
    base = Base.open(tiny_base_dir)
    assert base.base_id == json.loads((tiny_base_dir / "manifest.json").read_text())["base_id"]
    assert base.graph_path == tiny_base_dir / "base.onnx"
    assert base.preprocess == PREPROCESS and base.feature_size == FEATURES
    kernels = base.conv_kernels()
    assert list(kernels) == [row[0] for row in CONV_TABLE]
    for name, kernel in kernels.items():
        np.testing.assert_array_equal(kernel, params[f"{name}.weight"])
        assert kernel.dtype == np.float32 and not kernel.flags.writeable
        assert base.conv_shapes[name] == kernel.shape
        assert base.initializer_for(name) == f"{name}.weight"
    bn = base.bn_tensors()
    np.testing.assert_array_equal(bn["bn.1"]["running_var"], params["bn.1.running_var"])
    assert base.initializer_for("bn.1", "running_var") == "bn.1.running_var"
    with pytest.raises(KeyError):
        base.initializer_for("features.9")


def test_write_base_refuses_unknown_initializer(tmp_path):
    model, conv_layers, bn_layers, _ = tiny_model()
    conv_layers[0] = dict(conv_layers[0], initializer="nope.weight")
    with pytest.raises(ValueError, match="nope.weight"):
        write_base(tmp_path, model, conv_layers, bn_layers, META)
    assert not (tmp_path / "manifest.json").exists()


def test_tampered_base_weights_are_refused(tiny_base_dir, tmp_path):
    copy = tmp_path / "base"
    shutil.copytree(tiny_base_dir, copy)
    data = bytearray((copy / "base.weights").read_bytes())
    data[100] ^= 0x01
    (copy / "base.weights").write_bytes(bytes(data))
    with pytest.raises(BaseError, match="do not match manifest base_id"):
        Base.open(copy)
    Base.open(copy, verify=False)  # an explicit opt-out still opens


@pytest.mark.parametrize("damage", ["missing", "not json", "incomplete", "weights missing"])
def test_broken_base_directory_is_a_one_line_base_error(tiny_base_dir, tmp_path, damage):
    copy = tmp_path / "base"
    shutil.copytree(tiny_base_dir, copy)
    manifest = copy / "manifest.json"
    if damage == "missing":
        manifest.unlink()
    elif damage == "not json":
        manifest.write_text("{not json")
    elif damage == "incomplete":
        data = json.loads(manifest.read_text())
        del data["conv_layers"]
        manifest.write_text(json.dumps(data))
    else:
        (copy / "base.weights").unlink()
    with pytest.raises(BaseError) as caught:
        Base.open(copy)
    assert "\n" not in str(caught.value)


# --- backends --------------------------------------------------------------------------------
def test_ort_reference_and_numpy_agree_without_overrides(tiny_base_dir, params):
    base = Base.open(tiny_base_dir)
    images = random_images(3)
    ort_features = OrtBackend(base.graph_path, {}).features(images)
    reference = ReferenceBackend(base.graph_path, {}).features(images)
    assert ort_features.shape == (3, FEATURES) and ort_features.dtype == np.float32
    np.testing.assert_allclose(ort_features, reference, atol=1e-5)
    np.testing.assert_allclose(ort_features, numpy_features(images, params), atol=1e-5)


def test_ort_uses_overridden_kernels_at_enable_all(tiny_base_dir, params):
    base = Base.open(tiny_base_dir)
    kernels = km.rebuild_kernels(base.conv_kernels(), random_modulators(base))
    bn = {"bn.1": {"weight": np.full(CHANNELS, 2.0, np.float32),
                   "running_mean": np.full(CHANNELS, 0.3, np.float32)}}
    overrides = {base.initializer_for(name): kernel for name, kernel in kernels.items()}
    for layer, tensors in bn.items():
        overrides.update({base.initializer_for(layer, t): a for t, a in tensors.items()})
    images = random_images(4)

    plain = OrtBackend(base.graph_path, {}).features(images)
    adapted = OrtBackend(base.graph_path, overrides, threads=1).features(images)
    reference = ReferenceBackend(base.graph_path, overrides).features(images)
    assert np.abs(adapted - plain).max() > 1e-2  # the overrides change the output ...
    np.testing.assert_allclose(adapted, reference, atol=1e-5)  # ... exactly as the reference says
    np.testing.assert_allclose(adapted, numpy_features(images, params, kernels, bn), atol=1e-5)


def test_make_backend_names(tiny_base_dir):
    base = Base.open(tiny_base_dir)
    assert isinstance(make_backend("ort", base.graph_path, {}), OrtBackend)
    assert isinstance(make_backend("reference", base.graph_path, {}), ReferenceBackend)
    with pytest.raises(ValueError, match="backend"):
        make_backend("tensorrt", base.graph_path, {})


# --- preprocessing ---------------------------------------------------------------------------
def test_preprocess_normalises_and_returns_chw_float32():
    image = Image.new("RGB", (40, 20), (255, 51, 0))
    array = preprocess(image, {**PREPROCESS, "resize": 12, "crop": 10})
    assert array.shape == (3, 10, 10) and array.dtype == np.float32
    expected = (np.array([1.0, 0.2, 0.0]) - PREPROCESS["mean"]) / PREPROCESS["std"]
    np.testing.assert_allclose(array[:, 4, 4], expected, atol=1e-5)
    np.testing.assert_allclose(array, np.broadcast_to(expected[:, None, None], array.shape),
                               atol=1e-5)


def test_preprocess_resizes_shorter_side_and_centre_crops():
    # three 30x30 squares side by side: with resize == crop == 30 the crop is the middle one
    image = Image.new("RGB", (90, 30), (255, 0, 0))
    image.paste((0, 255, 0), (30, 0, 60, 30))
    image.paste((0, 0, 255), (60, 0, 90, 30))
    spec = {"resize": 30, "crop": 30, "mean": [0, 0, 0], "std": [1, 1, 1]}
    array = preprocess(image, spec)
    np.testing.assert_array_equal(array[1], np.ones((30, 30), np.float32))
    np.testing.assert_array_equal(array[0] + array[2], np.zeros((30, 30), np.float32))
    # portrait input: the width becomes `resize`, the crop is square
    tall = preprocess(Image.new("RGB", (20, 50)), {**spec, "resize": 16, "crop": 14})
    assert tall.shape == (3, 14, 14)
    batch = preprocess_batch([image, image.transpose(Image.Transpose.ROTATE_90)], spec)
    assert batch.shape == (2, 3, 30, 30)
    assert preprocess_batch([], spec).shape == (0, 3, 30, 30)


def test_load_image_applies_exif_orientation(tmp_path):
    # stored landscape, left half red; orientation 6 says "rotate 90 degrees clockwise to view"
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)
    upright = load_image(path)
    assert upright.mode == "RGB" and upright.size == (20, 40)
    assert upright.getpixel((10, 5)) == (255, 0, 0)    # red is now on top
    assert upright.getpixel((10, 35)) == (0, 0, 255)


def test_load_image_converts_to_rgb(tmp_path):
    Image.new("L", (9, 7), 200).save(tmp_path / "grey.png")
    Image.new("RGBA", (9, 7), (10, 20, 30, 40)).save(tmp_path / "alpha.png")
    assert load_image(tmp_path / "grey.png").getpixel((0, 0)) == (200, 200, 200)
    assert load_image(tmp_path / "alpha.png").mode == "RGB"


@pytest.mark.parametrize("kind", ["missing", "text", "truncated", "directory"])
def test_unreadable_image_is_a_one_line_image_error(tmp_path, kind):
    path = tmp_path / "bad.jpg"
    if kind == "text":
        path.write_text("not an image")
    elif kind == "truncated":
        Image.new("RGB", (64, 64), (1, 2, 3)).save(path, format="JPEG")
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(ImageError) as caught:
        load_image(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: cannot read image (") and "\n" not in message


# --- ImageFolder -----------------------------------------------------------------------------
def write_image_folder(root: Path, classes: dict[str, int], size=(12, 10), seed=3) -> None:
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"img{i}.png")


def test_list_image_folder_sorts_classes_and_samples(tmp_path):
    write_image_folder(tmp_path, {"zebra": 2, "apple": 3})
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "apple" / "sub").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "apple" / "sub" / "deep.JPG")
    classes, samples = list_image_folder(tmp_path)
    assert classes == ["apple", "zebra"]
    assert [(p.relative_to(tmp_path).as_posix(), c) for p, c in samples] == [
        ("apple/img0.png", 0), ("apple/img1.png", 0), ("apple/img2.png", 0),
        ("apple/sub/deep.JPG", 0), ("zebra/img0.png", 1), ("zebra/img1.png", 1)]


@pytest.mark.parametrize("layout", ["missing", "no classes", "empty class"])
def test_list_image_folder_refusals(tmp_path, layout):
    root = tmp_path / "data"
    if layout == "no classes":
        root.mkdir()
        Image.new("RGB", (4, 4)).save(root / "loose.png")
    elif layout == "empty class":
        write_image_folder(root, {"cat": 1})
        (root / "dog").mkdir()
        (root / "dog" / "readme.txt").write_text("x")
    with pytest.raises(DataError) as caught:
        list_image_folder(root)
    assert "\n" not in str(caught.value)


# --- Runtime ---------------------------------------------------------------------------------

LABELS = ["ant", "bee", "cat"]


@pytest.fixture(scope="module")
def signing_key():
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def trusted(signing_key):
    return {keys.key_id(signing_key): signing_key.public_key()}


def make_pack(path: Path, base: Base, signing_key, *, task="insects", version=1, base_id=None,
              layers=None, head_features=FEATURES, bn=None, seed=7, preprocess=PREPROCESS) -> Path:
    rng = np.random.default_rng(seed)
    layers = random_modulators(base, seed=seed) if layers is None else layers
    # the pack's modulator spec says the hidden size of each kind: read it off the layers given
    hidden = {"kernel_hidden": 4, "channel_hidden": 4}
    for layer in reversed(layers):
        field = layer.get if isinstance(layer, dict) else lambda name, default=None: getattr(layer, name)
        if field("adapter", "km") == "km":
            hidden[f"{field('kind')}_hidden"] = int(np.shape(field("tensors")["w1"])[1])
    body = {
        "task": task, "pack_version": version, "created": "2026-11-28T02:10:00Z",
        "base_id": base_id or base.base_id, "labels": LABELS, "preprocess": preprocess,
        "method": "km",
        "modulator": {"kind": "auto", **hidden, "activation": "relu"},
        "layers": layers,
        "head": {"weight": rng.normal(0, 1, (len(LABELS), head_features)).astype(np.float32),
                 "bias": rng.normal(0, 0.1, len(LABELS)).astype(np.float32)},
        "bn": bn or [], "metrics": {"host_val_accuracy": 0.5}, "trainer": {"epochs": 1},
    }
    path.write_bytes(build_pack(body, signing_key))
    return path


@pytest.fixture()
def runtime(tiny_base_dir, trusted):
    return Runtime(tiny_base_dir, trusted)


def test_runtime_runs_a_pack_like_the_reference(tiny_base_dir, trusted, signing_key, params, tmp_path):
    base = Base.open(tiny_base_dir)
    bn = [{"name": "bn.0", "tensors": {
        "weight": np.full(CHANNELS, 1.5, np.float32), "bias": np.zeros(CHANNELS, np.float32),
        "running_mean": np.zeros(CHANNELS, np.float32), "running_var": np.ones(CHANNELS, np.float32)}}]
    path = make_pack(tmp_path / "insects.kmp", base, signing_key, bn=bn)
    images = random_images(5)
    ort_runtime, reference_runtime = Runtime(tiny_base_dir, trusted), Runtime(tiny_base_dir, trusted, "reference")
    loaded = ort_runtime.load_pack(path)
    reference_runtime.load_pack(path)
    assert set(loaded.timings_ms) == {"verify", "rebuild", "session", "probe"}
    assert all(t >= 0 for t in loaded.timings_ms.values())
    features = ort_runtime.features(images)
    np.testing.assert_allclose(features, reference_runtime.features(images), atol=1e-5)
    kernels = km.rebuild_kernels(base.conv_kernels(), loaded.pack.layers)
    expected = numpy_features(images, params, kernels, {"bn.0": bn[0]["tensors"]})
    np.testing.assert_allclose(features, expected, atol=1e-5)
    head = loaded.pack.head
    np.testing.assert_allclose(ort_runtime.logits(images), expected @ head["weight"].T + head["bias"],
                               atol=1e-4)


def test_pack_for_another_base_is_refused(runtime, tiny_base_dir, signing_key, tmp_path):
    base = runtime.base
    good = runtime.load_pack(make_pack(tmp_path / "good.kmp", base, signing_key))
    other = "f" * 64
    with pytest.raises(BaseMismatchError) as caught:
        runtime.load_pack(make_pack(tmp_path / "other.kmp", base, signing_key, base_id=other))
    message = str(caught.value)
    assert "other.kmp" in message and other[:12] in message and base.base_id[:12] in message
    assert runtime.active is good  # nothing of the refused pack is used


@pytest.mark.parametrize("damage", ["unknown layer", "modulator size", "head size", "bn size"])
def test_pack_that_does_not_fit_the_base_is_refused(runtime, signing_key, tmp_path, damage):
    base = runtime.base
    layers, head_features, bn = random_modulators(base), FEATURES, None
    if damage == "unknown layer":
        layers[0] = dataclasses.replace(layers[0], name="features.9")
    elif damage == "modulator size":  # a kernel modulator of a 5x5 conv on a 3x3 conv
        layers[0] = dataclasses.replace(layers[0], tensors={
            n: np.ones(s, np.float32) for n, s in km.modulator_shapes(25, 4).items()})
    elif damage == "head size":
        head_features = FEATURES + 1
    else:
        bn = [{"name": "bn.0", "tensors": {t: np.ones(CHANNELS + 1, np.float32) for t in
                                           ("weight", "bias", "running_mean", "running_var")}}]
    path = make_pack(tmp_path / "bad.kmp", base, signing_key, layers=layers,
                     head_features=head_features, bn=bn)
    with pytest.raises(ShapeMismatchError) as caught:
        runtime.load_pack(path)
    assert "\n" not in str(caught.value) and runtime.active is None


def test_pack_with_unusable_preprocessing_is_refused(runtime, signing_key, tmp_path):
    # the format refuses it already when writing (and reading: tests/test_pack_limits.py)
    with pytest.raises(MalformedPackError, match="std"):
        make_pack(tmp_path / "p.kmp", runtime.base, signing_key,
                  preprocess={**PREPROCESS, "std": [0.2, 0.0, 0.2]})


def test_older_pack_for_the_same_task_is_a_downgrade(runtime, signing_key, tmp_path):
    base = runtime.base
    v1 = make_pack(tmp_path / "v1.kmp", base, signing_key, version=1, seed=1)
    v2 = make_pack(tmp_path / "v2.kmp", base, signing_key, version=2, seed=2)
    runtime.load_pack(v1)
    loaded_v2 = runtime.load_pack(v2)
    with pytest.raises(DowngradeError, match="version 1"):
        runtime.load_pack(v1)  # even though its session is still cached
    assert runtime.active is loaded_v2
    other_task = make_pack(tmp_path / "other.kmp", base, signing_key, task="birds", version=1)
    runtime.load_pack(other_task)
    again = runtime.load_pack(v2)  # switching back hits the session cache
    assert again is loaded_v2 and again.timings_ms["rebuild"] == 0.0


def test_untrusted_pack_is_refused(tiny_base_dir, signing_key, tmp_path):
    stranger = Ed25519PrivateKey.generate()
    runtime = Runtime(tiny_base_dir, {keys.key_id(stranger): stranger.public_key()})
    with pytest.raises(UntrustedKeyError):
        runtime.load_pack(make_pack(tmp_path / "p.kmp", runtime.base, signing_key))


def test_predict_reports_a_corrupt_image_and_predicts_the_rest(runtime, signing_key, tmp_path):
    loaded = runtime.load_pack(make_pack(tmp_path / "p.kmp", runtime.base, signing_key))
    write_image_folder(tmp_path / "imgs", {"x": 3})
    good = sorted((tmp_path / "imgs" / "x").glob("*.png"))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff garbage")
    paths = [good[0], corrupt, good[1], good[2]]
    results = runtime.predict(paths, top_k=2, batch_size=2)
    assert [r["image"] for r in results] == [str(p) for p in paths]
    assert "error" in results[1] and "top" not in results[1]
    assert results[1]["error"].startswith(f"{corrupt}: cannot read image")
    batch = preprocess_batch([load_image(p) for p in good], PREPROCESS)
    expected = np.argmax(runtime.logits(batch), axis=1)
    for result, label_index in zip([results[0], results[2], results[3]], expected):
        top = result["top"]
        assert len(top) == 2 and top[0]["probability"] >= top[1]["probability"]
        assert top[0]["index"] == label_index and top[0]["label"] == LABELS[label_index]
        assert 0.0 < top[0]["probability"] <= 1.0
    assert {"preprocess", "infer"} <= set(loaded.timings_ms)
    assert all(len(r["top"]) == len(LABELS) for r in runtime.predict(good, top_k=99))


def test_evaluate_reports_accuracy_per_class(runtime, signing_key, tmp_path):
    runtime.load_pack(make_pack(tmp_path / "p.kmp", runtime.base, signing_key))
    root = tmp_path / "val"
    write_image_folder(root, {"ant": 3, "cat": 2}, seed=11)  # a subset of the labels is fine
    report = runtime.evaluate(root, batch_size=2)
    classes, samples = list_image_folder(root)
    batch = preprocess_batch([load_image(p) for p, _ in samples], PREPROCESS)
    # in the same batches of 2 as evaluate, so the very same float computation is compared
    predicted = np.argmax(np.concatenate([runtime.logits(batch[i:i + 2]) for i in range(0, len(batch), 2)]), axis=1)
    truth = np.array([LABELS.index(classes[c]) for _, c in samples])
    assert report["n_images"] == 5
    assert report["accuracy"] == pytest.approx(float(np.mean(predicted == truth)))
    assert report["per_class"]["ant"]["n"] == 3 and report["per_class"]["cat"]["n"] == 2
    assert report["per_class"]["cat"]["accuracy"] == pytest.approx(
        float(np.mean(predicted[3:] == truth[3:])))
    write_image_folder(root, {"dog": 1})
    with pytest.raises(DataError, match="dog"):
        runtime.evaluate(root)


def test_switching_packs_switches_the_model(runtime, signing_key, tmp_path):
    first = make_pack(tmp_path / "a.kmp", runtime.base, signing_key, task="a", seed=1)
    second = make_pack(tmp_path / "b.kmp", runtime.base, signing_key, task="b", seed=2)
    images = random_images(2)
    runtime.load_pack(first)
    features_first = runtime.features(images)
    runtime.load_pack(second)
    assert np.abs(runtime.features(images) - features_first).max() > 1e-3
    runtime.load_pack(first)
    np.testing.assert_array_equal(runtime.features(images), features_first)


def test_runtime_needs_a_base_and_a_pack(tmp_path, trusted, tiny_base_dir):
    with pytest.raises(BaseError) as caught:
        Runtime(tmp_path / "nowhere", trusted)
    assert isinstance(caught.value, KmEdgeError)
    with pytest.raises(RuntimeError, match="load_pack"):
        Runtime(tiny_base_dir, trusted).features(random_images(1))
