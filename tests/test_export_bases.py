"""Exporting bases: the slim ResNet-18 is torchvision's layout and exports like any base, and export
silences only the warnings it expects (a warning km-edge does not know about still reaches the user).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from device_runtime.backends import OrtBackend
from device_runtime.basefiles import Base
from km_edge.adapters import conv_layers
from km_edge.export import backbone_to_onnx, export_base
from km_edge.models import BaseModel, PooledBackbone, SlimResNet18, build_base


# --- the slim ResNet-18 ---------------------------------------------------------------------------
def test_slim_resnet_at_full_width_is_torchvision_resnet18():
    """Same module names, same initialisation from the same seed, same forward: only widths differ."""
    torch.manual_seed(0)
    slim = SlimResNet18(1.0).eval()
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    ours, theirs = slim.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(slim(images), reference(images))


def test_slim_resnet_scales_every_stage_and_loads_a_state_dict_of_its_width(tmp_path):
    base = build_base("resnet18", None, width=0.125, input_size=32)
    widths = [conv.out_channels for name, conv in conv_layers(base.backbone) if name.endswith("0.conv1")]
    assert widths == [8, 16, 32, 64] and base.feature_size == 64
    path = tmp_path / "slim.pth"
    torch.save(SlimResNet18(0.125).state_dict(), path)  # a plain state_dict of the full slim model
    loaded = build_base("resnet18", str(path), width=0.125, input_size=32)
    assert loaded.fingerprint() != base.fingerprint()


def test_slim_resnet_base_exports_and_onnxruntime_matches_torch(tmp_path):
    torch.manual_seed(0)
    base = build_base("resnet18", None, width=0.125, input_size=32)
    manifest = export_base(base, tmp_path / "base")
    assert len(manifest["conv_layers"]) == len(conv_layers(base.backbone)) == 20  # 17 + 3 projections
    exported = Base.open(tmp_path / "base", verify=True)
    images = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = base.backbone(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(OrtBackend(exported.graph_path, {}).features(images), expected, rtol=0, atol=1e-4)


# --- export warnings ------------------------------------------------------------------------------
def test_exporting_the_demo_base_shows_no_warning():
    base = build_base("demo", None, input_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backbone_to_onnx(base)
    assert [str(w.message) for w in caught] == []


class _WarningConv(nn.Module):
    """A conv trunk whose forward warns, as a model km-edge knows nothing about might."""

    def __init__(self, category: type[Warning], message: str):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.category, self.message = category, message

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        warnings.warn(self.message, self.category)
        return self.conv(images)


@pytest.mark.parametrize("category, message", [
    (UserWarning, "this model warns while it is traced"),
    (DeprecationWarning, "some other feature is deprecated"),  # a category export does raise, other words
])
def test_a_warning_export_does_not_expect_still_shows(category, message):
    backbone = PooledBackbone(_WarningConv(category, message)).eval()
    base = BaseModel("custom", "none", backbone, 4, 16, 16, (0.5,) * 3, (0.25,) * 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backbone_to_onnx(base)
    assert [(w.category, str(w.message)) for w in caught] == [(category, message)]
