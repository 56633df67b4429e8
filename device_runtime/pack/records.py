"""The body of a task pack as typed records: ``Layer``, ``BnEntry`` and ``Pack`` (the body).

Each record validates itself in its constructor, so the writer (``build_pack``, the host's
adapters) and the reader (``from_msgpack``) refuse a bad value with the same check and the same
message; ``to_msgpack`` / ``from_msgpack`` are each other's inverse, and the reader re-encodes what
it parsed and refuses any body whose bytes differ (one encoding per pack: nothing in the file is
ignored or read two ways). Tensors live in the index + blob of ``tensors.py``; records list them
in a fixed order and hold them as float32 numpy arrays.

The reader bounds every value of the blob at once (``tensors.read_tensors``) and builds the records
with ``_values_checked``, so their tensors' shapes are checked but their values are not scanned a
second time; any other caller's arrays are scanned one by one. A blob with a bad value is read
without ``_values_checked``: the records then find the tensor and name it, in the usual order.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field
from datetime import datetime
from itertools import islice

import numpy as np

from ..errors import MalformedPackError, PackLimitError
from ..km import ACTIVATIONS, LORA_TENSORS, MODULATOR_TENSORS, ModulatorSpec
from .codec import check_float, check_int, check_text, is_int, parse_time, show
from .limits import (
    FORMAT_VERSION,
    INTERPOLATIONS,
    KM_SCALE_RANGE,
    LAYER_NAME_PATTERN,
    LORA_SCALE_RANGE,
    MAX_ABS_VALUE,
    MAX_FEATURES,
    MAX_HIDDEN,
    MAX_INFO_DEPTH,
    MAX_INFO_ENTRIES,
    MAX_LABEL_CHARS,
    MAX_LABELS,
    MAX_LAYERS,
    MAX_LORA_RANK,
    MAX_SIDE,
    MAX_TENSORS,
    MAX_TEXT_CHARS,
    MAX_VECTOR,
    MEAN_RANGE,
    STD_RANGE,
    STORAGE_DTYPES,
    TASK_NAME_MAX,
    TASK_NAME_PATTERN,
)
from .tensors import DTYPES, TensorEntry, decode_tensors, encode_tensors, read_tensors

__all__ = ["Layer", "BnEntry", "Pack", "METHODS", "HEAD_TENSORS", "BN_TENSORS", "BODY_FIELDS"]

METHODS = ("km", "lora", "bn", "bias", "head")
HEAD_TENSORS = ("weight", "bias")
# BatchNorm tensors a pack may override, in the order ONNX BatchNormalization takes them (scale, B,
# input_mean, input_var); the base manifest and the exporter use this tuple too.
BN_TENSORS = ("weight", "bias", "running_mean", "running_var")
PREPROCESS_FIELDS = ("crop", "interpolation", "mean", "resize", "std")
MODULATOR_FIELDS = ("activation", "channel_hidden", "kernel_hidden", "kind")
# The body map's keys, in the order they are encoded (tensors and their data last).
BODY_FIELDS = (
    "format_version", "key_id", "task", "pack_version", "created", "expires", "base_id", "labels",
    "preprocess", "method", "modulator", "storage_dtype", "layers", "bn", "metrics", "trainer",
    "tensors", "data",
)
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_BASE_ID = re.compile(r"[0-9a-f]{64}")


def _tensor(array, where: str, ndim: int, values_checked: bool = False) -> np.ndarray:
    """A finite float32 array of ``ndim`` non-empty dimensions, every |element| <= MAX_ABS_VALUE.

    ``values_checked``: the array is one of ``read_tensors``' (a read-only float32 view, its values
    bounded with the whole blob's), so only its shape is left to check.
    """
    if values_checked or (isinstance(array, np.ndarray) and array.dtype == np.float32
                          and not array.flags.writeable):
        out = array  # what the reader decodes (read-only, C order): no copy
    else:
        try:
            source = np.asarray(array)
        except (TypeError, ValueError, OverflowError):
            raise PackLimitError(f"{where} must be an array of numbers") from None
        if source.dtype.kind not in "fiu":
            raise PackLimitError(f"{where} must hold real numbers, got dtype {source.dtype}")
        with np.errstate(over="ignore", invalid="ignore"):
            out = np.array(source, dtype=np.float32, order="C")  # a copy: records are immutable
        out.flags.writeable = False
    if out.ndim != ndim or 0 in out.shape:
        raise PackLimitError(f"{where} must be a non-empty {ndim}-D tensor, got shape {list(out.shape)}")
    if values_checked:
        return out
    largest = float(np.abs(out).max())  # NaN stays NaN; the method skips fromnumeric's overhead
    if not largest <= MAX_ABS_VALUE:  # also false for NaN
        problem = "values that are not finite" if not np.isfinite(largest) else f"values beyond +-{MAX_ABS_VALUE:g}"
        raise PackLimitError(f"{where} has {problem} in float32")
    return out


def _named(tensors, where: str, names: tuple[str, ...]) -> dict[str, object]:
    if not isinstance(tensors, Mapping) or tensors.keys() != set(names):
        got = sorted(map(show, tensors)) if isinstance(tensors, Mapping) else type(tensors).__name__
        raise PackLimitError(f"{where} must have exactly the tensors {list(names)}, got {got}")
    return {n: tensors[n] for n in names}


def _summary_of(tensors: Mapping[str, np.ndarray], storage_dtype: str) -> dict:
    return {n: {"shape": list(a.shape), "dtype": storage_dtype} for n, a in tensors.items()}


# --- one adapted conv layer -----------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Layer:
    """One adapted conv layer: KM modulator (w1, b1, w2, b2) or LoRA factors (a, b).

    On disk a layer is ``[name, kind, scale]``; its adapter is the pack's ``method`` and its
    activation the modulator's, so neither is written twice.
    """

    name: str
    adapter: str
    kind: str
    activation: str
    scale: float
    tensors: Mapping[str, np.ndarray]
    _values_checked: InitVar[bool] = False  # only from_msgpack's (module docstring)

    def __post_init__(self, _values_checked: bool) -> None:
        name = check_text(self.name, "layer name", 256, LAYER_NAME_PATTERN)
        where = f"layer {name}"
        if self.adapter == "km":
            if self.kind not in ("kernel", "channel"):
                raise PackLimitError(f"{where}: kind must be 'kernel' or 'channel', got {show(self.kind)}")
            if self.activation not in ACTIVATIONS:
                raise PackLimitError(f"{where}: activation must be one of {ACTIVATIONS}, got {show(self.activation)}")
            scale = check_float(self.scale, f"{where}: scale", *KM_SCALE_RANGE)
            raw = _named(self.tensors, f"{where}", MODULATOR_TENSORS)
            w1 = _tensor(raw["w1"], f"{where}: w1", 2, _values_checked)
            d, h = w1.shape
            tensors = {"w1": w1, "b1": _tensor(raw["b1"], f"{where}: b1", 1, _values_checked),
                       "w2": _tensor(raw["w2"], f"{where}: w2", 2, _values_checked),
                       "b2": _tensor(raw["b2"], f"{where}: b2", 1, _values_checked)}
            if d > MAX_VECTOR or h > MAX_HIDDEN:
                raise PackLimitError(
                    f"{where}: modulator {d} -> {h} exceeds the limits (vector {MAX_VECTOR}, hidden {MAX_HIDDEN})"
                )
            expected = {"w1": (d, h), "b1": (h,), "w2": (h, d), "b2": (d,)}
        elif self.adapter == "lora":
            if self.kind != "" or self.activation != "":
                raise PackLimitError(f"{where}: a lora layer has kind and activation '', got "
                                     f"{show(self.kind)}, {show(self.activation)}")
            scale = check_float(self.scale, f"{where}: scale", *LORA_SCALE_RANGE)
            raw = _named(self.tensors, f"{where}", LORA_TENSORS)
            tensors = {"a": _tensor(raw["a"], f"{where}: a", 2, _values_checked),
                       "b": _tensor(raw["b"], f"{where}: b", 2, _values_checked)}
            rank, fan_in = tensors["a"].shape
            out_ch = tensors["b"].shape[0]
            if rank > MAX_LORA_RANK:
                raise PackLimitError(f"{where}: LoRA rank {rank} exceeds {MAX_LORA_RANK}")
            expected = {"a": (rank, fan_in), "b": (out_ch, rank)}
        else:
            raise PackLimitError(f"{where}: adapter must be 'km' or 'lora', got {show(self.adapter)}")
        for tensor_name, shape in expected.items():
            if tensors[tensor_name].shape != shape:
                raise PackLimitError(
                    f"{where}: {tensor_name} has shape {list(tensors[tensor_name].shape)}, "
                    f"its other tensors need {list(shape)}"
                )
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "tensors", tensors)

    @staticmethod
    def tensor_names(adapter: str) -> tuple[str, ...]:
        return MODULATOR_TENSORS if adapter == "km" else LORA_TENSORS

    def to_msgpack(self) -> list:
        return [self.name, self.kind, self.scale]

    @classmethod
    def from_msgpack(cls, obj, where: str, adapter: str, activation: str, arrays: list,
                     values_checked: bool = False) -> Layer:
        if not isinstance(obj, list) or len(obj) != 3:
            raise MalformedPackError(f"{where} must be [name, kind, scale], got {show(obj)}")
        return cls(obj[0], adapter, obj[1], activation, obj[2],
                   dict(zip(cls.tensor_names(adapter), arrays, strict=True)), values_checked)

    def summary(self, storage_dtype: str) -> dict:
        return {"name": self.name, "adapter": self.adapter, "kind": self.kind,
                "activation": self.activation, "scale": self.scale,
                "tensors": _summary_of(self.tensors, storage_dtype)}


# --- one BatchNorm override -----------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class BnEntry:
    """New BatchNorm parameters for one layer; on disk just its name (tensors in the index)."""

    name: str
    tensors: Mapping[str, np.ndarray]
    _values_checked: InitVar[bool] = False  # only from_msgpack's (module docstring)

    def __post_init__(self, _values_checked: bool) -> None:
        name = check_text(self.name, "BN layer name", 256, LAYER_NAME_PATTERN)
        raw = _named(self.tensors, f"BN layer {name}", BN_TENSORS)
        tensors = {n: _tensor(raw[n], f"BN layer {name}: {n}", 1, _values_checked) for n in BN_TENSORS}
        shapes = {a.shape for a in tensors.values()}
        if len(shapes) != 1 or tensors["weight"].shape[0] > MAX_VECTOR:
            raise PackLimitError(f"BN layer {name}: tensors must be one length <= {MAX_VECTOR}, got "
                                 f"{sorted(list(s) for s in shapes)}")
        if tensors["running_var"].min() < 0:  # NaN is refused above, with the tensor's name
            raise PackLimitError(f"BN layer {name}: running_var has negative values")
        object.__setattr__(self, "tensors", tensors)

    def to_msgpack(self) -> str:
        return self.name

    @classmethod
    def from_msgpack(cls, obj, where: str, arrays: list, values_checked: bool = False) -> BnEntry:
        if not isinstance(obj, str):
            raise MalformedPackError(f"{where} must be a layer name, got {show(obj)}")
        return cls(obj, dict(zip(BN_TENSORS, arrays, strict=True)), values_checked)


# --- plain maps: preprocess, modulator, metrics, trainer ------------------------------------
def check_preprocess(value) -> dict:
    """The preprocessing spec, bounded: what ``device_runtime.preprocess`` may safely apply."""
    if not isinstance(value, Mapping) or set(value) != set(PREPROCESS_FIELDS):
        got = sorted(map(show, value)) if isinstance(value, Mapping) else show(value)
        raise PackLimitError(f"preprocess must have exactly {list(PREPROCESS_FIELDS)}, got {got}")
    resize = check_int(value["resize"], "preprocess resize", 1, MAX_SIDE)
    crop = check_int(value["crop"], "preprocess crop", 1, resize)
    spec = {"crop": crop, "interpolation": value["interpolation"], "resize": resize}
    for name, (low, high) in (("mean", MEAN_RANGE), ("std", STD_RANGE)):
        values = value[name]
        if not isinstance(values, (list, tuple)) or len(values) != 3:
            raise PackLimitError(f"preprocess {name} must be 3 numbers, got {show(values)}")
        spec[name] = [check_float(v, f"preprocess {name}", low, high) for v in values]
    if spec["interpolation"] not in INTERPOLATIONS:
        raise PackLimitError(f"preprocess interpolation must be one of {INTERPOLATIONS}, "
                             f"got {show(spec['interpolation'])}")
    return {k: spec[k] for k in PREPROCESS_FIELDS}


def check_modulator(value, method: str) -> dict | None:
    """The user's KM choice (nil unless ``method`` is km), hidden sizes bounded."""
    if method != "km":
        if value is not None:
            raise PackLimitError(f"a {show(method)} pack has no modulator, got {show(value)}")
        return None
    if not isinstance(value, Mapping) or set(value) != set(MODULATOR_FIELDS):
        raise PackLimitError(f"a km pack needs a modulator with exactly {list(MODULATOR_FIELDS)}, got {show(value)}")
    spec = {k: value[k] for k in MODULATOR_FIELDS}
    for hidden in ("kernel_hidden", "channel_hidden"):
        check_int(spec[hidden], f"modulator {hidden}", 1, MAX_HIDDEN)
    if not isinstance(spec["kind"], str) or not isinstance(spec["activation"], str):
        raise PackLimitError(f"modulator kind and activation must be strings, got {show(value)}")
    try:
        ModulatorSpec(**spec)
    except ValueError as exc:
        raise PackLimitError(f"modulator: {exc}") from None
    return spec


def check_info(value, where: str, depth: int = 0):
    """Informational JSON-like data (metrics, trainer): bounded, finite, printable; a canonical copy."""
    if isinstance(value, np.generic):
        value = value.item()
    if depth > MAX_INFO_DEPTH:
        raise PackLimitError(f"{where} is nested deeper than {MAX_INFO_DEPTH}")
    if value is None or isinstance(value, bool):
        return value
    if is_int(value):
        return check_int(value, where, -2**63, 2**64 - 1)
    if isinstance(value, float):
        return check_float(value, where, -float("inf"), float("inf"))
    if isinstance(value, str):
        return check_text(value, where, MAX_TEXT_CHARS, allow_empty=True)
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_INFO_ENTRIES:
            raise PackLimitError(f"{where} has more than {MAX_INFO_ENTRIES} elements")
        return [check_info(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if len(value) > MAX_INFO_ENTRIES:
            raise PackLimitError(f"{where} has more than {MAX_INFO_ENTRIES} keys")
        for key in value:
            check_text(key, f"{where} key", 64)
        return {k: check_info(value[k], f"{where}.{k}", depth + 1) for k in sorted(value)}
    raise PackLimitError(f"{where}: {type(value).__name__} values are not allowed")


# --- the body -------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Pack:
    """A task pack's body, validated; tensors are float32 numpy arrays whatever the storage dtype.

    ``n_bytes`` (the file's size) is set by the reader and is not part of the body.
    """

    task: str
    pack_version: int
    created: str
    base_id: str
    labels: list[str]
    preprocess: dict
    method: str
    modulator: dict | None
    storage_dtype: str
    layers: list[Layer]
    head: dict[str, np.ndarray]
    bn: list[BnEntry]
    metrics: dict
    trainer: dict
    expires: str | None = None
    key_id: str = ""
    format_version: int = FORMAT_VERSION
    n_bytes: int = field(default=0, compare=False)
    _values_checked: InitVar[bool] = False  # only from_msgpack's (module docstring)

    def __post_init__(self, _values_checked: bool) -> None:
        if not is_int(self.format_version) or self.format_version != FORMAT_VERSION:
            raise MalformedPackError(f"body format_version must be {FORMAT_VERSION}, got {show(self.format_version)}")
        if not isinstance(self.key_id, str) or not _KEY_ID.fullmatch(self.key_id):
            raise MalformedPackError(f"key_id must be 16 lowercase hex characters, got {show(self.key_id)}")
        check_text(self.task, "task", TASK_NAME_MAX, TASK_NAME_PATTERN)
        check_int(self.pack_version, "pack_version", 1, 2**63 - 1)
        created = parse_time(self.created, "created")
        if self.expires is not None and parse_time(self.expires, "expires") <= created:
            raise PackLimitError(f"expires {self.expires} is not after created {self.created}")
        if not isinstance(self.base_id, str) or not _BASE_ID.fullmatch(self.base_id):
            raise PackLimitError(f"base_id must be 64 lowercase hex characters, got {show(self.base_id)}")
        labels = self.labels
        if not isinstance(labels, (list, tuple)) or not 1 <= len(labels) <= MAX_LABELS:
            raise PackLimitError(f"labels must be a list of 1 to {MAX_LABELS} names, got {show(labels)}")
        labels = [check_text(x, f"labels[{i}]", MAX_LABEL_CHARS) for i, x in enumerate(labels)]
        if len(set(labels)) != len(labels):
            raise PackLimitError("labels must be unique")
        if self.method not in METHODS:
            raise PackLimitError(f"method must be one of {METHODS}, got {show(self.method)}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise PackLimitError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {show(self.storage_dtype)}")
        modulator = check_modulator(self.modulator, self.method)
        layers, bn = list(self.layers), list(self.bn)
        if len(layers) > MAX_LAYERS or len(bn) > MAX_LAYERS:
            raise PackLimitError(f"a pack adapts at most {MAX_LAYERS} conv and {MAX_LAYERS} BN layers")
        for layer in layers:
            self._check_layer(layer, modulator)
        for entry in bn:
            if not isinstance(entry, BnEntry):
                raise PackLimitError(f"bn entries must be BnEntry records, got {type(entry).__name__}")
        for what, names in (("layers", [x.name for x in layers]), ("bn", [x.name for x in bn])):
            if len(set(names)) != len(names):
                raise PackLimitError(f"{what} names the same layer twice")
        raw = _named(self.head, "head", HEAD_TENSORS)
        head = {"weight": _tensor(raw["weight"], "head weight", 2, _values_checked),
                "bias": _tensor(raw["bias"], "head bias", 1, _values_checked)}
        n_classes, features = head["weight"].shape
        if n_classes != len(labels) or head["bias"].shape != (n_classes,) or features > MAX_FEATURES:
            raise PackLimitError(
                f"head must be weight ({len(labels)} labels, <= {MAX_FEATURES} features) and bias "
                f"({len(labels)},), got {list(head['weight'].shape)} and {list(head['bias'].shape)}"
            )
        set_ = object.__setattr__
        set_(self, "labels", labels)
        set_(self, "preprocess", check_preprocess(self.preprocess))
        set_(self, "modulator", modulator)
        set_(self, "layers", layers)
        set_(self, "bn", bn)
        set_(self, "head", head)
        set_(self, "metrics", self._info(self.metrics, "metrics"))
        set_(self, "trainer", self._info(self.trainer, "trainer"))

    def _check_layer(self, layer, modulator: dict | None) -> None:
        if not isinstance(layer, Layer):
            raise PackLimitError(f"layers must be Layer records, got {type(layer).__name__}")
        if layer.adapter != self.method:
            raise PackLimitError(f"layer {layer.name}: adapter {show(layer.adapter)} does not fit a {self.method} pack")
        if modulator is None:
            return
        hidden = modulator["kernel_hidden"] if layer.kind == "kernel" else modulator["channel_hidden"]
        if layer.activation != modulator["activation"] or layer.tensors["w1"].shape[1] != hidden:
            raise PackLimitError(
                f"layer {layer.name}: activation {layer.activation} and hidden size "
                f"{layer.tensors['w1'].shape[1]} differ from the modulator's {modulator['activation']}, {hidden}"
            )
        if modulator["kind"] in ("kernel", "channel") and layer.kind != modulator["kind"]:
            raise PackLimitError(f"layer {layer.name}: kind {layer.kind} in a {modulator['kind']} pack")

    @staticmethod
    def _info(value, where: str) -> dict:
        if not isinstance(value, Mapping):
            raise PackLimitError(f"{where} must be a map, got {show(value)}")
        return check_info(value, where)

    # --- encoding ---------------------------------------------------------------------------
    def arrays(self) -> list[np.ndarray]:
        """Every tensor in index order: layers, head (weight, bias), BN layers."""
        out = [layer.tensors[n] for layer in self.layers for n in Layer.tensor_names(layer.adapter)]
        out += [self.head[n] for n in HEAD_TENSORS]
        out += [entry.tensors[n] for entry in self.bn for n in BN_TENSORS]
        return out

    def to_msgpack(self) -> dict:
        # a pack that was read keeps its index and blob as read: the reader checked that encoding
        # its arrays gives back exactly these, so they are not encoded a second time
        encoded = getattr(self, "_encoded", None)
        if encoded is None:
            entries, blob = encode_tensors(self.arrays(), self.storage_dtype)
            encoded = [e.to_msgpack() for e in entries], blob
        index, blob = encoded
        body = {
            "format_version": self.format_version, "key_id": self.key_id, "task": self.task,
            "pack_version": self.pack_version, "created": self.created, "expires": self.expires,
            "base_id": self.base_id, "labels": self.labels, "preprocess": self.preprocess,
            "method": self.method, "modulator": self.modulator, "storage_dtype": self.storage_dtype,
            "layers": [layer.to_msgpack() for layer in self.layers],
            "bn": [entry.to_msgpack() for entry in self.bn],
            "metrics": self.metrics, "trainer": self.trainer,
            "tensors": index, "data": blob,
        }
        return {k: body[k] for k in BODY_FIELDS}

    @classmethod
    def from_msgpack(cls, obj, *, n_bytes: int = 0) -> Pack:
        """The body decoded by ``codec.unpack``; every refusal is a MalformedPackError subclass."""
        if not isinstance(obj, dict) or set(obj) != set(BODY_FIELDS):
            if not isinstance(obj, dict):
                raise MalformedPackError(f"body must be a map, got a msgpack {type(obj).__name__}")
            missing = sorted(set(BODY_FIELDS) - set(obj))
            extra = sorted(show(k) for k in set(obj) - set(BODY_FIELDS))
            raise MalformedPackError(f"body fields are wrong: missing {missing}, unexpected {extra}")
        method, dtype = obj["method"], obj["storage_dtype"]
        if method not in METHODS:
            raise PackLimitError(f"method must be one of {METHODS}, got {show(method)}")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise PackLimitError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {show(dtype)}")
        for name in ("layers", "bn", "tensors"):
            if not isinstance(obj[name], list):
                raise MalformedPackError(f"{name} must be a list, got {show(obj[name])}")
        if not isinstance(obj["data"], bytes):
            raise MalformedPackError(f"data must be bin, got {show(obj['data'])}")
        layers, bn, index = obj["layers"], obj["bn"], obj["tensors"]
        if method in ("bn", "bias", "head") and layers:
            raise PackLimitError(f"a {method} pack adapts no conv layers, got {len(layers)}")
        per_layer = len(Layer.tensor_names(method))
        needed = per_layer * len(layers) + len(HEAD_TENSORS) + len(BN_TENSORS) * len(bn)
        if len(index) != needed or needed > MAX_TENSORS:
            raise MalformedPackError(
                f"tensors has {len(index)} entries; {len(layers)} layers, the head and "
                f"{len(bn)} BN layers need {needed} (at most {MAX_TENSORS})"
            )
        decoded = read_tensors(index, obj["data"], dtype)
        checked = decoded is not None
        if not checked:  # something is off: the checks one by one name the entry or tensor at fault
            entries = [TensorEntry.from_msgpack(e, f"tensors[{i}]") for i, e in enumerate(index)]
            decoded = decode_tensors(entries, obj["data"], dtype)
        arrays = iter(decoded)

        def take(n: int) -> list:
            return list(islice(arrays, n))

        modulator = obj["modulator"]
        activation = modulator.get("activation") if isinstance(modulator, dict) and method == "km" else ""
        pack = cls(
            task=obj["task"], pack_version=obj["pack_version"], created=obj["created"],
            base_id=obj["base_id"], labels=obj["labels"], preprocess=obj["preprocess"],
            method=method, modulator=modulator, storage_dtype=dtype,
            layers=[Layer.from_msgpack(x, f"layers[{i}]", method, activation, take(per_layer), checked)
                    for i, x in enumerate(layers)],
            head=dict(zip(HEAD_TENSORS, take(len(HEAD_TENSORS)), strict=True)),
            bn=[BnEntry.from_msgpack(x, f"bn[{i}]", take(len(BN_TENSORS)), checked) for i, x in enumerate(bn)],
            metrics=obj["metrics"], trainer=obj["trainer"], expires=obj["expires"],
            key_id=obj["key_id"], format_version=obj["format_version"], n_bytes=n_bytes,
            _values_checked=checked,
        )
        object.__setattr__(pack, "_encoded", (index, obj["data"]))
        return pack

    # --- views ------------------------------------------------------------------------------
    @property
    def created_at(self) -> datetime:
        return parse_time(self.created, "created")

    @property
    def expires_at(self) -> datetime | None:
        return None if self.expires is None else parse_time(self.expires, "expires")

    def n_parameters(self) -> int:
        """Task-specific numbers the pack carries (modulators or LoRA factors, head, BatchNorm)."""
        return int(sum(a.size for a in self.arrays()))

    def summary(self) -> dict:
        """Everything but the tensor data (tensors as shape + stored dtype); JSON-serialisable."""
        return {
            "format_version": self.format_version, "key_id": self.key_id, "task": self.task,
            "pack_version": self.pack_version, "created": self.created, "expires": self.expires,
            "base_id": self.base_id, "labels": list(self.labels), "n_classes": len(self.labels),
            "preprocess": self.preprocess, "method": self.method, "modulator": self.modulator,
            "storage_dtype": self.storage_dtype,
            "layers": [layer.summary(self.storage_dtype) for layer in self.layers],
            "head": _summary_of(self.head, self.storage_dtype),
            "bn": [{"name": e.name, "tensors": _summary_of(e.tensors, self.storage_dtype)} for e in self.bn],
            "metrics": self.metrics, "trainer": self.trainer,
            "n_parameters": self.n_parameters(), "n_bytes": self.n_bytes,
        }
