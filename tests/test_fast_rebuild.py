"""The fast kernel rebuild computes what ``km.modulate`` (the definition) computes, and the Runtime's
memory scheme (one reused rebuild buffer for kernels onnxruntime fuses at load, release on
eviction) never changes what a loaded pack predicts.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper
from test_device_runtime import export, make_pack, random_images

from device_runtime import keys, km, native
from device_runtime.backends import fused_at_load
from device_runtime.basefiles import write_base
from device_runtime.errors import PackLimitError, ShapeMismatchError
from device_runtime.pack import Layer
from device_runtime.runtime import Runtime

TOLERANCE = 1e-6  # on the rebuilt kernel: absolute and relative (float32 rounding of the folded constants)

# (weight shape, kind, hidden): spatial and 1x1, depthwise, one and many hidden units, a single
# row, a spatial channel modulator, and layers big enough to span several row blocks
SHAPES = [
    ((8, 3, 3, 3), "kernel", 8),
    ((32, 1, 3, 3), "kernel", 8),          # depthwise
    ((16, 24, 1, 1), "channel", 1),
    ((16, 24, 1, 1), "channel", 5),
    ((1, 1, 5, 5), "kernel", 3),           # one row
    ((6, 4, 3, 3), "channel", 2),          # channel vectors of a spatial kernel
    ((4, 6, 1, 1), "kernel", 2),           # kernel modulator on a 1x1 conv: d = 1
    ((256, 64, 3, 3), "kernel", 8),        # 16384 rows: several blocks
    ((320, 960, 1, 1), "channel", 1),      # wide rows: several blocks
]


def modulator(shape, kind, hidden, seed):
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.2, shape).astype(np.float32)  # conv kernels are of this order
    d = km.vector_length(kind, shape)
    tensors = {name: rng.normal(0, 0.4, s).astype(np.float32)
               for name, s in km.modulator_shapes(d, hidden).items()}
    tensors["w1"] *= np.float32(2.5 / np.sqrt(d))  # unit-scale pre-activations, as training starts
    return weight, tensors, km.kernel_scale(weight)


@pytest.mark.parametrize("engine", ["numpy", "native"])
@pytest.mark.parametrize("activation", km.ACTIVATIONS)
@pytest.mark.parametrize("shape,kind,hidden", SHAPES, ids=[f"{s}-{k}-h{h}" for s, k, h in SHAPES])
def test_fast_rebuild_matches_the_definition(shape, kind, hidden, activation, engine):
    """Both rebuild engines: numpy's blocks and the compiled kernel (device_runtime.native)."""
    if engine == "native" and not native.available():
        pytest.skip(f"compiled kernel not in use: {native.REASON}")
    weight, tensors, scale = modulator(shape, kind, hidden, seed=hash((shape, kind)) % 1000)
    reference = km.modulate(weight, tensors, kind, activation, scale)
    fast = km.modulate_fast(weight, tensors, kind, activation, scale, use_native=engine == "native")
    assert fast.shape == weight.shape and fast.dtype == np.float32
    np.testing.assert_allclose(fast, reference, rtol=TOLERANCE, atol=TOLERANCE)
    assert np.abs(fast - weight).max() > 1e-2  # the modulators really change the kernel


def test_gelu_is_torch_tanh_gelu_over_a_wide_range():
    x = np.linspace(-12, 12, 4001, dtype=np.float32)
    expected = 0.5 * x.astype(np.float64) * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x.astype(np.float64) ** 3)))
    np.testing.assert_allclose(km.activate(x.copy(), "gelu"), expected, rtol=1e-5, atol=1e-6)


def test_fast_rebuild_reads_a_read_only_kernel_and_writes_into_out():
    weight, tensors, scale = modulator((8, 8, 3, 3), "kernel", 4, seed=3)
    weight.setflags(write=False)  # base kernels are views of a read-only memory map
    out = np.full(weight.shape, np.nan, dtype=np.float32)
    result = km.modulate_fast(weight, tensors, "kernel", "gelu", scale, out=out)
    assert result is out
    np.testing.assert_allclose(out, km.modulate(weight, tensors, "kernel", "gelu", scale),
                               rtol=TOLERANCE, atol=TOLERANCE)
    with pytest.raises(ValueError, match="out"):
        km.modulate_fast(weight, tensors, "kernel", "gelu", scale, out=np.empty((8, 8, 9), np.float32))


def test_fast_rebuild_refuses_modulators_that_do_not_fit():
    weight, tensors, scale = modulator((8, 4, 3, 3), "kernel", 4, seed=4)
    tensors["w2"] = tensors["w2"][:, :5]
    with pytest.raises(ShapeMismatchError, match="w2"):
        km.modulate_fast(weight, tensors, "kernel", "relu", scale)


def model_layers(seed=5):
    """A model's worth of kernels and pack layers: KM of every kind plus one LoRA layer."""
    rng = np.random.default_rng(seed)
    kernels, layers = {}, []
    for index, (shape, kind, hidden) in enumerate(SHAPES[:6]):
        weight, tensors, scale = modulator(shape, kind, hidden, seed=seed + index)
        name = f"conv{index}"
        kernels[name] = weight
        layers.append(Layer(name=name, adapter="km", kind=kind, activation=km.ACTIVATIONS[index % 4],
                            scale=scale, tensors=tensors))
    kernels["lora"], lora = lora_layer(rng)
    layers.append(lora)
    return kernels, layers


def lora_layer(rng):
    """A 3x3 conv kernel and a rank-2 LoRA layer record for it (name "lora")."""
    layer = Layer(name="lora", adapter="lora", kind="", activation="", scale=0.5,
                  tensors={"a": rng.normal(size=(2, 27)).astype(np.float32),
                           "b": rng.normal(size=(6, 2)).astype(np.float32)})
    return rng.normal(size=(6, 3, 3, 3)).astype(np.float32), layer


def expected_kernels(kernels, layers):
    out = {}
    for layer in layers:
        weight = kernels[layer.name]
        if layer.adapter == "km":
            out[layer.name] = km.modulate(weight, layer.tensors, layer.kind, layer.activation, layer.scale)
        else:
            out[layer.name] = km.lora_update(weight, layer.tensors, layer.scale)
    return out


@pytest.mark.parametrize("threads", [None, 3])
def test_rebuild_kernels_builds_every_layer_into_one_buffer(threads):
    kernels, layers = model_layers()
    expected = expected_kernels(kernels, layers)
    size = km.rebuild_size(kernels, layers)
    assert size == sum(k.size for k in kernels.values())
    buffer = np.full(size + 10, np.nan, dtype=np.float32)
    rebuilt = km.rebuild_kernels(kernels, layers, threads=threads, buffer=buffer)
    assert list(rebuilt) == [layer.name for layer in layers]
    for name, kernel in rebuilt.items():
        assert np.shares_memory(kernel, buffer) and kernel.flags.c_contiguous
        np.testing.assert_allclose(kernel, expected[name], rtol=0, atol=1e-5)
    # a fresh buffer gives the same numbers
    for name, kernel in km.rebuild_kernels(kernels, layers).items():
        np.testing.assert_array_equal(kernel, rebuilt[name])


@pytest.mark.parametrize("threads", [None, 3])
def test_rebuild_kernels_writes_each_layer_at_its_offset_and_nothing_else(threads):
    """Where the runtime's RAM copy of base.weights needs them: the kernels at given places, in any
    order, with gaps left as they were."""
    kernels, layers = model_layers()
    sizes = [kernels[layer.name].size for layer in layers]
    offsets, at = [], 7
    for size in reversed(sizes):  # last layer first, a gap of 5 floats between kernels
        offsets.insert(0, at)
        at += size + 5
    buffer = np.full(at, -3.0, dtype=np.float32)
    rebuilt = km.rebuild_kernels(kernels, layers, threads=threads, buffer=buffer, offsets=offsets)
    packed = km.rebuild_kernels(kernels, layers)
    written = np.zeros(buffer.size, bool)
    for layer, offset, size in zip(layers, offsets, sizes):
        assert np.shares_memory(rebuilt[layer.name], buffer[offset:offset + size])
        np.testing.assert_array_equal(buffer[offset:offset + size], packed[layer.name].reshape(-1))
        written[offset:offset + size] = True
    assert (buffer[~written] == -3.0).all()
    with pytest.raises(ValueError, match="overlap"):
        km.rebuild_kernels(kernels, layers[:2], buffer=buffer, offsets=[0, sizes[0] - 1])
    with pytest.raises(ValueError, match="at least"):
        km.rebuild_kernels(kernels, layers[:1], buffer=buffer, offsets=[buffer.size - 1])
    with pytest.raises(ValueError, match="one offset per layer"):
        km.rebuild_kernels(kernels, layers, buffer=buffer, offsets=[0])


@pytest.mark.parametrize("activation", km.ACTIVATIONS)
def test_many_small_layers_next_to_big_ones_match_the_definition(activation):
    """Many small layers sharing (d, h, activation), of different lengths, next to big ones: what a
    MobileNet looks like (depthwise 3x3 and 1x1 convs)."""
    kernels, layers = {}, []
    shapes = [((o, 1, 3, 3), "kernel", 8) for o in (16, 96, 144, 40)] + \
             [((o, 24, 1, 1), "channel", 1) for o in (8, 144, 72)] + [((512, 24, 1, 1), "channel", 1)] + \
             [((160, 256, 1, 1), "channel", 1), ((128, 64, 3, 3), "kernel", 8)]
    for index, (shape, kind, hidden) in enumerate(shapes):
        weight, tensors, scale = modulator(shape, kind, hidden, seed=20 + index)
        kernels[f"c{index}"] = weight
        layers.append(Layer(name=f"c{index}", adapter="km", kind=kind, activation=activation,
                            scale=scale, tensors=tensors))
    rebuilt = km.rebuild_kernels(kernels, layers)
    for name, expected in expected_kernels(kernels, layers).items():
        np.testing.assert_allclose(rebuilt[name], expected, rtol=TOLERANCE, atol=TOLERANCE)
    # tensors that fit each other (the record checks that) but not this layer's kernels
    wrong = {n: np.zeros(s, np.float32) for n, s in km.modulator_shapes(4, 8).items()}
    bad = [Layer(**{**vars(layers[0]), "tensors": wrong})] + layers[1:]
    with pytest.raises(ShapeMismatchError, match="w1"):
        km.rebuild_kernels(kernels, bad)


def test_rebuild_kernels_refusals():
    kernels, layers = model_layers()
    with pytest.raises(ValueError, match="buffer"):
        km.rebuild_kernels(kernels, layers, buffer=np.empty(10, np.float32))
    with pytest.raises(ShapeMismatchError, match="nowhere"):
        km.rebuild_kernels(kernels, [Layer(**{**vars(layers[0]), "name": "nowhere"})])
    with pytest.raises(PackLimitError, match="adapter"):  # no such layer reaches the rebuild
        Layer(**{**vars(layers[0]), "adapter": "dora"})


# --- which kernels onnxruntime fuses at load ------------------------------------------------------
def conv_relu_model():
    """Conv -> BN -> Relu -> 1x1 Conv (bias, no BN) -> Relu -> pool: one fusable conv, one not."""
    rng = np.random.default_rng(0)
    arrays = {
        "c0.weight": rng.normal(0, 0.5, (4, 3, 3, 3)), "bn.weight": rng.uniform(0.5, 1.5, 4),
        "bn.bias": rng.normal(0, 0.1, 4), "bn.running_mean": rng.normal(0, 0.1, 4),
        "bn.running_var": rng.uniform(0.5, 1.5, 4),
        "c1.weight": rng.normal(0, 0.5, (5, 4, 1, 1)), "c1.bias": rng.normal(0, 0.1, 5),
    }
    inits = [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in arrays.items()]
    nodes = [
        helper.make_node("Conv", ["images", "c0.weight"], ["c0.out"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("BatchNormalization", ["c0.out", "bn.weight", "bn.bias", "bn.running_mean",
                                                "bn.running_var"], ["bn.out"]),
        helper.make_node("Relu", ["bn.out"], ["r0"]),
        helper.make_node("Conv", ["r0", "c1.weight", "c1.bias"], ["c1.out"], kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c1.out"], ["r1"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
    ]
    graph = helper.make_graph(nodes, "convrelu",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    conv_layers = [{"name": "c0", "initializer": "c0.weight"}, {"name": "c1", "initializer": "c1.weight"}]
    bn_layers = [{"name": "bn", "tensors": {t: f"bn.{t}" for t in ("weight", "bias", "running_mean", "running_var")}}]
    meta = {"arch": "convrelu", "input_size": 8, "feature_size": 5, "input_name": "images",
            "output_name": "features",
            "preprocess": {"resize": 8, "crop": 8, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear"}}
    return model, conv_layers, bn_layers, meta


@pytest.fixture(scope="module")
def signer():
    key = Ed25519PrivateKey.generate()
    return key, {keys.key_id(key): key.public_key()}


def test_only_convs_fused_into_batchnorm_share_the_rebuild_buffer(tmp_path):
    export(tmp_path / "tiny")  # every conv of the tiny base feeds a BatchNormalization
    assert fused_at_load(tmp_path / "tiny" / "base.onnx") == {
        "features.0.weight", "features.1.weight", "features.2.weight"}
    write_base(tmp_path / "convrelu", *conv_relu_model())
    assert fused_at_load(tmp_path / "convrelu" / "base.onnx") == {"c0.weight"}


def test_a_cached_pack_keeps_its_model_while_other_packs_reuse_the_buffer(tmp_path, signer):
    """Load A, then B, C (each rebuilt into the same buffer), then switch back to A from the cache:
    A predicts exactly what it did, on a base with a fused and an unfused conv."""
    key, trusted = signer
    model, conv_layers, bn_layers, meta = conv_relu_model()
    write_base(tmp_path / "base", model, conv_layers, bn_layers, meta)
    runtime = Runtime(tmp_path / "base", trusted, cache_size=3)
    base = runtime.base
    images = np.random.default_rng(1).normal(size=(3, 3, 8, 8)).astype(np.float32)

    def pack(name, seed):
        rng = np.random.default_rng(seed)
        layers = []
        for layer, weight in base.conv_kernels().items():
            kind = km.resolve_kind("auto", weight.shape)
            d = km.vector_length(kind, weight.shape)
            layers.append({"name": layer, "adapter": "km", "kind": kind, "activation": "gelu",
                           "scale": km.kernel_scale(weight),
                           "tensors": {n: rng.normal(0, 0.5, s).astype(np.float32)
                                       for n, s in km.modulator_shapes(d, 2).items()}})
        from device_runtime import pack as packformat

        body = {"task": name, "pack_version": 1, "created": "2026-11-28T02:10:00Z", "base_id": base.base_id,
                "labels": ["a", "b"], "preprocess": meta["preprocess"], "method": "km",
                "modulator": {"kind": "auto", "kernel_hidden": 2, "channel_hidden": 2, "activation": "gelu"},
                "layers": layers, "head": {"weight": rng.normal(size=(2, 5)).astype(np.float32),
                                           "bias": np.zeros(2, np.float32)},
                "bn": [], "metrics": {}, "trainer": {}}
        path = tmp_path / f"{name}.kmp"
        path.write_bytes(packformat.build_pack(body, key))
        return path, layers

    (path_a, layers_a), (path_b, _), (path_c, _) = pack("a", 1), pack("b", 2), pack("c", 3)
    runtime.load_pack(path_a)
    first = runtime.features(images)
    # what the pack means, computed apart from the runtime: the reference backend on plain copies
    from device_runtime.backends import ReferenceBackend

    kernels = km.rebuild_kernels(base.conv_kernels(), [Layer(**layer) for layer in layers_a])
    expected = ReferenceBackend(base.graph_path, {base.initializer_for(n): k.copy() for n, k in kernels.items()})
    np.testing.assert_allclose(first, expected.features(images), rtol=1e-4, atol=1e-5)
    runtime.load_pack(path_b)
    assert np.abs(runtime.features(images) - first).max() > 1e-3
    runtime.load_pack(path_c)
    runtime.load_pack(path_a)  # a cache hit: nothing rebuilt
    assert runtime.active.timings_ms["rebuild"] == 0.0
    np.testing.assert_array_equal(runtime.features(images), first)


def test_evicted_packs_are_released(tmp_path, signer):
    key, trusted = signer
    export(tmp_path / "base")
    runtime = Runtime(tmp_path / "base", trusted, cache_size=2)
    packs = [make_pack(tmp_path / f"{t}.kmp", runtime.base, key, task=t, seed=i)
             for i, t in enumerate(["a", "b", "c", "d"])]
    backends = []
    for path in packs:
        backends.append(weakref.ref(runtime.load_pack(path).backend))
    gc.collect()
    assert len(runtime.cached) == 2
    assert [ref() is None for ref in backends] == [True, True, False, False]
    runtime.load_pack(packs[2])  # still cached
    assert len(runtime.cached) == 2 and runtime.active.timings_ms["rebuild"] == 0.0
    runtime.clear_cache()
    gc.collect()
    assert runtime.cached == [] and runtime.active is None
    assert all(ref() is None for ref in backends)
    runtime.load_pack(packs[0])
    assert runtime.features(random_images(1)).shape == (1, 10)


def test_cache_hit_on_an_unchanged_file_skips_reading_it_and_a_changed_file_is_read(tmp_path, signer, monkeypatch):
    import device_runtime.runtime as runtime_module

    key, trusted = signer
    export(tmp_path / "base")
    runtime = Runtime(tmp_path / "base", trusted, cache_size=2)
    reads = []

    def counting_read(path, *args, **kwargs):
        reads.append(str(path))
        return read_pack_file(path, *args, **kwargs)

    from device_runtime.pack import read_pack_file

    monkeypatch.setattr(runtime_module, "read_pack_file", counting_read)
    monkeypatch.setattr(runtime_module, "_SETTLED_NS", 0)  # the file counts as settled at once
    path = make_pack(tmp_path / "task.kmp", runtime.base, key, task="t", version=1, seed=1)
    first = runtime.load_pack(path)
    runtime.load_pack(path)
    assert len(reads) == 1 and runtime.active is first  # second load: stat only
    make_pack(path, runtime.base, key, task="t", version=2, seed=2)  # rewritten in place
    second = runtime.load_pack(path)
    assert len(reads) == 2 and second is not first and second.pack.pack_version == 2
    monkeypatch.setattr(runtime_module, "_SETTLED_NS", 10**18)  # a file changed "just now"
    other = make_pack(tmp_path / "other.kmp", runtime.base, key, task="o", seed=3)
    runtime.load_pack(other)
    runtime.load_pack(other)
    assert len(reads) == 4  # too fresh to trust its time stamps: read again (and still a cache hit)
    assert runtime.active.timings_ms["rebuild"] == 0.0
