"""Task-adaptation methods: KM and the baselines, all sharing one model and one training loop.

A method decides three things: which adapters are attached to the frozen backbone, which tensors
are trained (and so become the task's tensors), and whether BatchNorm statistics adapt.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from device_runtime.km import ModulatorSpec

from .adapters import attach_km, attach_lora
from .models import BaseModel, TaskModel
from .options import METHODS

# Methods whose task tensors fit in a pack (full fine-tuning produces a whole new model).
PACKABLE_METHODS = ("km", "head", "bn", "bias", "lora")

# Default learning rates per method (AdamW, cosine schedule); the head gets head_lr.
DEFAULT_LR = {"km": 3e-3, "head": 1e-2, "bn": 1e-2, "bias": 1e-2, "lora": 3e-3, "full": 1e-3}
DEFAULT_HEAD_LR = 1e-2


@dataclass
class MethodConfig:
    method: str = "km"
    modulator: ModulatorSpec = field(default_factory=ModulatorSpec)
    train_bn: bool = False
    lora_rank: int = 2
    lora_alpha: float | None = None
    # BatchNorm's affine terms train but its running statistics stay the base's
    freeze_bn_stats: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.modulator, dict):
            self.modulator = ModulatorSpec(**self.modulator)

    @property
    def trains_bn(self) -> bool:
        """BatchNorm's scale and shift train."""
        return self.method in ("bn", "full") or (self.train_bn and self.method in ("km", "lora", "bias"))

    @property
    def adapts_bn_stats(self) -> bool:
        """BatchNorm's running statistics follow the task's data while training."""
        return self.trains_bn and not self.freeze_bn_stats

    @property
    def bn_is_task_state(self) -> bool:
        """BatchNorm tensors belong to the task (checkpoint, pack overrides)."""
        return self.trains_bn or self.method == "bias"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["modulator"] = self.modulator.to_dict()
        return data


def method_config(options: dict) -> MethodConfig:
    """The method config of a task's resolved options (km-edge.toml and flags, as Settings.train_options
    gives them); BatchNorm trains with KM unless ``train_bn`` says otherwise."""
    return MethodConfig(
        method=options["method"],
        modulator=ModulatorSpec(
            kind=options["modulator"],
            kernel_hidden=int(options["kernel_hidden"]),
            channel_hidden=int(options["channel_hidden"]),
            activation=options["activation"],
        ),
        train_bn=(options["method"] == "km") if options["train_bn"] is None else bool(options["train_bn"]),
        lora_rank=int(options["lora_rank"]),
    )


def build_task_model(base: BaseModel, num_classes: int, config: MethodConfig, seed: int) -> TaskModel:
    """The base's backbone with a new head and the method's adapters, initialised from ``seed``."""
    torch.manual_seed(seed)
    model = TaskModel(base.backbone, base.feature_size, num_classes)
    prepare_model(model, config)
    return model


def prepare_model(model: TaskModel, config: MethodConfig) -> None:
    """Freeze the base, attach the method's adapters and mark what trains."""
    for param in model.backbone.parameters():
        param.requires_grad_(config.method == "full")
    if config.method == "km":
        attach_km(model.backbone, config.modulator)
    elif config.method == "lora":
        attach_lora(model.backbone, config.lora_rank, config.lora_alpha)
    if config.trains_bn:
        for bn in batchnorms(model.backbone):
            for param in bn.parameters():
                param.requires_grad_(True)
    elif config.method == "bias":
        # TinyTL's bias-only update: in a conv + BatchNorm net a conv bias is absorbed by the BN
        # shift, so the shifts are the network's biases (the scales and statistics stay the base's).
        for bn in batchnorms(model.backbone):
            if bn.bias is not None:
                bn.bias.requires_grad_(True)
    for param in model.head.parameters():
        param.requires_grad_(True)


def batchnorms(backbone: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def set_train_mode(model: TaskModel, config: MethodConfig, training: bool = True) -> None:
    """Train mode everywhere, except BatchNorm keeps the base's statistics unless they are task tensors."""
    model.train(training)
    if training and not config.adapts_bn_stats:
        for bn in batchnorms(model.backbone):
            bn.eval()


def _is_task_key(key: str, config: MethodConfig, bn_prefixes: tuple[str, ...]) -> bool:
    if key.startswith("head."):
        return True
    if config.method == "full":
        return True
    if ".parametrizations.weight." in key:
        return not key.endswith(".original")
    return config.bn_is_task_state and key.startswith(bn_prefixes)


def task_state(model: TaskModel, config: MethodConfig) -> dict[str, torch.Tensor]:
    """The tensors that make this task (a checkpoint holds only these)."""
    bn_prefixes = tuple(f"backbone.{name}." for name, m in model.backbone.named_modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm))
    return {
        key: value.detach().cpu().clone()
        for key, value in model.state_dict().items()
        if _is_task_key(key, config, bn_prefixes)
    }


def load_task_state(model: TaskModel, config: MethodConfig, state: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's task tensors into a prepared model; refuses tensors that do not fit."""
    expected = set(task_state(model, config))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise KeyError(
            f"task tensors do not fit the model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    model.load_state_dict(state, strict=False)


def parameter_report(model: TaskModel, base_params: int) -> dict:
    """Trainable parameters and their share of the base; the head is counted separately."""
    head = sum(p.numel() for p in model.head.parameters())
    trainable = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    return {
        "trainable_params": int(trainable),
        "head_params": int(head),
        "base_params": int(base_params),
        "percent_of_base": round(100.0 * trainable / base_params, 4),
    }


def head_learning_rate(method: str, lr: float) -> float:
    """The head trains at least at DEFAULT_HEAD_LR (it starts from scratch), except in full fine-tuning."""
    return lr if method == "full" else max(lr, DEFAULT_HEAD_LR)


def optimizer_groups(model: TaskModel, lr: float, head_lr: float, bn_lr: float | None = None) -> list[dict]:
    """Head at head_lr, the rest of what trains at lr; BatchNorm at bn_lr when given (per-group rates)."""
    bn_params = {id(p) for bn in batchnorms(model.backbone) for p in bn.parameters()} if bn_lr is not None else set()
    body = [p for p in model.backbone.parameters() if p.requires_grad and id(p) not in bn_params]
    bn = [p for p in model.backbone.parameters() if p.requires_grad and id(p) in bn_params]
    groups = [{"params": list(model.head.parameters()), "lr": head_lr}]
    if body:
        groups.append({"params": body, "lr": lr})
    if bn:
        groups.append({"params": bn, "lr": bn_lr})
    return groups
