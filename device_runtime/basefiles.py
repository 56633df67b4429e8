"""The exported base directory: ``base.onnx`` + ``base.weights`` + ``manifest.json``.

Every conv kernel and BatchNorm tensor lives in ``base.weights`` as raw little-endian float32 at a
64-byte aligned offset, referenced from the graph as ONNX external data. That one layout serves
three readers: onnxruntime loads the graph and its weights directly, the runtime memory-maps the
kernels to rebuild them without copying, and ``add_external_initializers`` can replace exactly
those tensors per task pack.

``base_id`` binds packs to everything the device uses from the folder: it is the sha256 over the
graph bytes, then the weights bytes, then the manifest without its ``base_id`` field in canonical
JSON (sorted keys, no spaces, ASCII). Editing any of the three (moving a layer's offset, pointing a
layer at another initializer) either fails ``Base.open`` or, with ``base_id`` recomputed, gives a
base no existing pack was made for. Base format 1 (graph + weights only) is refused: re-export.

Files that change after ``Base.open`` verified them: ``Base.open`` records size, mtime and inode of
the three files before hashing (and checks them again after), and :meth:`Base.check_unchanged`,
which the runtime calls before every pack load, refuses the base if any of them differs. The
kernels the runtime rebuilds come from one read-only mapping of ``base.weights``; onnxruntime reads
the graph and the other weights from the files at each load, which is why they are re-checked.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import BaseError
from .files import read_bounded, write_atomic
from .pack.records import BN_TENSORS  # the replaceable BatchNorm tensors, in ONNX input order
from .limits import MAX_MANIFEST_BYTES, MAX_MANIFEST_ELEMENTS

# A device has no base until one is copied to it: say where it comes from and how to point at it.
MISSING_BASE = ("not found: copy the base/ folder made on the host by `km-edge export-base` here, "
                "or point --base (or KM_EDGE_BASE) at it")

__all__ = ["Base", "write_base", "BASE_FORMAT", "BASE_FORMAT_VERSION", "GRAPH_FILE",
           "WEIGHTS_FILE", "MANIFEST_FILE", "ALIGNMENT", "BN_TENSORS"]

BASE_FORMAT = "km-edge-base"
BASE_FORMAT_VERSION = 2  # 2: base_id covers the manifest too
GRAPH_FILE = "base.onnx"
WEIGHTS_FILE = "base.weights"
MANIFEST_FILE = "manifest.json"
ALIGNMENT = 64  # every tensor starts at a multiple of this, so memory-mapped views are aligned

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

    manifest = {"format": BASE_FORMAT, "format_version": BASE_FORMAT_VERSION}
    manifest.update({k: v for k, v in meta.items() if k not in _COMPUTED_KEYS})
    manifest.update({
        "graph": GRAPH_FILE, "weights_file": WEIGHTS_FILE,
        "conv_layers": conv_entries, "bn_layers": bn_entries,
        "graph_bytes": len(graph_bytes), "weights_bytes": len(weights_bytes),
    })
    # what the manifest says must survive a JSON round trip unchanged, or base_id would not
    manifest = json.loads(json.dumps(manifest, allow_nan=False))
    digest = hashlib.sha256(graph_bytes)
    digest.update(weights_bytes)
    digest.update(manifest_identity_bytes(manifest))
    manifest["base_id"] = digest.hexdigest()
    write_atomic(out_dir / WEIGHTS_FILE, weights_bytes)
    write_atomic(out_dir / GRAPH_FILE, graph_bytes)
    write_atomic(out_dir / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return manifest


def manifest_identity_bytes(manifest: dict) -> bytes:
    """The manifest's part of ``base_id``: every field but ``base_id``, canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != "base_id"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _sha256_files(*paths: Path) -> hashlib._Hash:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest


def _file_state(paths) -> tuple:
    """(size, mtime, inode, device) of each file: what `check_unchanged` compares."""
    states = []
    for path in paths:
        info = os.stat(path)
        states.append((info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev))
    return tuple(states)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_file_name(value) -> bool:
    """A plain file name inside the base folder (no folder part, not . or ..)."""
    return (isinstance(value, str) and 0 < len(value) <= 255 and value not in (".", "..")
            and "/" not in value and "\\" not in value and "\0" not in value)


def _check_tensor_entry(where: str, entry, weights_size: int) -> tuple[int, ...]:
    """Shape of one manifest tensor entry, after checking it lies inside base.weights."""
    def refuse(problem: str):
        raise BaseError(f"manifest.json: {where} {problem}")

    if not isinstance(entry, dict):
        refuse("is not a map")
    shape, offset, length = entry.get("shape"), entry.get("offset"), entry.get("length")
    if not isinstance(entry.get("initializer"), str) or not entry["initializer"]:
        refuse("needs an initializer name")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) and d >= 0 for d in shape):
        refuse("needs a shape of at most 8 non-negative ints")
    if not (_is_int(offset) and _is_int(length)) or offset < 0 or length < 0:
        refuse("needs a non-negative int offset and length")
    if entry.get("dtype") != "float32":
        refuse(f"has dtype {str(entry.get('dtype'))[:40]!r}, only float32 is supported")
    elements = math.prod(shape)
    if elements > MAX_MANIFEST_ELEMENTS or length != 4 * elements or offset % 4:
        refuse("has offset/length that do not fit its shape")
    if offset + length > weights_size:
        refuse("lies beyond the end of base.weights")
    return tuple(shape)


def _refuse_duplicate_keys(pairs):
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)[:60]!r}")
    return dict(pairs)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _read_manifest(manifest_path: Path) -> dict:
    data = read_bounded(manifest_path, MAX_MANIFEST_BYTES, BaseError, "km-edge base manifest",
                        missing=MISSING_BASE)
    try:
        manifest = json.loads(data.decode("utf-8"), object_pairs_hook=_refuse_duplicate_keys,
                              parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise BaseError(f"{manifest_path}: cannot read manifest ({reason})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BASE_FORMAT:
        raise BaseError(f"{manifest_path}: not a km-edge base manifest")
    if manifest.get("format_version") != BASE_FORMAT_VERSION:
        raise BaseError(
            f"{manifest_path}: base format_version {str(manifest.get('format_version'))[:20]} "
            f"is not supported (expected {BASE_FORMAT_VERSION}; re-export the base with "
            "`km-edge export-base` and re-pack its tasks)"
        )
    return manifest


def _check_manifest(manifest_path: Path, manifest: dict) -> None:
    """Types and ranges of every manifest field the device uses; BaseError names the field."""
    from .preprocess import check_spec  # Pillow only when a base is opened

    def refuse(problem: str):
        raise BaseError(f"{manifest_path}: {problem}")

    required = ("graph", "weights_file", "conv_layers", "bn_layers", "base_id", "preprocess",
                "feature_size", "input_name", "output_name", "weights_bytes", "graph_bytes")
    missing = [key for key in required if key not in manifest]
    if missing:
        refuse(f"incomplete, missing {', '.join(missing)}")
    for key in ("graph", "weights_file"):
        if not _is_file_name(manifest[key]):
            refuse(f"{key} must be a file name inside the base folder")
    for key in ("input_name", "output_name"):
        if not isinstance(manifest[key], str) or not manifest[key]:
            refuse(f"{key} must be a non-empty string")
    for key in ("feature_size", "weights_bytes", "graph_bytes"):
        value = manifest[key]
        if not _is_int(value) or value < (1 if key == "feature_size" else 0):
            refuse(f"{key} must be a {'positive' if key == 'feature_size' else 'non-negative'} int, "
                   f"got {str(value)[:40]!r}")
    base_id = manifest["base_id"]
    if not (isinstance(base_id, str) and len(base_id) == 64
            and all(c in "0123456789abcdef" for c in base_id)):
        refuse("base_id must be 64 lowercase hex characters")
    try:
        check_spec(manifest["preprocess"])
    except ValueError as exc:
        refuse(f"preprocess: {exc}")
    for key in ("conv_layers", "bn_layers"):
        if not isinstance(manifest[key], list):
            refuse(f"{key} must be a list")
        names = [entry.get("name") if isinstance(entry, dict) else None for entry in manifest[key]]
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            refuse(f"{key} entries need unique non-empty names")


def _graph_input_hw(graph_path: Path, input_name: str) -> tuple[int | None, int | None]:
    """(height, width) of the graph input where fixed (None where symbolic); graph read without
    its external data."""
    try:
        model = onnx.load(str(graph_path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and others for a corrupt file
        raise BaseError(f"{graph_path}: not a readable ONNX graph ({type(exc).__name__})") from None
    for value in model.graph.input:
        if value.name == input_name:
            dims = value.type.tensor_type.shape.dim
            if len(dims) != 4:
                raise BaseError(f"{graph_path}: input {input_name!r} is not N x 3 x H x W")
            return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                         for d in dims[2:])
    raise BaseError(f"{graph_path}: has no input named {input_name[:80]!r} (see manifest.json)")


class Base:
    """One exported base, opened read-only; kernels are memory-mapped views of ``base.weights``."""

    def __init__(self, base_dir: Path, manifest: dict, weights: np.ndarray):
        self.base_dir = base_dir
        self._paths: tuple = ()
        self._state: tuple = ()
        self.input_hw: tuple[int | None, int | None] = (None, None)  # fixed graph input size
        self.manifest = manifest
        self._weights = weights
        self._conv = {entry["name"]: entry for entry in manifest["conv_layers"]}
        self._bn = {entry["name"]: entry for entry in manifest["bn_layers"]}

    @classmethod
    def open(cls, base_dir, verify: bool = True) -> "Base":
        """Read and check the manifest, map the weights, and (``verify``) check ``base_id`` against
        the graph, weights and manifest; remember the files' state for :meth:`check_unchanged`."""
        base_dir = Path(base_dir)
        manifest_path = base_dir / MANIFEST_FILE
        before = _file_state([manifest_path]) if manifest_path.is_file() else None
        manifest = _read_manifest(manifest_path)
        _check_manifest(manifest_path, manifest)

        graph_path = base_dir / manifest["graph"]
        weights_path = base_dir / manifest["weights_file"]
        for path in (graph_path, weights_path):
            if not path.is_file():
                raise BaseError(f"{path}: missing from the base directory")
        paths = (manifest_path, graph_path, weights_path)
        state = _file_state(paths)
        if state[0] != before[0]:
            raise BaseError(f"{manifest_path}: changed while being read; try again")
        for path, key in ((graph_path, "graph_bytes"), (weights_path, "weights_bytes")):
            size = os.path.getsize(path)
            if size != manifest[key]:
                raise BaseError(f"{path}: {size} bytes, manifest says {manifest[key]}")
        weights_size = manifest["weights_bytes"]
        for entry in manifest["conv_layers"]:
            where = f"conv layer {str(entry['name'])[:80]!r}"
            shape = _check_tensor_entry(where, entry, weights_size)
            groups = entry.get("groups", 1)
            if len(shape) != 4:
                raise BaseError(f"manifest.json: {where} is not 4-D")
            if not _is_int(groups) or groups < 1 or shape[0] % groups:
                raise BaseError(f"manifest.json: {where} has groups that do not divide its "
                                "output channels")
        for entry in manifest["bn_layers"]:
            tensors = entry.get("tensors")
            if not isinstance(tensors, dict) or not set(tensors) <= set(BN_TENSORS):
                raise BaseError(f"manifest.json: BN {str(entry['name'])[:80]!r} tensors must be a "
                                f"map with keys among {', '.join(BN_TENSORS)}")
            for tensor_name, tensor in tensors.items():
                _check_tensor_entry(f"BN {str(entry['name'])[:80]!r} {tensor_name}", tensor,
                                    weights_size)

        if verify:
            digest = _sha256_files(graph_path, weights_path)
            digest.update(manifest_identity_bytes(manifest))
            if digest.hexdigest() != manifest["base_id"]:
                raise BaseError(
                    f"{base_dir}: base.onnx/base.weights/manifest.json do not match manifest base_id "
                    "(a file was edited; re-export the base)"
                )
            if _file_state(paths) != state:
                raise BaseError(f"{base_dir}: base files changed while being verified; try again")
        input_hw = _graph_input_hw(graph_path, manifest["input_name"])
        crop = manifest["preprocess"]["crop"]
        if any(fixed is not None and fixed != crop for fixed in input_hw):
            raise BaseError(f"{manifest_path}: preprocess crop {crop} differs from the graph's input "
                            f"size {input_hw[0]} x {input_hw[1]}")
        if weights_size:
            # plain ndarray over the read-only mapping: views and results are ordinary arrays
            weights = np.asarray(np.memmap(weights_path, dtype=np.uint8, mode="r"))
        else:  # np.memmap refuses empty files
            weights = np.zeros(0, dtype=np.uint8)
        base = cls(base_dir, manifest, weights)
        base._paths, base._state, base.input_hw = paths, state, input_hw
        return base

    def check_unchanged(self) -> None:
        """BaseError if the manifest, graph or weights changed (size, mtime or inode) since
        :meth:`open` verified them; the runtime calls this before every pack load."""
        try:
            now = _file_state(self._paths)
        except OSError:
            now = None
        if now != self._state:
            changed = [p.name for i, p in enumerate(self._paths)
                       if now is None or now[i] != self._state[i]]
            raise BaseError(
                f"{self.base_dir}: {', '.join(changed)} changed since the runtime opened the base; "
                "restart it so the base is verified again"
            )

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

    def conv_offsets(self) -> dict[str, int]:
        """{conv layer name: byte offset of its kernel in base.weights}."""
        return {name: int(entry["offset"]) for name, entry in self._conv.items()}

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
