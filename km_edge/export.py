"""Export the frozen base: ONNX graph with BatchNorm kept, conv/BN tensors as aligned external data.

The legacy TorchScript exporter is used with ``keep_initializers_as_inputs=True`` (which keeps
every initializer under its state_dict name, undeduplicated, so each BatchNorm's tensors can be
replaced on its own) and ``do_constant_folding=False`` (which keeps BatchNorm out of the conv
weights, since KM acts on the un-folded kernel). The initializers are then removed from the
graph inputs so onnxruntime treats them as constants and can fuse Conv+BN itself.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from device_runtime.basefiles import BN_TENSORS, write_base
from device_runtime.errors import ConfigError

from .adapters import conv_layers
from .models import BaseModel

OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "features"
# What torch.onnx.export warns on every km-edge base, all about the legacy exporter used on purpose
# (above): (message regex, category, module regex). Only these are silenced; any other warning shows.
EXPECTED_EXPORT_WARNINGS = (
    (r"You are using the legacy TorchScript-based ONNX export", DeprecationWarning, ""),
    (r"The feature will be removed\. Please remove usage of this function", DeprecationWarning, r"torch\.onnx\."),
)
log = logging.getLogger(__name__)


def backbone_to_onnx(base: BaseModel) -> onnx.ModelProto:
    backbone = base.backbone.eval()
    dummy = torch.zeros(1, 3, base.input_size, base.input_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        for message, category, module in EXPECTED_EXPORT_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        torch.onnx.export(
            backbone, (dummy,), buffer,
            dynamo=False,
            opset_version=OPSET,
            do_constant_folding=False,
            keep_initializers_as_inputs=True,
            training=torch.onnx.TrainingMode.EVAL,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    model = onnx.load_from_string(buffer.getvalue())
    initializers = {init.name for init in model.graph.initializer}
    graph_inputs = [value for value in model.graph.input if value.name not in initializers]
    del model.graph.input[:]
    model.graph.input.extend(graph_inputs)
    model.producer_name, model.producer_version = "km-edge", "1"
    return model


def _graph_layers(model: onnx.ModelProto, backbone: nn.Module, base_name: str = "base") -> tuple[list[dict], list[dict], dict]:
    """Conv and BatchNorm layers in graph order, mapped to their torch module names.

    Every conv's kernel must be a graph initializer (a timm ``Conv2dSame`` is: its "same" padding
    is a Pad computed from the input shape, its kernel the weight as stored).
    """
    convs = dict(conv_layers(backbone))
    bns = {name: m for name, m in backbone.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    conv_entries, bn_entries, bn_eps = [], [], {}
    for node in model.graph.node:
        if node.op_type == "Conv":
            layer = node.input[1].removesuffix(".weight")
            if layer not in convs:
                raise ConfigError(
                    f"{base_name}: an exported Conv takes its kernel from {node.input[1]!r}, not from a conv weight "
                    "stored as is (the layer transforms its kernel in forward); km-edge cannot modulate it")
            conv_entries.append({"name": layer, "initializer": node.input[1], "groups": convs[layer].groups})
        elif node.op_type == "BatchNormalization":
            layer = node.input[1].removesuffix(".weight")
            if layer not in bns:
                raise RuntimeError(f"exported BatchNormalization {node.input[1]!r} is not a BN of the backbone")
            bn_entries.append({"name": layer, "tensors": dict(zip(BN_TENSORS, node.input[1:5]))})
            bn_eps[layer] = float(bns[layer].eps)
    if len(conv_entries) != len(convs):
        raise RuntimeError(f"graph has {len(conv_entries)} Conv nodes, backbone has {len(convs)} convs")
    return conv_entries, bn_entries, bn_eps


def export_base(base: BaseModel, out_dir: str | Path) -> dict:
    """Write base.onnx, base.weights and manifest.json; returns the manifest (with base_id)."""
    model = backbone_to_onnx(base)
    conv_entries, bn_entries, bn_eps = _graph_layers(model, base.backbone, base.arch)
    log.debug("%s traced to ONNX (opset %d): %d convs, %d BatchNorms", base.arch, OPSET, len(conv_entries),
              len(bn_entries))
    meta = {
        "arch": base.arch,
        # a local weights file by its name only: the base's identity (base_id) must not depend on the
        # folder it was exported from (base_fingerprint already pins the values)
        "weights": Path(base.weights).name if base.weights and os.sep in str(base.weights) else base.weights,
        "width": base.width,
        "input_size": base.input_size,
        "preprocess": base.preprocess,
        "feature_size": base.feature_size,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "base_params": base.num_params(),
        "base_fingerprint": base.fingerprint(),
        "bn_eps": bn_eps,
        "opset": OPSET,
    }
    return write_base(out_dir, model, conv_entries, bn_entries, meta)
