"""The torch parametrizations (km_edge.adapters) and the device's numpy rebuild (device_runtime.km)
compute the same adapted kernels, on every conv of every registry architecture.

A pack is trained with the torch side and rebuilt on the device with the numpy side; if the two
disagree, a device silently runs a different model than the one that was validated. The checks
here are weight-only (no forward pass over whole networks) to stay fast; a few small forwards
check that a modulated kernel really changes what a conv computes.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from device_runtime import km as km_math
from device_runtime.km import ModulatorSpec, rebuild_kernels
from km_edge.adapters import (
    ConvLoRA,
    KernelModulator,
    adapters_of,
    attach_km,
    attach_lora,
    conv_layers,
    frozen_weight,
)
from km_edge.models import build_base

ARCHS = ("mobilenet_v2", "mobilenet_v3_small", "resnet18", "efficientnet_b0", "demo")
KINDS = ("kernel", "channel", "auto")
ACTIVATIONS = km_math.ACTIVATIONS  # relu, silu, tanh, gelu
REL_TOL = 1e-5

# Every (arch, kind) case gets an activation; the cycle puts all four activations in the run.
CASES = [
    pytest.param(arch, kind, ACTIVATIONS[(i + j) % len(ACTIVATIONS)], id=f"{arch}-{kind}-{ACTIVATIONS[(i + j) % len(ACTIVATIONS)]}")
    for i, arch in enumerate(ARCHS)
    for j, kind in enumerate(KINDS)
]
assert {case.values[2] for case in CASES} == set(ACTIVATIONS)

_BASES: dict[str, torch.nn.Module] = {}


def fresh_backbone(arch: str) -> nn.Module:
    """A private copy of the (random-init, weights none) backbone of ``arch``; built once per arch."""
    if arch not in _BASES:
        torch.manual_seed(0)
        _BASES[arch] = build_base(arch, None).backbone
    return copy.deepcopy(_BASES[arch])


def plain_convs(backbone: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(n, m) for n, m in backbone.named_modules() if isinstance(m, nn.Conv2d)]


def base_kernels(backbone: nn.Module) -> dict[str, np.ndarray]:
    """The frozen kernels as numpy, as the device reads them from base.weights."""
    return {name: frozen_weight(conv).detach().cpu().numpy().copy() for name, conv in conv_layers(backbone)}


def randomize_modulators(modulators: dict[str, KernelModulator], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in modulators.values():
            d, h = mod.w1.shape
            mod.w1.copy_(torch.randn(d, h, generator=gen) / d**0.5)
            mod.b1.copy_(torch.randn(h, generator=gen) * 0.5)
            mod.w2.copy_(torch.randn(h, d, generator=gen) * 0.2 / h**0.5)
            mod.b2.copy_(torch.randn(d, generator=gen) * 0.1)
            for name in km_math.MODULATOR_TENSORS:
                assert (getattr(mod, name) != 0).all(), f"{name} must be non-zero for a meaningful parity check"


def assert_parity(backbone: nn.Module, kernels: dict[str, np.ndarray], adapters: dict) -> None:
    entries = [adapter.pack_entry(name) for name, adapter in adapters.items()]
    rebuilt = rebuild_kernels(kernels, entries)
    assert set(rebuilt) == set(adapters)
    convs = dict(conv_layers(backbone))
    with torch.no_grad():
        for name, numpy_weight in rebuilt.items():
            torch_weight = convs[name].weight.detach().cpu().numpy()
            assert numpy_weight.shape == torch_weight.shape == kernels[name].shape, name
            assert numpy_weight.dtype == np.float32, name
            rel = float(np.max(np.abs(numpy_weight - torch_weight)) / np.max(np.abs(torch_weight)))
            assert rel <= REL_TOL, f"{name}: torch vs numpy relative error {rel:.3g} > {REL_TOL}"
            # the adapter really changed the kernel: the check is not comparing W with W
            change = float(np.max(np.abs(torch_weight - kernels[name])) / np.max(np.abs(torch_weight)))
            assert change > 1e-3, f"{name}: kernel unchanged by the adapter"


def assert_all_convs_parametrized(backbone: nn.Module, adapters: dict, adapter_type: type) -> None:
    convs = plain_convs(backbone)
    assert convs, "a backbone without convs?"
    assert [n for n, _ in convs] == list(adapters), "an adapter for every conv, in module order"
    for name, conv in convs:
        assert parametrize.is_parametrized(conv, "weight"), f"{name} ({conv}) is not parametrized"
        assert isinstance(conv.parametrizations.weight[0], adapter_type)
    assert list(adapters_of(backbone)) == list(adapters)


# --- ModulatorSpec ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape, kind, d",
    [
        ((16, 8, 3, 3), "kernel", 9),  # plain 3x3
        ((32, 1, 3, 3), "kernel", 9),  # depthwise 3x3
        ((24, 1, 5, 5), "kernel", 25),  # depthwise 5x5 (efficientnet, mobilenet_v3)
        ((64, 3, 7, 7), "kernel", 49),  # resnet stem
        ((16, 8, 1, 1), "channel", 8),  # pointwise
        ((96, 24, 1, 1), "channel", 24),
    ],
)
def test_auto_resolves_kernel_on_spatial_and_channel_on_pointwise(shape, kind, d):
    spec = ModulatorSpec(kind="auto", kernel_hidden=5, channel_hidden=3)
    hidden = 5 if kind == "kernel" else 3
    assert spec.resolve(shape) == (kind, d, hidden)


def test_explicit_kinds_are_not_overridden():
    assert ModulatorSpec(kind="kernel", kernel_hidden=4).resolve((16, 8, 1, 1)) == ("kernel", 1, 4)
    assert ModulatorSpec(kind="channel", channel_hidden=2).resolve((16, 8, 3, 3)) == ("channel", 8, 2)
    assert ModulatorSpec(kind="channel", channel_hidden=2).resolve((32, 1, 3, 3)) == ("channel", 1, 2)


@pytest.mark.parametrize("bad", [{"kind": "filter"}, {"activation": "sigmoid"}, {"kernel_hidden": 0},
                                 {"channel_hidden": -1}])
def test_modulator_spec_refuses_bad_values(bad):
    with pytest.raises(ValueError):
        ModulatorSpec(**bad)


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (32, 1, 3, 3), (6, 4, 1, 3), (16, 8, 1, 1)])
@pytest.mark.parametrize("kind", ["kernel", "channel"])
def test_torch_and_numpy_cut_a_weight_into_the_same_vectors(shape, kind):
    """The layout (which numbers form one vector of g) is one record, device_runtime.km.vector_layout;
    the torch parametrization cuts and reassembles a kernel exactly as the device does."""
    weight = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    spec = ModulatorSpec(kind=kind)
    modulator = KernelModulator(torch.from_numpy(weight), spec)
    rows = km_math.to_vectors(weight, kind)
    assert rows.shape[1] == spec.resolve(shape)[1]  # vectors of the length g is built for
    torch_rows = modulator._to_vectors(torch.from_numpy(weight))
    np.testing.assert_array_equal(torch_rows.numpy(), rows)
    if kind == "channel":  # row r holds input channels 0..I-1 of one (out, y, x) position
        np.testing.assert_array_equal(rows[0], weight[0, :, 0, 0])
    else:  # row r holds the kh x kw taps of one (out, in) kernel
        np.testing.assert_array_equal(rows[0], weight[0, 0].ravel())
    np.testing.assert_array_equal(modulator._from_vectors(torch_rows).numpy(), weight)
    np.testing.assert_array_equal(km_math.from_vectors(rows, kind, shape), weight)


# --- KM parity on every registry architecture --------------------------------------------------
@pytest.mark.parametrize("arch, kind, activation", CASES)
def test_km_torch_matches_numpy_rebuild(arch, kind, activation):
    backbone = fresh_backbone(arch)
    before = {name: conv.weight.detach().clone() for name, conv in plain_convs(backbone)}
    spec = ModulatorSpec(kind=kind, kernel_hidden=6, channel_hidden=3, activation=activation)
    modulators = attach_km(backbone, spec)

    assert_all_convs_parametrized(backbone, modulators, KernelModulator)
    if arch != "resnet18":  # every other registry net has depthwise convs: they are modulated too
        depthwise = [n for n, c in plain_convs(backbone) if c.groups > 1 and c.groups == c.in_channels]
        assert depthwise and all(n in modulators for n in depthwise)

    convs = dict(plain_convs(backbone))
    for name, mod in modulators.items():
        shape = tuple(before[name].shape)
        resolved, d, h = spec.resolve(shape)
        if kind == "auto":
            assert resolved == ("kernel" if shape[2] * shape[3] > 1 else "channel"), name
        else:
            assert resolved == kind
        assert mod.kind == resolved and mod.activation == activation
        assert tuple(mod.w1.shape) == (d, h) and tuple(mod.w2.shape) == (h, d)
        # attaching leaves the frozen kernel itself untouched
        assert torch.equal(frozen_weight(convs[name]), before[name])

    # zero-initialised modulators (a fresh attach) give exactly the base kernels
    with torch.no_grad():
        for name, conv in convs.items():
            assert torch.equal(conv.weight, before[name]), f"{name}: fresh modulator changed the kernel"

    kernels = base_kernels(backbone)
    randomize_modulators(modulators, seed=ARCHS.index(arch) * 10 + KINDS.index(kind))
    assert_parity(backbone, kernels, modulators)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_torch_matches_numpy_rebuild(arch):
    backbone = fresh_backbone(arch)
    before = {name: conv.weight.detach().clone() for name, conv in plain_convs(backbone)}
    adapters = attach_lora(backbone, rank=2)
    assert_all_convs_parametrized(backbone, adapters, ConvLoRA)
    with torch.no_grad():
        for name, conv in plain_convs(backbone):
            assert torch.equal(conv.weight, before[name]), f"{name}: fresh LoRA (b = 0) changed the kernel"
    kernels = base_kernels(backbone)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for adapter in adapters.values():
            adapter.b.copy_(torch.randn(adapter.b.shape, generator=gen) * 0.5)
            assert (adapter.b != 0).all()
    assert_parity(backbone, kernels, adapters)


# --- a modulated kernel changes what the network computes -------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_modulation_changes_conv_output(kind):
    torch.manual_seed(0)
    backbone = fresh_backbone("demo").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        base_out = backbone(images)
    modulators = attach_km(backbone, ModulatorSpec(kind=kind, activation="silu"))
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), base_out, rtol=1e-6, atol=1e-6)  # zero init: the base
    randomize_modulators(modulators, seed=3)
    with torch.no_grad():
        modulated_out = backbone(images)
    assert modulated_out.shape == base_out.shape
    assert (modulated_out - base_out).abs().max() > 1e-2 * base_out.abs().max()

    # per conv: the parametrized conv computes conv2d with the device's rebuilt kernel, not the base's
    kernels = base_kernels(backbone)
    rebuilt = rebuild_kernels(kernels, [m.pack_entry(n) for n, m in modulators.items()])
    for name, conv in conv_layers(backbone):
        x = torch.randn(1, conv.in_channels, 9, 9)
        with torch.no_grad():
            out = conv(x)
            with_base = nn.functional.conv2d(x, torch.from_numpy(kernels[name]), conv.bias, conv.stride,
                                             conv.padding, conv.dilation, conv.groups)
            with_rebuilt = nn.functional.conv2d(x, torch.from_numpy(rebuilt[name]), conv.bias, conv.stride,
                                                conv.padding, conv.dilation, conv.groups)
        torch.testing.assert_close(out, with_rebuilt, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(out, with_base, rtol=1e-3, atol=1e-5), f"{name}: output did not change"
