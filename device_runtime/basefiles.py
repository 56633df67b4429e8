"""The exported base directory: ``base.onnx`` + ``base.weights`` + ``manifest.json``.

Every conv kernel and BatchNorm tensor lives in ``base.weights`` as raw little-endian float32 at a
64-byte aligned offset, referenced from the graph as ONNX external data. That one layout serves
three readers: onnxruntime loads the graph and its weights directly, the runtime memory-maps the
kernels to rebuild them without copying, and ``add_external_initializers`` can replace exactly
those tensors per task pack. ``base_id`` (sha256 over graph bytes then weights bytes) binds packs
to the bytes they were trained against.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import BaseError
from .files import write_atomic

__all__ = ["Base", "write_base", "BASE_FORMAT", "BASE_FORMAT_VERSION", "GRAPH_FILE",
           "WEIGHTS_FILE", "MANIFEST_FILE", "ALIGNMENT", "BN_TENSORS"]

BASE_FORMAT = "km-edge-base"
BASE_FORMAT_VERSION = 1
GRAPH_FILE = "base.onnx"
WEIGHTS_FILE = "base.weights"
MANIFEST_FILE = "manifest.json"
ALIGNMENT = 64  # every tensor starts at a multiple of this, so memory-mapped views are aligned
BN_TENSORS = ("weight", "bias", "running_mean", "running_var")

# keys write_base computes itself; meta cannot override them
_COMPUTED_KEYS = ("format", "format_version", "graph", "weights_file", "conv_layers",
                  "bn_layers", "graph_bytes", "weights_bytes", "base_id")


def _externalise(tensor: onnx.TensorProto, weights: bytearray) -> dict:
    """Append ``tensor``'s data to ``weights`` (aligned) and turn it into an external reference."""
    if tensor.data_type != onnx.TensorProto.FLOAT:
        raise ValueError(
            f"initializer {tensor.name!r} must be float32, got "
            f"{onnx.TensorProto.DataType.Name(tensor.data_type)}"
        )
    array = numpy_helper.to_array(tensor).astype("<f4", copy=False)
    data = np.ascontiguousarray(array).tobytes()
    weights.extend(b"\0" * (-len(weights) % ALIGNMENT))
    offset = len(weights)
    weights.extend(data)
    for field in ("raw_data", "float_data", "external_data"):
        tensor.ClearField(field)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", WEIGHTS_FILE), ("offset", str(offset)),
                       ("length", str(len(data)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return {"shape": list(array.shape), "dtype": "float32", "offset": offset, "length": len(data)}


def write_base(out_dir, model: onnx.ModelProto, conv_layers: list[dict],
               bn_layers: list[dict], meta: dict) -> dict:
    """Write ``base.onnx``, ``base.weights`` and ``manifest.json`` into ``out_dir``; return the manifest.

    ``model`` holds every initializer embedded (it is not modified). ``conv_layers`` are
    ``{"name", "initializer", "groups"}`` in graph order, ``bn_layers`` are ``{"name", "tensors":
    {"weight"|"bias"|"running_mean"|"running_var": initializer name}}``. Exactly those initializers
    move to ``base.weights``. Same inputs give byte-identical files and the same ``base_id``.
    The manifest is written last, so a directory with a manifest is complete.
    """
    out_dir = Path(out_dir)
    model = copy.deepcopy(model)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}

    def lookup(name: str) -> onnx.TensorProto:
        if name not in initializers:
            raise ValueError(f"the model has no initializer named {name!r}")
        return initializers[name]

    weights = bytearray()
    placed: dict[str, dict] = {}  # initializer name -> entry, in case two layers share a tensor

    def place(name: str) -> dict:
        tensor = lookup(name)
        if name not in placed:
            placed[name] = _externalise(tensor, weights)
        return dict(placed[name])

    conv_entries = []
    for layer in conv_layers:
        tensor = lookup(layer["initializer"])
        if len(tensor.dims) != 4:
            raise ValueError(
                f"conv layer {layer['name']!r}: weight {layer['initializer']!r} must be 4-D, "
                f"got shape {list(tensor.dims)}"
            )
        entry = {"name": layer["name"], "initializer": layer["initializer"],
                 "groups": int(layer.get("groups", 1))}
        entry.update(place(layer["initializer"]))
        conv_entries.append(entry)

    bn_entries = []
    for layer in bn_layers:
        tensors = {}
        for tensor_name, init_name in layer["tensors"].items():
            if tensor_name not in BN_TENSORS:
                raise ValueError(
                    f"BN layer {layer['name']!r}: tensor must be one of {BN_TENSORS}, "
                    f"got {tensor_name!r}"
                )
            tensors[tensor_name] = {"initializer": init_name, **place(init_name)}
        bn_entries.append({"name": layer["name"], "tensors": tensors})

    graph_bytes = model.SerializeToString(deterministic=True)
    weights_bytes = bytes(weights)
    base_id = hashlib.sha256(graph_bytes + weights_bytes).hexdigest()

    manifest = {"format": BASE_FORMAT, "format_version": BASE_FORMAT_VERSION}
    manifest.update({k: v for k, v in meta.items() if k not in _COMPUTED_KEYS})
    manifest.update({
        "graph": GRAPH_FILE, "weights_file": WEIGHTS_FILE,
        "conv_layers": conv_entries, "bn_layers": bn_entries,
        "graph_bytes": len(graph_bytes), "weights_bytes": len(weights_bytes),
        "base_id": base_id,
    })
    write_atomic(out_dir / WEIGHTS_FILE, weights_bytes)
    write_atomic(out_dir / GRAPH_FILE, graph_bytes)
    write_atomic(out_dir / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return manifest


def _sha256_files(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _check_tensor_entry(where: str, entry, weights_size: int) -> tuple[int, ...]:
    """Shape of one manifest tensor entry, after checking it lies inside base.weights."""
    try:
        shape = tuple(int(d) for d in entry["shape"])
        offset, length = int(entry["offset"]), int(entry["length"])
        dtype = entry["dtype"]
    except (KeyError, TypeError, ValueError) as exc:
        raise BaseError(f"manifest.json: {where} is incomplete ({exc!r})") from None
    if dtype != "float32":
        raise BaseError(f"manifest.json: {where} has dtype {dtype!r}, only float32 is supported")
    if length != 4 * int(np.prod(shape, dtype=np.int64)) or offset < 0 or offset % 4:
        raise BaseError(f"manifest.json: {where} has offset/length that do not fit its shape")
    if offset + length > weights_size:
        raise BaseError(f"manifest.json: {where} lies beyond the end of base.weights")
    return shape


class Base:
    """One exported base, opened read-only; kernels are memory-mapped views of ``base.weights``."""

    def __init__(self, base_dir: Path, manifest: dict, weights: np.ndarray):
        self.base_dir = base_dir
        self.manifest = manifest
        self._weights = weights
        self._conv = {entry["name"]: entry for entry in manifest["conv_layers"]}
        self._bn = {entry["name"]: entry for entry in manifest["bn_layers"]}

    @classmethod
    def open(cls, base_dir, verify: bool = True) -> "Base":
        """Read the manifest, map the weights, and (``verify``) check ``base_id`` against the bytes."""
        base_dir = Path(base_dir)
        manifest_path = base_dir / MANIFEST_FILE
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BaseError(f"{manifest_path}: not found (run `km-edge export-base` first)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BaseError(f"{manifest_path}: cannot read manifest ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != BASE_FORMAT:
            raise BaseError(f"{manifest_path}: not a km-edge base manifest")
        if manifest.get("format_version") != BASE_FORMAT_VERSION:
            raise BaseError(
                f"{manifest_path}: base format_version {manifest.get('format_version')!r} "
                f"is not supported (expected {BASE_FORMAT_VERSION})"
            )
        required = ("graph", "weights_file", "conv_layers", "bn_layers", "base_id", "preprocess",
                    "feature_size", "input_name", "output_name", "weights_bytes")
        missing = [key for key in required if key not in manifest]
        if missing:
            raise BaseError(f"{manifest_path}: incomplete, missing {', '.join(missing)}")

        graph_path = base_dir / manifest["graph"]
        weights_path = base_dir / manifest["weights_file"]
        for path in (graph_path, weights_path):
            if not path.is_file():
                raise BaseError(f"{path}: missing from the base directory")
        weights_size = os.path.getsize(weights_path)
        if weights_size != manifest["weights_bytes"]:
            raise BaseError(
                f"{weights_path}: {weights_size} bytes, manifest says {manifest['weights_bytes']}"
            )
        try:
            for entry in manifest["conv_layers"]:
                shape = _check_tensor_entry(f"conv layer {entry['name']!r}", entry, weights_size)
                if len(shape) != 4:
                    raise BaseError(f"manifest.json: conv layer {entry['name']!r} is not 4-D")
                entry["initializer"]  # noqa: B018 - presence check
            for entry in manifest["bn_layers"]:
                for tensor_name, tensor in entry["tensors"].items():
                    _check_tensor_entry(f"BN {entry['name']!r} {tensor_name}", tensor, weights_size)
                    tensor["initializer"]  # noqa: B018 - presence check
        except (KeyError, TypeError, AttributeError) as exc:
            raise BaseError(f"{manifest_path}: malformed layer entry ({exc!r})") from None

        if verify and _sha256_files(graph_path, weights_path) != manifest["base_id"]:
            raise BaseError(f"{base_dir}: base.onnx/base.weights do not match manifest base_id")
        if weights_size:
            # plain ndarray over the read-only mapping: views and results are ordinary arrays
            weights = np.asarray(np.memmap(weights_path, dtype=np.uint8, mode="r"))
        else:  # np.memmap refuses empty files
            weights = np.zeros(0, dtype=np.uint8)
        return cls(base_dir, manifest, weights)

    # --- identity and files ---------------------------------------------------------------
    @property
    def base_id(self) -> str:
        return self.manifest["base_id"]

    @property
    def graph_path(self) -> Path:
        return self.base_dir / self.manifest["graph"]

    @property
    def weights_path(self) -> Path:
        return self.base_dir / self.manifest["weights_file"]

    @property
    def preprocess(self) -> dict:
        return self.manifest["preprocess"]

    @property
    def feature_size(self) -> int:
        return int(self.manifest["feature_size"])

    @property
    def input_name(self) -> str:
        return self.manifest["input_name"]

    @property
    def output_name(self) -> str:
        return self.manifest["output_name"]

    # --- tensors --------------------------------------------------------------------------
    def _view(self, entry: dict) -> np.ndarray:
        """A read-only float32 view of one tensor inside the mapped weights (no copy)."""
        start = int(entry["offset"])
        raw = self._weights[start:start + int(entry["length"])]
        return raw.view("<f4").reshape(tuple(entry["shape"]))

    @property
    def conv_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(entry["shape"]) for name, entry in self._conv.items()}

    @property
    def conv_groups(self) -> dict[str, int]:
        return {name: int(entry.get("groups", 1)) for name, entry in self._conv.items()}

    @property
    def bn_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        return {name: {t: tuple(spec["shape"]) for t, spec in entry["tensors"].items()}
                for name, entry in self._bn.items()}

    def conv_kernels(self) -> dict[str, np.ndarray]:
        """{conv layer name: frozen kernel (O, I/groups, kh, kw)}, views of the mapped file."""
        return {name: self._view(entry) for name, entry in self._conv.items()}

    def bn_tensors(self) -> dict[str, dict[str, np.ndarray]]:
        """{BN layer name: {"weight"|"bias"|"running_mean"|"running_var": array view}}."""
        return {name: {t: self._view(spec) for t, spec in entry["tensors"].items()}
                for name, entry in self._bn.items()}

    def initializer_for(self, layer_name: str, tensor: str | None = None) -> str:
        """ONNX initializer name of a conv layer's weight, or (``tensor`` given) of a BN tensor."""
        if tensor is None:
            if layer_name not in self._conv:
                raise KeyError(f"the base has no conv layer {layer_name!r}")
            return self._conv[layer_name]["initializer"]
        if layer_name not in self._bn or tensor not in self._bn[layer_name]["tensors"]:
            raise KeyError(f"the base has no BN tensor {layer_name!r}.{tensor}")
        return self._bn[layer_name]["tensors"][tensor]["initializer"]
