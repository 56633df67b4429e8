"""Every numeric limit the device runtime enforces on outside input, and the checks that need the base.

A signed pack is trusted to come from our key, not to be sane: a stolen key or a buggy host can
sign a modulator with a million hidden units, a ``resize`` of 10^5 or weights that overflow
float32. The checks here run on the decoded pack *before* anything is allocated for it (sizes and
work are computed from shapes alone), and the rebuilt kernels and the pack's scores on one neutral
image are checked finite before the pack is activated. The numbers are documented in
``packs/README.md`` ("Limits enforced by the runtime"); change them here and there together.

This module is cheap to import (numpy only) so the base reader and the CLI can use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .errors import NonFiniteError, PackLimitError, ShapeMismatchError

__all__ = [
    "MAX_IMAGE_PIXELS", "MAX_SIDE", "MEAN_RANGE", "STD_RANGE", "INTERPOLATIONS", "DEFAULT_INTERPOLATION", "MAX_MANIFEST_BYTES",
    "MAX_MANIFEST_ELEMENTS",
    "MAX_MODULATOR_PARAMS_RATIO", "MAX_HIDDEN_PER_INPUT", "MAX_REBUILD_WORK_RATIO",
    "check_rebuild_budget", "check_input_size", "check_finite_kernels", "check_finite_scores",
]

# --- images ---------------------------------------------------------------------------------
# Pixels per decoded image, read from the header before anything is decoded. 50 MP covers a
# 48 MP phone photo; Pillow's own warning threshold (89.5 MP) is never reached.
MAX_IMAGE_PIXELS = 50_000_000

# --- preprocessing --------------------------------------------------------------------------
# One set of bounds for every preprocessing spec the device applies: a pack's (checked by its
# record, device_runtime.pack.records) and a base manifest's (device_runtime.preprocess.check_spec).
# Largest ``resize`` (shorter side after resizing) and ``crop``, pixels per side.
MAX_SIDE = 4096
# Normalisation: pixels are scaled to [0, 1] first, so a real mean is near that and std not tiny
# (normalised pixels stay within ~1e3, far from float32 overflow).
MEAN_RANGE = (-10.0, 10.0)  # per channel, in [0, 1] pixel units
STD_RANGE = (1e-3, 10.0)
# Resampling filters a spec may name (device_runtime.preprocess maps them to Pillow's).
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
DEFAULT_INTERPOLATION = "bilinear"  # where a spec (an older base file, a timm config) names none we know

# --- base manifest --------------------------------------------------------------------------
MAX_MANIFEST_BYTES = 16 * 2**20       # manifest.json is read whole
MAX_MANIFEST_ELEMENTS = 2**40         # elements of one manifest tensor (shape product)

# --- modulators and LoRA factors, relative to the base ----------------------------------------
# All task tensors of the adapted layers together hold at most this many numbers per frozen conv
# parameter of the base (the default KM pack is ~0.1 %).
MAX_MODULATOR_PARAMS_RATIO = 1.0
# Per layer: hidden size (or LoRA rank) at most this many times the modulator's input length d,
# so the rebuild's temporary hidden activations are at most 16x the layer's kernel.
MAX_HIDDEN_PER_INPUT = 16
# Whole rebuild: sum over layers of (kernel elements x hidden size) at most this many times the
# base's conv parameters; the rebuild costs ~4 flops per unit (defaults use ~8 units).
MAX_REBUILD_WORK_RATIO = 64


def _shape(array) -> tuple[int, ...]:
    return tuple(int(d) for d in np.shape(array))


def _layer_cost(layer, weight_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(task parameters, hidden size or rank, input length d, kernel elements) of one layer."""
    kernel_elements = math.prod(weight_shape)
    params = sum(math.prod(_shape(t)) for t in layer.tensors.values())
    if layer.adapter == "km":
        d, hidden = _shape(layer.tensors["w1"])
    else:  # lora: a (rank, fan_in)
        hidden, d = _shape(layer.tensors["a"])
    return params, hidden, d, kernel_elements


def check_rebuild_budget(name: str, layers, conv_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse a pack whose modulators are too big or too costly for this base, before rebuilding.

    Shapes were already checked against the base (``Runtime._check_shapes``); only sizes are
    looked at here, so nothing is allocated. Raises :class:`PackLimitError` naming the limit.
    """
    base_params = sum(math.prod(shape) for shape in conv_shapes.values())
    total_params = total_work = 0
    for layer in layers:
        if layer.name not in conv_shapes:
            raise ShapeMismatchError(f"{name}: layer {layer.name!r} is not a conv layer of this base")
        params, hidden, d, kernel_elements = _layer_cost(layer, conv_shapes[layer.name])
        if hidden > MAX_HIDDEN_PER_INPUT * max(d, 1):
            raise PackLimitError(
                f"{name}: layer {layer.name!r} has hidden size {hidden} for vectors of length "
                f"{d}; the runtime allows at most {MAX_HIDDEN_PER_INPUT} x {d}"
            )
        total_params += params
        total_work += kernel_elements * hidden
    if total_params > MAX_MODULATOR_PARAMS_RATIO * base_params:
        raise PackLimitError(
            f"{name}: the adapted layers carry {total_params} numbers, more than the base's "
            f"{base_params} conv parameters (limit {MAX_MODULATOR_PARAMS_RATIO:g} x)"
        )
    if total_work > MAX_REBUILD_WORK_RATIO * base_params:
        raise PackLimitError(
            f"{name}: rebuilding the kernels would take {total_work} units of work, more than "
            f"{MAX_REBUILD_WORK_RATIO} x the base's {base_params} conv parameters"
        )


def check_input_size(name: str, spec: Mapping, input_hw: tuple[int | None, int | None]) -> None:
    """The preprocessing crop must equal the graph's input height and width where they are fixed."""
    crop = spec.get("crop")
    for what, fixed in zip(("height", "width"), input_hw):
        if fixed is not None and crop != fixed:
            raise ShapeMismatchError(
                f"{name}: preprocessing crops {crop} x {crop} pixels but the base graph takes "
                f"{input_hw[0]} x {input_hw[1]} ({what} fixed at {fixed})"
            )


def check_finite_kernels(name: str, kernels: Mapping[str, np.ndarray],
                         checked: Mapping[str, bool] | None = None) -> None:
    """Every rebuilt kernel finite (a finite pack can still overflow float32 in the rebuild).
    ``checked``: layers whose finiteness the rebuild already established (the compiled kernel
    checks every value as it writes it; ``km.rebuild_kernels(finite=...)``), not read again."""
    for layer, kernel in kernels.items():
        known = None if checked is None else checked.get(layer)
        # otherwise one pass, no boolean temporary: a NaN or infinity anywhere makes the sum
        # non-finite (so does a sum beyond float32's range, which no usable kernel comes near)
        if not (known if known is not None else np.isfinite(np.add.reduce(kernel, axis=None))):
            raise NonFiniteError(
                f"{name}: the rebuilt kernel of layer {layer!r} is not finite "
                "(the pack's numbers overflow float32)"
            )


def check_finite_scores(name: str, scores: np.ndarray, what: str = "scores") -> None:
    """Scores (features, logits) must be finite; a pack that yields NaN or inf is refused."""
    if not np.isfinite(scores).all():
        raise NonFiniteError(
            f"{name}: the pack produces {what} that are not finite (NaN or infinity); refused"
        )
