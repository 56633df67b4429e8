"""The compiled rebuild kernel (device_runtime/_kmnative.c via device_runtime.native) computes what
``km.modulate`` (the definition) computes, on every path its C code takes (rows across or along,
the 3x3 and 5x5 specialisations, partial tiles, saturated activations), in one call for a whole
pack as per layer, with threads; what it cannot take is left to numpy; and ``KM_EDGE_NATIVE=0``
really turns it off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_device_runtime import device_folder, make_pack, random_images
from test_fast_rebuild import expected_kernels, lora_layer

from device_runtime import keys, km, limits, native
from device_runtime.errors import NonFiniteError, ShapeMismatchError
from device_runtime.pack import Layer

TOLERANCE = 1e-6  # absolute and relative, on the rebuilt kernel (as tests/test_fast_rebuild.py)
ROOT = Path(__file__).resolve().parents[1]

needs_native = pytest.mark.skipif(not native.available(), reason=f"compiled kernel: {native.REASON}")


def test_the_test_install_built_the_kernel():
    """`make test` installs km-edge with pip, which compiles the kernel: the tests below must not be
    skipped for lack of it (KM_EDGE_NATIVE=0 is the one deliberate way to run without)."""
    if os.environ.get(native.ENV, "1").strip() == "0":
        pytest.skip(f"{native.ENV}=0")
    assert native.available(), native.REASON
    assert native.engine() == "native" and native.PATH is not None and native.PATH.is_file()


def modulator(shape, kind, hidden, seed, gain=2.5):
    """A weight and a modulator whose pre-activations are of order ``gain`` (2.5: as training
    starts; 40: far into every activation's saturation, where exp is clamped)."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.2, shape).astype(np.float32)
    d = km.vector_length(kind, shape)
    tensors = {name: rng.normal(0, 0.4, s).astype(np.float32)
               for name, s in km.modulator_shapes(d, hidden).items()}
    tensors["w1"] *= np.float32(gain / np.sqrt(d))
    return weight, tensors, km.kernel_scale(weight)


# (weight shape, kind, hidden): rows across (d < 16, or d < 64 with h > 1) with the 9/8 and 25/8
# specialisations and the generic path, rows along (long rows, one and many hidden units), row
# counts below, at and off a multiple of the 8-row tile, d not a multiple of 8
SHAPES = [
    ((3, 1, 3, 3), "kernel", 8),        # 3 rows: only a partial tile
    ((8, 1, 3, 3), "kernel", 8),        # one whole tile
    ((13, 7, 3, 3), "kernel", 8),       # 91 rows, 9/8 specialisation
    ((12, 1, 5, 5), "kernel", 8),       # 25/8 specialisation, partial tile
    ((5, 3, 7, 7), "kernel", 8),        # d 49: generic across
    ((10, 4, 3, 3), "kernel", 3),       # d 9, h 3: generic across
    ((9, 2, 1, 1), "kernel", 2),        # d 1
    ((11, 8, 1, 1), "channel", 1),      # d 8, h 1: across
    ((11, 13, 1, 1), "channel", 17),    # d 13, h 17: across, more hidden than inputs
    ((21, 16, 1, 1), "channel", 1),     # d 16, h 1: along
    ((19, 40, 1, 1), "channel", 3),     # d 40, h 3: across
    ((17, 100, 1, 1), "channel", 1),    # d 100: along, a 4-float tail
    ((33, 576, 1, 1), "channel", 3),    # d 576, h 3: along with a gain row
    ((6, 4, 3, 3), "channel", 2),       # channel vectors of a spatial kernel (transposed)
]


@needs_native
@pytest.mark.parametrize("gain", [2.5, 40.0])
@pytest.mark.parametrize("activation", km.ACTIVATIONS)
@pytest.mark.parametrize("shape,kind,hidden", SHAPES, ids=[f"{s}-{k}-h{h}" for s, k, h in SHAPES])
def test_kernel_matches_the_definition_on_every_path(shape, kind, hidden, activation, gain):
    weight, tensors, scale = modulator(shape, kind, hidden, seed=sum(shape) + hidden, gain=gain)
    reference = km.modulate(weight, tensors, kind, activation, scale)
    native_out = km.modulate_fast(weight, tensors, kind, activation, scale, use_native=True)
    numpy_out = km.modulate_fast(weight, tensors, kind, activation, scale, use_native=False)
    assert np.isfinite(native_out).all()
    # float32 rounding of the pre-activation sums (summed in another order by each of the three)
    # grows with their size: at 16x the pre-activations, 16x the bound
    tolerance = TOLERANCE * gain / 2.5
    np.testing.assert_allclose(native_out, reference, rtol=TOLERANCE, atol=tolerance)
    np.testing.assert_allclose(native_out, numpy_out, rtol=TOLERANCE, atol=tolerance)
    assert np.abs(native_out - weight).max() > 1e-2  # the modulators really change the kernel


@needs_native
@pytest.mark.parametrize("activation", km.ACTIVATIONS)
def test_activations_at_extreme_inputs_stay_finite_and_exact(activation):
    """Pre-activations from -1e4 to 1e4 (exp's clamps at both ends, tanh and sigmoid flat): the
    kernel's closed forms match numpy's; nothing becomes inf, NaN or a denormal-driven wrong sign."""
    x = np.concatenate([np.linspace(-1e4, 1e4, 801), np.linspace(-30, 30, 2401)]).astype(np.float32)
    n = x.size
    tensors = {"w1": np.ones((1, 1), np.float32), "b1": np.zeros(1, np.float32),
               "w2": np.ones((1, 1), np.float32), "b2": np.zeros(1, np.float32)}
    rows = x.reshape(n, 1)  # one row per value, d = 1: the kernel's output is x * (1 + act(x))
    out = np.empty_like(rows)
    gain = km._ACTIVATION_GAIN[activation]
    assert native.modulate_rows(rows, out, tensors["w1"], tensors["b1"], tensors["w2"] / gain,
                                tensors["b2"] + 1, activation)
    with np.errstate(over="ignore"):  # numpy's silu overflows exp in float64 too, harmlessly
        expected = x * (1 + km.activate(x.astype(np.float64), activation))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[:, 0], expected, rtol=2e-6, atol=1e-6)


def pack_of(count=12, seed=3):
    """Layers like a small base's: 3x3 and 5x5 depthwise, 1x1 of several widths, one spatial
    channel modulator (numpy does it) and one LoRA layer."""
    shapes = [((16, 1, 3, 3), "kernel", 8), ((24, 1, 5, 5), "kernel", 8), ((32, 16, 1, 1), "channel", 1),
              ((64, 24, 1, 1), "channel", 1), ((40, 96, 1, 1), "channel", 1), ((8, 8, 3, 3), "kernel", 8),
              ((6, 4, 3, 3), "channel", 2), ((96, 40, 1, 1), "channel", 4)]
    kernels, layers = {}, []
    for index in range(count):
        shape, kind, hidden = shapes[index % len(shapes)]
        weight, tensors, scale = modulator(shape, kind, hidden, seed=seed + index)
        name = f"c{index}"
        kernels[name] = weight
        layers.append(Layer(name=name, adapter="km", kind=kind, activation=km.ACTIVATIONS[index % 4],
                            scale=scale, tensors=tensors))
    kernels["lora"], lora = lora_layer(np.random.default_rng(seed))
    layers.append(lora)
    return kernels, layers


@needs_native
@pytest.mark.parametrize("threads", [None, 2, 5])
def test_one_call_per_pack_matches_per_layer_and_the_definition(threads):
    kernels, layers = pack_of()
    buffer = np.full(km.rebuild_size(kernels, layers) + 7, np.nan, dtype=np.float32)
    rebuilt = km.rebuild_kernels(kernels, layers, threads=threads, buffer=buffer)
    expected = expected_kernels(kernels, layers)
    for layer in layers:
        kernel = rebuilt[layer.name]
        assert np.shares_memory(kernel, buffer)
        np.testing.assert_allclose(kernel, expected[layer.name], rtol=TOLERANCE, atol=TOLERANCE)
        if layer.adapter == "km":  # the batched call prepares the modulator as modulate_fast does
            one = km.modulate_fast(kernels[layer.name], layer.tensors, layer.kind, layer.activation,
                                   layer.scale, use_native=True)
            np.testing.assert_array_equal(kernel, one)


@needs_native
def test_jobs_that_do_not_fit_are_left_to_numpy():
    """native.modulate_layers hands C only sizes and addresses it checked: a job outside the arena,
    of another dtype, not contiguous or with a modulator of other sizes is left out, the rest done."""
    kernels, layers = pack_of(count=4)
    arena = np.zeros(sum(kernels[f"c{i}"].size for i in range(4)), dtype=np.float32)

    def job(i, **change):
        layer, kernel = layers[i], kernels[f"c{i}"]
        d = km.vector_length(km.resolve_kind(layer.kind, kernel.shape), kernel.shape)
        fields = dict(kernel=kernel, d=d, offset=sum(kernels[f"c{j}"].size for j in range(i)),
                      **{n: layer.tensors[n] for n in km.MODULATOR_TENSORS}, activation=layer.activation,
                      scale=layer.scale, gain=km._ACTIVATION_GAIN[layer.activation])
        fields.update(change)
        return native.Job(**fields)

    good = [job(i) for i in range(4)]
    assert native.modulate_layers(good, arena) == [True] * 4  # done, every value finite
    done = arena.copy()
    cases = {
        "beyond the arena": job(1, offset=arena.size - 10),
        "negative offset": job(1, offset=-1),
        "float64 kernel": job(1, kernel=kernels["c1"].astype(np.float64)),
        "not contiguous": job(2, kernel=np.asfortranarray(kernels["c2"])),
        "w2 of another d": job(2, w2=np.zeros((1, 5), np.float32)),
        "d not dividing": job(0, d=7),
        "float16 b1": job(0, b1=layers[0].tensors["b1"].astype(np.float16)),
    }
    for name, bad in cases.items():
        arena[:] = 0
        assert native.modulate_layers([*good[:3], bad], arena) == [True, True, True, None], name
        np.testing.assert_array_equal(arena[:good[3].offset], done[:good[3].offset], err_msg=name)
    with pytest.raises(ValueError, match="arena"):
        native.modulate_layers(good, arena.astype(np.float64))
    # and through rebuild_kernels the left-out layer reaches numpy, which names the mismatch
    wrong = {n: np.zeros(s, np.float32) for n, s in km.modulator_shapes(4, 8).items()}
    with pytest.raises(ShapeMismatchError, match="w1"):
        km.rebuild_kernels(kernels, [Layer(**{**vars(layers[0]), "tensors": wrong}), *layers[1:4]])


@needs_native
@pytest.mark.parametrize("threads", [None, 2])
def test_the_kernel_reports_layers_whose_values_overflow(threads):
    """The compiled kernel checks every value as it writes it, so a load needs no pass of its own:
    a layer that overflows (or reads a NaN) is reported as not finite, its neighbours as finite,
    on every path (rows across, along, partial tiles), and the runtime's check refuses it by name."""
    kernels, layers = pack_of(count=8)
    for index, layer in enumerate(layers[:8]):
        if index % 3 == 0:
            continue
        kernel = kernels[layer.name].copy()
        flat = kernel.reshape(-1)
        if index % 3 == 1:
            flat[-1] = np.float32(3e38)  # times a gain above 1: infinity, in the last (partial) row
        else:
            flat[flat.size // 2] = np.nan
        kernels[layer.name] = kernel
    finite = {}
    rebuilt = km.rebuild_kernels(kernels, layers, threads=threads, finite=finite)
    expected = {layer.name: bool(np.isfinite(rebuilt[layer.name]).all()) for layer in layers}
    for layer in layers:
        if layer.adapter == "km" and not (layer.kind == "channel" and kernels[layer.name].shape[2] > 1):
            assert finite[layer.name] == expected[layer.name], layer.name
        else:  # rebuilt by numpy (LoRA, channel vectors of a spatial kernel): not vouched for
            assert layer.name not in finite
    assert not all(finite.values()) and any(finite.values())
    bad = next(name for name, ok in finite.items() if not ok)
    with pytest.raises(NonFiniteError, match=f"layer '{bad}'"):
        limits.check_finite_kernels("p.kmp", rebuilt, finite)
    # the layers the kernel vouched for pass without being read again
    fine = {name: kernel for name, kernel in rebuilt.items() if finite.get(name)}
    limits.check_finite_kernels("p.kmp", fine, finite)


def run_python(code: str, **env) -> dict:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_km_edge_native_0_turns_the_kernel_off():
    report = run_python(
        "import json; from device_runtime import native, km; import numpy as np\n"
        "w = np.ones((2, 1, 3, 3), np.float32); t = {n: np.zeros(s, np.float32) for n, s in "
        "km.modulator_shapes(9, 8).items()}\n"
        "try:\n    km.modulate_fast(w, t, 'kernel', 'gelu', 1.0, use_native=True); refused = ''\n"
        "except RuntimeError as exc:\n    refused = str(exc)\n"
        "print(json.dumps({'engine': native.engine(), 'reason': native.REASON, 'refused': refused}))",
        **{native.ENV: "0"})
    assert report["engine"] == "numpy"
    assert native.ENV in report["reason"] and native.ENV in report["refused"]


@needs_native
def test_a_pack_predicts_the_same_with_and_without_the_kernel(tmp_path):
    """End to end through the Runtime: logits of a pack rebuilt by the kernel and by numpy (another
    process with KM_EDGE_NATIVE=0) agree within float32 noise."""
    base, signing_key = device_folder(tmp_path)
    pack = make_pack(tmp_path / "p.kmp", base, signing_key)
    np.save(tmp_path / "images.npy", random_images(4))
    code = (
        "import json, numpy as np; from device_runtime import keys, native; "
        "from device_runtime.runtime import Runtime\n"
        f"rt = Runtime({str(tmp_path / 'base')!r}, "
        f"keys.load_trusted_keys([{str(tmp_path / 'keys' / keys.PUBLIC_KEY_NAME)!r}]))\n"
        f"rt.load_pack({str(pack)!r})\n"
        f"logits = rt.logits(np.load({str(tmp_path / 'images.npy')!r}))\n"
        "print(json.dumps({'engine': native.engine(), 'logits': logits.tolist()}))"
    )
    with_kernel = run_python(code)
    without = run_python(code, **{native.ENV: "0"})
    assert (with_kernel["engine"], without["engine"]) == ("native", "numpy")
    np.testing.assert_allclose(with_kernel["logits"], without["logits"], rtol=1e-4, atol=1e-4)
