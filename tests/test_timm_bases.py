"""timm architectures as bases (`--arch timm:NAME`), with random weights, in four families.

For each: the backbone is timm's forward_features + global average pooling with the head's layers
taken out; every conv (timm's `Conv2dSame` included) carries KM and the torch kernels equal the
device's numpy rebuild; and the whole flow (export, train, pack, device runtime) gives the host's
logits within 1e-4 on onnxruntime.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn.utils import parametrize

timm = pytest.importorskip("timm")

from device_runtime import km as km_math  # noqa: E402
from device_runtime.keys import generate_keypair, load_trusted_keys  # noqa: E402
from device_runtime.km import ModulatorSpec, rebuild_kernels  # noqa: E402
from device_runtime.preprocess import load_image, preprocess  # noqa: E402
from device_runtime.runtime import Runtime  # noqa: E402
from km_edge.adapters import attach_km, conv_layers, frozen_weight  # noqa: E402
from km_edge.config import TRAIN_DEFAULTS  # noqa: E402
from km_edge.export import export_base  # noqa: E402
from km_edge.models import build_base, create_random_base  # noqa: E402
from km_edge.pack import write_task_pack  # noqa: E402
from km_edge.checkpoint import load_checkpoint, restore_task_model, save_checkpoint  # noqa: E402
from km_edge.train import train_task  # noqa: E402

SIZE = 64
# one architecture per family; efficientnet_lite0 is timm's tf_efficientnet_lite0 (TF "same" padding)
FAMILIES = {
    "efficientnet_lite0": "tf_efficientnet_lite0",  # efficientnet-lite: Conv2dSame, depthwise, ReLU6
    "timm:mobilenetv3_small_050": "mobilenetv3_small_050",  # mobilenetv3: SE, hard-swish, conv_head
    "timm:regnetx_002": "regnetx_002",  # regnet: grouped 3x3 convs
    "timm:resnet10t": "resnet10t",  # resnet: deep stem, residual blocks
}
REL_TOL = 1e-5


def _base(arch: str):
    torch.manual_seed(0)
    return build_base(arch, None, input_size=SIZE)


@pytest.mark.parametrize("arch", FAMILIES)
def test_backbone_is_timm_forward_features_pooled(arch):
    torch.manual_seed(0)
    full = timm.create_model(FAMILIES[arch]).eval()
    base = _base(arch)
    own = base.backbone.state_dict()
    assert own and all(torch.equal(own[k], full.state_dict()[k.removeprefix("features.")]) for k in own)
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = full.forward_features(images).mean((2, 3))
        np.testing.assert_allclose(base.backbone(images).numpy(), expected.numpy(), rtol=0, atol=1e-5)
    assert base.feature_size == expected.shape[1]
    # nothing frozen that the graph would not use: every conv of the backbone is in forward_features
    head_only = {n for n, m in full.named_modules() if isinstance(m, nn.Conv2d)} - \
        {n.removeprefix("features.") for n, _ in conv_layers(base.backbone)}
    assert all(n.startswith(("conv_head", "head")) for n in head_only), head_only


@pytest.mark.parametrize("arch", FAMILIES)
def test_km_on_every_timm_conv_matches_the_numpy_rebuild(arch):
    backbone = copy.deepcopy(_base(arch).backbone)
    classes = {type(conv) for _, conv in conv_layers(backbone)}
    kernels = {name: conv.weight.detach().numpy().copy() for name, conv in conv_layers(backbone)}
    modulators = attach_km(backbone, ModulatorSpec(kind="auto", kernel_hidden=4, channel_hidden=2, activation="gelu"))
    assert list(modulators) == list(kernels)  # every conv, subclasses included
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in modulators.values():
            for name in km_math.MODULATOR_TENSORS:
                tensor = getattr(mod, name)
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * (0.2 if name in ("w2", "b2") else 1.0))
    rebuilt = rebuild_kernels(kernels, [mod.pack_entry(name) for name, mod in modulators.items()])
    for name, conv in conv_layers(backbone):
        assert parametrize.is_parametrized(conv, "weight"), name
        torch_weight = conv.weight.detach().numpy()
        scale = float(np.abs(torch_weight).max())
        assert float(np.abs(rebuilt[name] - torch_weight).max()) <= REL_TOL * scale, name
        assert float(np.abs(torch_weight - frozen_weight(conv).detach().numpy()).max()) > 1e-3 * scale, name
    if arch == "efficientnet_lite0":  # TF "same" padding convs keep their class and use W'
        same = [(n, c) for n, c in conv_layers(backbone) if type(c).__mro__[1].__name__ == "Conv2dSame"]
        assert len(same) == 5 and any(cls.__name__ == "Conv2dSame" for cls in classes)
        name, conv = same[0]
        x = torch.randn(1, conv.in_channels, 17, 17, generator=gen)
        with torch.no_grad():
            modulated = conv(x)
            expected = timm.layers.conv2d_same(x, torch.from_numpy(rebuilt[name]), conv.bias, conv.stride,
                                               (0, 0), conv.dilation, conv.groups)
        np.testing.assert_allclose(modulated.numpy(), expected.numpy(), rtol=0, atol=1e-4)


def _write_task(root, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, n in (("train", 4), ("val", 3)):
        for k, cls in enumerate(("a", "b")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
                pixels[..., k] //= 3  # a little class signal
                Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("timm-keys")
    generate_keypair(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("arch", FAMILIES)
def test_timm_base_flow_device_logits_equal_host_logits(arch, keys, tmp_path):
    data = tmp_path / "data"
    _write_task(data)
    weights = tmp_path / "bases" / "random.pth"
    create_random_base(weights, arch, input_size=SIZE)
    base_spec = {"arch": arch, "weights": str(weights), "input_size": SIZE}
    manifest = export_base(build_base(**base_spec), tmp_path / "base")
    assert len(manifest["conv_layers"]) == len(conv_layers(build_base(**base_spec).backbone))

    options = dict(TRAIN_DEFAULTS, epochs=1, max_steps=1, batch_size=4, device="cpu")
    train_task("tiny", data, base_spec, options, tmp_path / "tiny.pt", progress=False)
    # modulators well away from zero, so the logits check sees modulated kernels at work
    checkpoint = load_checkpoint(tmp_path / "tiny.pt")
    gen = torch.Generator().manual_seed(2)
    for key, tensor in checkpoint["tensors"].items():
        if key.rsplit(".", 1)[-1] in km_math.MODULATOR_TENSORS and ".parametrizations." in key:
            checkpoint["tensors"][key] = torch.randn(tensor.shape, generator=gen) * 0.1
    save_checkpoint(tmp_path / "tiny.pt", checkpoint)
    packed = write_task_pack(load_checkpoint(tmp_path / "tiny.pt"), tmp_path / "base", keys / "signing.key",
                             tmp_path / "tiny.kmp")

    runtime = Runtime(tmp_path / "base", load_trusted_keys([keys / "signing.pub"]))
    loaded = runtime.load_pack(packed["pack"])
    paths = sorted((data / "val").rglob("*.png"))
    batch = np.stack([preprocess(load_image(p), loaded.pack.preprocess) for p in paths])
    device = runtime.logits(batch)
    model, _, _ = restore_task_model(checkpoint)
    with torch.no_grad():
        host = model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(device, host, rtol=0, atol=1e-4)
    for conv in [m for m in model.backbone.modules() if parametrize.is_parametrized(m, "weight")]:
        parametrize.remove_parametrizations(conv, "weight", leave_parametrized=False)
    with torch.no_grad():
        unmodulated = model(torch.from_numpy(batch)).numpy()
    assert np.abs(unmodulated - host).max() > 1e-3, "the modulated kernels made no difference"
