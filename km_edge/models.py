"""Base model registry: every base is a *backbone* (image -> pooled features) plus a task head.

The backbone is what gets exported to ONNX and frozen; module paths inside it are the layer names
that manifests and packs use. The registry reads like a table: name -> builder, input size,
feature size, preprocessing.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn

from device_runtime.errors import CheckpointError, ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BASE_WEIGHTS_FORMAT = "km-edge-base-weights"


class PooledBackbone(nn.Module):
    """``features`` (a conv trunk) followed by global average pooling: the exported graph."""

    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(images)), 1)


class TaskModel(nn.Module):
    """A frozen backbone and the task's linear head; the head is applied on the device in numpy."""

    def __init__(self, backbone: nn.Module, feature_size: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_size, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


# --- the built-in demo net ---------------------------------------------------------------------
# Columns: block type, output channels, stride. "conv" = 3x3 conv, "dw" = depthwise 3x3 followed
# by a pointwise 1x1 conv, "pw" = 1x1 conv. Every conv is followed by BatchNorm and ReLU.
DEMO_LAYOUT = [
    ("conv", 24, 1),
    ("conv", 32, 2),
    ("dw", 48, 1),
    ("dw", 64, 2),
    ("dw", 96, 1),
    ("dw", 128, 2),
    ("pw", 160, 1),
]


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


def demo_features(width: float = 1.0) -> tuple[nn.Module, int]:
    """A small ConvNet with 3x3, depthwise and 1x1 convs that trains in seconds at 32-64 px."""
    blocks: list[nn.Module] = []
    in_ch = 3
    for block, out_ch, stride in DEMO_LAYOUT:
        out_ch = max(8, int(round(out_ch * width)))
        if block == "conv":
            blocks.append(_conv_bn_relu(in_ch, out_ch, 3, stride))
        elif block == "dw":
            blocks.append(
                nn.Sequential(
                    _conv_bn_relu(in_ch, in_ch, 3, stride, groups=in_ch),
                    _conv_bn_relu(in_ch, out_ch, 1),
                )
            )
        else:
            blocks.append(_conv_bn_relu(in_ch, out_ch, 1, stride))
        in_ch = out_ch
    return nn.Sequential(*blocks), in_ch


# --- torchvision trunks ------------------------------------------------------------------------
def _mobilenet_v2(width: float):
    model = torchvision.models.mobilenet_v2(weights=None, width_mult=width)
    return model, lambda m: m.features, model.last_channel


def _mobilenet_v3_small(width: float):
    model = torchvision.models.mobilenet_v3_small(weights=None, width_mult=width)
    return model, lambda m: m.features, model.features[-1].out_channels


def _efficientnet_b0(width: float):
    if width != 1.0:
        raise ConfigError("efficientnet_b0 is only available at width 1.0")
    model = torchvision.models.efficientnet_b0(weights=None)
    return model, lambda m: m.features, model.features[-1].out_channels


class _SlimResNet(torchvision.models.ResNet):
    """torchvision's ResNet with every stage's width scaled (for CPU-sized benchmarks)."""

    def __init__(self, width: float):
        nn.Module.__init__(self)
        widths = [max(8, int(round(c * width))) for c in (64, 128, 256, 512)]
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = widths[0]
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        block = torchvision.models.resnet.BasicBlock
        self.layer1 = self._make_layer(block, widths[0], 2)
        self.layer2 = self._make_layer(block, widths[1], 2, stride=2)
        self.layer3 = self._make_layer(block, widths[2], 2, stride=2)
        self.layer4 = self._make_layer(block, widths[3], 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], 1000)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


def _resnet18(width: float):
    model = torchvision.models.resnet18(weights=None) if width == 1.0 else _SlimResNet(width)

    def trunk(m):
        return nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)

    return model, trunk, model.fc.in_features


def _demo(width: float):
    features, feature_size = demo_features(width)
    return None, lambda _: features, feature_size


@dataclass(frozen=True)
class Arch:
    """One registry row. ``make(width)`` returns (full torchvision model or None, trunk getter, feature size)."""

    name: str
    make: Callable
    input_size: int
    resize: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    torchvision_name: str | None = None
    notes: str = field(default="", compare=False)


ARCHS = {
    arch.name: arch
    for arch in [
        Arch("mobilenet_v2", _mobilenet_v2, 224, 256, torchvision_name="mobilenet_v2"),
        Arch("mobilenet_v3_small", _mobilenet_v3_small, 224, 256, torchvision_name="mobilenet_v3_small"),
        Arch("resnet18", _resnet18, 224, 256, torchvision_name="resnet18"),
        Arch("efficientnet_b0", _efficientnet_b0, 224, 256, torchvision_name="efficientnet_b0"),
        Arch("demo", _demo, 32, 32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
    ]
}


@dataclass
class BaseModel:
    """A built backbone with what export, training and preprocessing need to know about it."""

    arch: str
    weights: str
    backbone: PooledBackbone
    feature_size: int
    input_size: int
    resize: int
    mean: tuple
    std: tuple
    width: float = 1.0

    @property
    def preprocess(self) -> dict:
        return {
            "resize": self.resize,
            "crop": self.input_size,
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "interpolation": "bilinear",
        }

    def num_params(self) -> int:
        return sum(p.numel() for p in self.backbone.parameters())

    def fingerprint(self) -> str:
        """sha256 of the backbone's state: a checkpoint refuses to load onto another base."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.backbone.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ConfigError(f"unknown base architecture {name!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[name]


def build_base(
    arch: str,
    weights: str | None = None,
    input_size: int | None = None,
    resize: int | None = None,
    width: float = 1.0,
) -> BaseModel:
    """Build a base backbone.

    ``weights``: ``None``/``"none"`` (random init), a torchvision weights name such as
    ``"IMAGENET1K_V1"`` (torchvision downloads it on a machine with internet), or the path of a
    local ``.pth``: either a torchvision state_dict of the full model or a km-edge base file
    written by ``km-edge pretrain``.
    """
    spec = get_arch(arch)
    weights = None if weights in (None, "", "none", "None") else str(weights)
    local = weights is not None and (Path(weights).suffix in (".pth", ".pt") or Path(weights).exists())
    saved = _read_base_file(weights) if local else None
    if saved is not None and saved.get("format") == BASE_WEIGHTS_FORMAT:
        if saved.get("arch") != arch:
            raise CheckpointError(f"{weights}: base weights are for {saved.get('arch')!r}, not {arch!r}")
        width = float(saved.get("width", width))
        input_size = input_size or saved.get("input_size")
        resize = resize or saved.get("resize")
    full_model, trunk, feature_size = spec.make(width)
    if weights is not None and not local:
        if spec.torchvision_name is None or full_model is None:
            raise ConfigError(f"weights {weights!r}: no such file, and architecture {arch!r} has no torchvision weights")
        try:
            enum = torchvision.models.get_model_weights(spec.torchvision_name)[weights]
        except KeyError:
            raise ConfigError(f"{weights!r} is neither a local file nor a torchvision weights name for {arch}")
        full_model.load_state_dict(enum.get_state_dict(progress=True))
    backbone = PooledBackbone(trunk(full_model))
    if saved is not None:
        _load_weights(weights, saved, full_model, backbone, arch)
    input_size = int(input_size or spec.input_size)
    resize = int(resize or (spec.resize if input_size == spec.input_size else input_size))
    backbone.eval()
    return BaseModel(arch, weights or "none", backbone, feature_size, input_size, resize, spec.mean, spec.std, width)


def _read_base_file(path: str) -> dict:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read base weights ({exc.strerror})")
    try:
        saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a file that is not a checkpoint
        raise CheckpointError(f"{path}: not a torch state_dict ({type(exc).__name__})")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: not a state_dict")
    return saved


def _load_weights(path: str, saved: dict, full_model, backbone: nn.Module, arch: str) -> None:
    if saved.get("format") == BASE_WEIGHTS_FORMAT:
        target, state = backbone, saved.get("state_dict", {})
    else:
        target, state = (full_model if full_model is not None else backbone), saved
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError:
        raise CheckpointError(f"{path}: weights do not fit architecture {arch!r} (keys or shapes differ)")


def save_base_weights(path: str | Path, base: BaseModel, extra: dict | None = None) -> Path:
    """A base trained by ``km-edge pretrain``: backbone state plus what rebuilding it needs."""
    from device_runtime.files import write_atomic

    payload = {
        "format": BASE_WEIGHTS_FORMAT,
        "arch": base.arch,
        "width": float(base.width),
        "input_size": int(base.input_size),
        "resize": int(base.resize),
        "state_dict": {k: v.detach().cpu() for k, v in base.backbone.state_dict().items()},
        **(extra or {}),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return write_atomic(path, buffer.getvalue())
