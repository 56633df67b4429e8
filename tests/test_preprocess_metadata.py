"""Preprocessing comes from the weights' metadata, and the device applies exactly that.

torchvision weights carry theirs in `Weights.transforms()` (mobilenet_v2's default IMAGENET1K_V2
resizes to 232, efficientnet_b0's IMAGENET1K_V1 is bicubic), timm models in `pretrained_cfg`
(resize = floor(size / crop_pct)); a saved km-edge base keeps what it was built with.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from device_runtime.preprocess import preprocess
from km_edge.export import export_base
from km_edge.models import build_base, save_base_weights


def _torchvision_default(name: str) -> dict:
    transform = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    return {"resize": transform.resize_size[0], "crop": transform.crop_size[0], "mean": list(transform.mean),
            "std": list(transform.std), "interpolation": transform.interpolation.value}


@pytest.mark.parametrize("arch, resize, interpolation", [("mobilenet_v2", 232, "bilinear"),
                                                         ("efficientnet_b0", 256, "bicubic")])
def test_torchvision_bases_use_their_weights_transforms(arch, resize, interpolation):
    spec = build_base(arch, None).preprocess
    assert spec == _torchvision_default(arch)
    assert (spec["resize"], spec["crop"], spec["interpolation"]) == (resize, 224, interpolation)


def test_timm_bases_use_pretrained_cfg_and_keep_its_ratio_at_other_sizes():
    timm = pytest.importorskip("timm")
    config = timm.data.resolve_model_data_config(timm.create_model("regnetx_002"))
    full = build_base("timm:regnetx_002", None).preprocess
    assert full["crop"] == config["input_size"][-1]
    assert full["resize"] == int(config["input_size"][-1] / config["crop_pct"])
    assert full["mean"] == list(config["mean"]) and full["interpolation"] == config["interpolation"]
    small = build_base("timm:regnetx_002", None, input_size=96).preprocess
    assert small["crop"] == 96 and small["resize"] == int(96 * full["resize"] / full["crop"])
    assert small["mean"] == full["mean"] and small["interpolation"] == full["interpolation"]


def test_a_saved_base_keeps_its_preprocessing(tmp_path):
    torch.manual_seed(0)
    base = build_base("efficientnet_b0", None, input_size=96)
    path = save_base_weights(tmp_path / "b0.pth", base)
    again = build_base("efficientnet_b0", str(path))
    assert again.preprocess == base.preprocess and again.fingerprint() == base.fingerprint()
    manifest = export_base(again, tmp_path / "base")
    assert manifest["preprocess"] == base.preprocess


def test_device_preprocess_applies_bicubic_as_the_manifest_says():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8))
    spec = {"resize": 36, "crop": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}
    expected = image.resize((50, 36), Image.Resampling.BICUBIC).crop((9, 2, 41, 34))  # shorter side 36, centre 32
    expected = (np.asarray(expected, dtype=np.float32) / 255.0 - 0.5) / 0.5
    # the device resamples only the crop's region (aspect-safe, device_runtime.preprocess), which
    # may round a pixel by up to 2 grey levels against resizing the whole image first
    got = preprocess(image, spec)
    np.testing.assert_allclose(got, expected.transpose(2, 0, 1), rtol=0, atol=2 / 255 / 0.5 + 1e-6)
    assert np.mean(np.abs(got - expected.transpose(2, 0, 1)) > 1e-6) < 0.01
    bilinear = preprocess(image, dict(spec, interpolation="bilinear"))
    assert np.abs(bilinear - preprocess(image, spec)).max() > 1e-2
