"""The device runtime: one frozen base, task packs switched in and out.

``Runtime`` decides what to trust: a pack is used only after its signature verifies
(``pack.read_pack``), its ``base_id`` equals this base's, every tensor fits the base
manifest, and it is not older than a pack already loaded for the same task. All checks run before
anything is built, so a refused pack leaves the active one untouched. Kernels are rebuilt once per
load; sessions are cached by the pack file's sha256 so switching back to a recent task is cheap.
Given a ``rollback.RollbackState``, the "not older" rule also holds across processes and restarts:
a pack older than the version the device recorded is refused, and every activated pack is recorded.

Memory: on the CPU provider, kernels that onnxruntime fuses into BatchNorm while it builds the
session (``backends.fused_at_load``) are rebuilt into one buffer reused by every load (where it
can, the RAM copy of base.weights that the session is created from: ``ramcopy``), so a cached
pack costs what onnxruntime holds, not another copy of the conv weights; evicting a pack hands
freed memory back to the OS (``malloc_trim`` on glibc), so RSS stays bounded by the cache size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import km, limits, ramcopy
from .backends import ProviderConfig, fused_at_load, make_backend
from .basefiles import BN_TENSORS, Base
from .errors import (
    BaseMismatchError,
    DataError,
    DowngradeError,
    ImageError,
    MalformedPackError,
    NonFiniteError,
    ShapeMismatchError,
)
from .imagefolder import list_image_folder
from .pack import read_pack, read_pack_file
from .preprocess import check_spec, load_image, neutral_batch, preprocess

__all__ = ["Runtime", "LoadedPack", "release_memory", "top_predictions"]
log = logging.getLogger(__name__)


def _load_malloc_trim():
    """glibc's ``malloc_trim``, or None (musl, macOS, Windows: nothing to call)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def release_memory() -> bool:
    """Return freed heap memory to the OS (glibc keeps it otherwise); True where it could."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


@dataclass
class LoadedPack:
    """A verified pack with its ready backend; ``timings_ms`` has verify, rebuild, session
    (and preprocess, infer after predict/evaluate)."""

    pack: object
    backend: object
    path: Path
    sha256: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    probed: bool = False  # scored the mid-grey probe image finitely (Runtime.load_pack(probe=True))

    @property
    def labels(self) -> list[str]:
        return list(self.pack.labels)

    def logits(self, features: np.ndarray) -> np.ndarray:
        """(N, n_labels) float32: this pack's head on (N, F) pooled features, checked finite.
        Reads only, so several threads may share one LoadedPack (onnxruntime sessions are
        thread-safe too)."""
        return head_scores(self.pack, features, self.path.name)


def head_scores(pack, features: np.ndarray, name: str) -> np.ndarray:
    """``pack``'s head on (N, F) pooled features; refused (NonFiniteError naming ``name``) unless
    every score is finite. The one place a head is applied: every request and the load probe."""
    weight = np.asarray(pack.head["weight"], dtype=np.float32)
    bias = np.asarray(pack.head["bias"], dtype=np.float32)
    with np.errstate(all="ignore"):
        scores = features @ weight.T + bias
    limits.check_finite_scores(name, scores)
    return scores


def top_predictions(logits: np.ndarray, labels: list[str], top_k: int) -> list[list[dict]]:
    """Per row of (N, n_labels) logits: the ``top_k`` most probable labels (softmax), best first,
    as ``{"label", "index", "probability"}``; ``top_k`` is clamped to [1, n_labels]."""
    top_k = max(1, min(int(top_k), len(labels)))
    rows = []
    for row in _softmax(logits):
        order = np.argsort(-row, kind="stable")[:top_k]
        rows.append([{"label": labels[i], "index": int(i), "probability": float(row[i])} for i in order])
    return rows


_SETTLED_NS = 2_000_000_000  # a file changed less than this ago may change again unseen


def _file_signature(path: Path) -> tuple | None:
    """What changes whenever a file's bytes do: a cache hit on an unchanged file skips
    reading and hashing it (the sha256 of a 0.7 MB pack alone is ~2 ms on a small CPU)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _settled(signature: tuple | None) -> bool:
    """Whether a signature can stand for the bytes: not when the file changed so recently that
    a rewrite within the file system's timestamp granularity would keep the same times."""
    return signature is not None and time.time_ns() - max(signature[3], signature[4]) > _SETTLED_NS


class _Stopwatch:
    """Adds the elapsed milliseconds of a ``with`` block to ``timings[key]``."""

    def __init__(self, timings: dict, key: str, accumulate: bool = False):
        self.timings, self.key, self.accumulate = timings, key, accumulate

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        elapsed = (time.perf_counter() - self.start) * 1000.0
        previous = self.timings.get(self.key, 0.0) if self.accumulate else 0.0
        self.timings[self.key] = previous + elapsed
        return False


def _short(base_id: str) -> str:
    return f"{str(base_id)[:12]}…"


def _shape(array) -> tuple[int, ...]:
    return tuple(np.shape(array))


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


class Runtime:
    """Holds one base and one active task pack; see the module docstring for what it checks."""

    def __init__(self, base_dir: str | os.PathLike, trusted_keys: Mapping[str, object],
                 backend: str = "ort", threads: int | None = None, verify_base: bool = True,
                 cache_size: int = 4, rollback=None, provider: str | None = None, trt_fp16: bool = False,
                 trt_cache_dir: str | os.PathLike | None = None):
        self.provider = ProviderConfig(provider, trt_fp16=trt_fp16, trt_cache_dir=trt_cache_dir)
        self.base = Base.open(base_dir, verify=verify_base)
        self.rollback = rollback  # a rollback.RollbackState, or None: no persistent record
        self.trusted_keys = dict(trusted_keys)
        self.backend_name = backend
        self.threads = threads
        self.cache_size = max(1, int(cache_size))
        self._cache: OrderedDict[str, LoadedPack] = OrderedDict()
        self._digests: dict[str, tuple] = {}  # path -> (file signature, sha256) of cached packs
        # conv layers whose rebuilt kernel onnxruntime copies (fuses) at load: rebuilt into one
        # buffer shared by all loads (CPU provider only; GPU providers keep every override alive)
        self._shared_layers: set[str] = set()
        if backend == "ort" and self.provider.name == "cpu":
            fused = fused_at_load(self.base.graph_path)
            self._shared_layers = {name for name in self.base.conv_shapes
                                   if self.base.initializer_for(name) in fused}
        self._shared_buffer = np.zeros(0, dtype=np.float32)
        # where those kernels go instead when it can be had: a RAM copy of the base files that the
        # session is created from (ramcopy: a faster session); made at the first rebuild
        self._ram_copy: ramcopy.RamCopy | None = None
        self._ram_copy_state: str | None = None  # what came of making it; None: not tried yet
        self._build_lock = threading.RLock()  # the shared buffer serves one rebuild at a time
        self._newest_version: dict[str, int] = {}  # task -> highest pack_version loaded
        self.active: LoadedPack | None = None

    # --- loading --------------------------------------------------------------------------
    def check_pack(self, path: str | os.PathLike):
        """Everything ``load_pack`` checks (signature, key, format, base_id, shapes), nothing built."""
        path = Path(path)
        pack = read_pack(read_pack_file(path), self.trusted_keys, name=path.name)
        self._check_against_base(path, pack)
        return pack

    def _check_against_base(self, path: Path, pack) -> None:
        self._check_base(path, pack)
        self._check_shapes(path, pack)
        self._check_preprocess(path, pack)
        # sizes and work relative to the base, from shapes alone: nothing allocated yet
        limits.check_rebuild_budget(path.name, pack.layers, self.base.conv_shapes)

    def load_pack(self, path: str | os.PathLike, data: bytes | None = None, *,
                  probe: bool = False) -> LoadedPack:
        """Verify, check and activate the pack at ``path``; raises a PackError subclass if refused.

        ``data``: the pack's bytes when the caller already read them (``path`` then only names it).
        ``probe``: also score one mid-grey image and refuse the pack, keeping nothing of it, unless
        the scores are finite. Every request checks its own scores anyway, so without the probe a
        pack whose numbers overflow is refused at its first image instead; a process that swaps
        packs under live traffic (``serve``) probes, so such a pack never replaces a working one.
        """
        path = Path(path)
        self.base.check_unchanged()  # the files onnxruntime reads are still the ones verified
        timings: dict[str, float] = {}
        with _Stopwatch(timings, "verify"):
            signature = None if data is not None else _file_signature(path)
            known = self._digests.get(str(path))
            if signature is not None and known is not None and known[0] == signature \
                    and known[1] in self._cache:
                # the very file hashed before, untouched since (see _file_signature): no re-read
                digest = known[1]
                cached = self._cache[digest]
                pack = cached.pack
            else:
                data = read_pack_file(path) if data is None else bytes(data)
                digest = hashlib.sha256(data).hexdigest()
                cached = self._cache.get(digest)
                # identical bytes were verified and checked against this base when first loaded
                pack = cached.pack if cached else read_pack(data, self.trusted_keys, name=path.name)
                if _settled(signature):
                    self._digests[str(path)] = (signature, digest)
        if cached is not None:
            self._check_version(path, pack)
            cached.path = path
            if probe and not cached.probed:
                try:
                    self.probe(cached)
                except NonFiniteError:
                    self._evict(digest)
                    raise
            self._cache.move_to_end(digest)
            cached.timings_ms.update(timings, rebuild=0.0, session=0.0, probe=0.0)
            cached.timings_ms.pop("preprocess", None)
            cached.timings_ms.pop("infer", None)
            log.debug("%s: task %s v%d from the session cache (verify %.1f ms)", path.name, pack.task,
                      pack.pack_version, timings["verify"])
            return self._activate(cached)

        self._check_against_base(path, pack)
        self._check_version(path, pack)
        with self._build_lock:
            backend = self._build(path, pack, digest, timings, probe)
        loaded = LoadedPack(pack=pack, backend=backend, path=path, sha256=digest, timings_ms=timings,
                            probed=probe)
        log.debug("%s: task %s v%d loaded (verify %.1f ms, rebuild %.1f ms, session %.1f ms)", path.name, pack.task,
                  pack.pack_version, timings["verify"], timings["rebuild"], timings["session"])
        self._cache[digest] = loaded
        while len(self._cache) > self.cache_size:
            self._evict(next(iter(self._cache)))
        return self._activate(loaded)

    def _build(self, path: Path, pack, digest: str, timings: dict, probe: bool):
        """Rebuild the pack's kernels and create its session (timings: rebuild, session, probe,
        which is 0 when not asked for); the kernels, and with ``probe`` the scores on a probe
        image, are checked finite before anything is kept."""
        # overflow in a hostile pack's rebuild is refused just below, not warned about
        with _Stopwatch(timings, "rebuild"), np.errstate(all="ignore"):
            finite: dict[str, bool] = {}
            kernels = self.rebuild_kernels(pack, finite)
            limits.check_finite_kernels(path.name, kernels, finite)
        in_copy = self._shared_layers if self._ram_copy is not None else set()
        overrides = {self.base.initializer_for(name): kernel for name, kernel in kernels.items()
                     if name not in in_copy}  # those are in the RAM copy's weights already
        for layer in pack.bn:
            for tensor_name, array in layer.tensors.items():
                overrides[self.base.initializer_for(layer.name, tensor_name)] = array
        graph_path = self._ram_copy.graph_path if self._ram_copy is not None else self.base.graph_path
        with _Stopwatch(timings, "session"):
            backend = make_backend(self.backend_name, graph_path, overrides, self.threads,
                                   provider=self._provider_for(pack, digest))
        timings["probe"] = 0.0
        if probe:
            with _Stopwatch(timings, "probe"):
                self._check_scores(path, pack, backend)
        return backend

    def rebuild_kernels(self, pack, finite: dict[str, bool] | None = None) -> dict[str, np.ndarray]:
        """The checked ``pack``'s adapted kernels, as a load builds them: kernels onnxruntime
        fuses at load go into the RAM copy of base.weights or else the shared buffer (so they are
        valid until the next rebuild; a session never reads them after its creation), the rest
        into an array of their own. ``finite``: as for ``km.rebuild_kernels``."""
        with self._build_lock:
            return self._rebuild_kernels(pack, finite)

    def _rebuild_kernels(self, pack, finite: dict[str, bool] | None = None) -> dict[str, np.ndarray]:
        base_kernels = self.base.conv_kernels()
        shared = [layer for layer in pack.layers if layer.name in self._shared_layers]
        kept = [layer for layer in pack.layers if layer.name not in self._shared_layers]
        if self._shared_layers and self._ram_copy_state is None:
            self._ram_copy, self._ram_copy_state = ramcopy.create(self.base)
            log.debug("fused kernels: %s", self._ram_copy_state)
        if self._ram_copy is not None:
            buffer, offsets = self._ram_copy.place([layer.name for layer in shared])
        else:
            if self._shared_buffer.size < km.rebuild_size(base_kernels, shared):
                # sized once for every shared layer of the base, so it is never reallocated
                size = sum(int(np.prod(self.base.conv_shapes[name])) for name in self._shared_layers)
                self._shared_buffer = np.empty(size, dtype=np.float32)
            buffer, offsets = self._shared_buffer, None
        kernels = km.rebuild_kernels(base_kernels, shared, self.threads, buffer, finite, offsets)
        kernels.update(km.rebuild_kernels(base_kernels, kept, self.threads, finite=finite))
        return kernels

    def _provider_for(self, pack, digest: str):
        if self.backend_name != "ort":
            return None
        # TensorRT engines depend on the kernels: one cache folder per (pack, base)
        return self.provider.for_key(f"{digest[:16]}-{str(self.base.base_id)[:16]}")

    def _evict(self, digest: str) -> None:
        if self._cache.pop(digest) is self.active:
            self.active = None
        self._digests = {p: known for p, known in self._digests.items() if known[1] != digest}
        release_memory()

    def clear_cache(self) -> None:
        """Drop every cached session (the active one too) and hand the memory back to the OS."""
        self._cache.clear()
        self._digests.clear()
        self.active = None
        release_memory()

    @property
    def fused_kernels_via(self) -> str:
        """How kernels onnxruntime fuses at load reach the session: the RAM copy of the base
        files (``ramcopy``) or ``add_external_initializers``, and why not the copy."""
        if self._ram_copy is not None:
            return f"RAM copy of the base files ({self._ram_copy.folder.parent})"
        if not self._shared_layers:
            return "add_external_initializers (no kernel is fused at load with this provider)"
        return f"add_external_initializers ({self._ram_copy_state or 'no pack rebuilt yet'})"

    @property
    def cached(self) -> list[str]:
        """sha256 of the cached packs, least recently used first."""
        return list(self._cache)

    def _activate(self, loaded: LoadedPack) -> LoadedPack:
        task, version = loaded.pack.task, int(loaded.pack.pack_version)
        if self.rollback is not None:
            self.rollback.record(loaded.pack)
        self._newest_version[task] = max(version, self._newest_version.get(task, version))
        self.active = loaded
        return loaded

    def _check_version(self, path: Path, pack) -> None:
        newest = self._newest_version.get(pack.task)
        if newest is not None and int(pack.pack_version) < newest:
            raise DowngradeError(
                f"{path.name}: pack version {pack.pack_version} of task {pack.task!r} is older than "
                f"version {newest} already loaded"
            )
        if self.rollback is not None:
            self.rollback.check(pack, path.name)

    def _check_base(self, path: Path, pack) -> None:
        if pack.base_id != self.base.base_id:
            raise BaseMismatchError(
                f"{path.name}: pack was made for base {_short(pack.base_id)}, "
                f"this base is {_short(self.base.base_id)} ({self.base.base_dir})"
            )

    def _check_preprocess(self, path: Path, pack) -> None:
        if pack.preprocess:
            try:
                check_spec(pack.preprocess)
            except ValueError as exc:
                raise MalformedPackError(f"{path.name}: {exc}") from None
            limits.check_input_size(path.name, pack.preprocess, self.base.input_hw)

    def probe(self, loaded: LoadedPack) -> None:
        """Raise NonFiniteError unless ``loaded`` scores one mid-grey image finitely (what
        ``load_pack(probe=True)`` checks before it keeps a pack)."""
        self._check_scores(loaded.path, loaded.pack, loaded.backend)
        loaded.probed = True

    def _check_scores(self, path: Path, pack, backend) -> None:
        """The new pack's scores on one mid-grey image must be finite before it is activated."""
        head_scores(pack, backend.features(neutral_batch(pack.preprocess or self.base.preprocess)), path.name)

    def _check_shapes(self, path: Path, pack) -> None:
        """Every layer, head and BN tensor against the manifest, before anything is built."""
        def refuse(message: str):
            raise ShapeMismatchError(f"{path.name}: {message}")

        conv_shapes = self.base.conv_shapes
        seen = set()
        for layer in pack.layers:
            name = layer.name
            if name not in conv_shapes:
                refuse(f"layer {name!r} is not a conv layer of this base")
            if name in seen:
                refuse(f"layer {name!r} appears twice")
            seen.add(name)
            weight_shape = conv_shapes[name]
            tensors = layer.tensors
            # kind, activation and scale were validated by read_pack; shapes need the base
            if layer.adapter == "km":
                kind = layer.kind
                if set(tensors) != set(km.MODULATOR_TENSORS) or len(_shape(tensors["w1"])) != 2:
                    refuse(f"layer {name!r} needs tensors {', '.join(km.MODULATOR_TENSORS)}")
                d = km.vector_length(kind, weight_shape)
                expected = km.modulator_shapes(d, _shape(tensors["w1"])[1])
            elif layer.adapter == "lora":
                if set(tensors) != set(km.LORA_TENSORS) or len(_shape(tensors["a"])) != 2:
                    refuse(f"layer {name!r} needs LoRA tensors a, b")
                rank = _shape(tensors["a"])[0]
                fan_in = int(np.prod(weight_shape[1:]))
                expected = {"a": (rank, fan_in), "b": (weight_shape[0], rank)}
            else:
                refuse(f"layer {name!r} has unknown adapter {layer.adapter!r}")
            for tensor_name, shape in expected.items():
                if _shape(tensors[tensor_name]) != tuple(shape):
                    refuse(
                        f"layer {name!r} tensor {tensor_name} has shape "
                        f"{list(_shape(tensors[tensor_name]))}, the base needs {list(shape)}"
                    )

        n_labels, feature_size = len(pack.labels), self.base.feature_size
        for tensor_name, shape in (("weight", (n_labels, feature_size)), ("bias", (n_labels,))):
            if _shape(pack.head[tensor_name]) != shape:
                refuse(
                    f"head {tensor_name} has shape {list(_shape(pack.head[tensor_name]))}, "
                    f"expected {list(shape)} ({n_labels} labels, {feature_size} features)"
                )

        bn_shapes = self.base.bn_shapes
        for layer in pack.bn:
            name = layer.name
            if name not in bn_shapes:
                refuse(f"BN layer {name!r} is not a BatchNorm layer of this base")
            for tensor_name, array in layer.tensors.items():
                if tensor_name not in BN_TENSORS or tensor_name not in bn_shapes[name]:
                    refuse(f"BN layer {name!r} has unknown tensor {tensor_name!r}")
                if _shape(array) != bn_shapes[name][tensor_name]:
                    refuse(
                        f"BN layer {name!r} tensor {tensor_name} has shape {list(_shape(array))}, "
                        f"the base needs {list(bn_shapes[name][tensor_name])}"
                    )

    # --- inference ------------------------------------------------------------------------
    def _require_pack(self) -> LoadedPack:
        if self.active is None:
            raise RuntimeError("no task pack loaded; call load_pack() first")
        return self.active

    @property
    def preprocess_spec(self) -> dict:
        """The active pack's preprocessing (what its head was validated with), else the base's."""
        return self.preprocess_spec_for(self.active)

    def preprocess_spec_for(self, loaded: LoadedPack | None) -> dict:
        """``loaded``'s preprocessing, else the base's."""
        if loaded is not None and loaded.pack.preprocess:
            return loaded.pack.preprocess
        return self.base.preprocess

    def features(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) preprocessed images -> (N, F) pooled features of the adapted model."""
        return self._require_pack().backend.features(batch)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """(N, n_labels) float32: the pack's head on the features."""
        return self._require_pack().logits(self.features(batch))

    def _load_batch(self, paths: list, timings: dict) -> tuple[list[int], np.ndarray, dict]:
        """Decode and preprocess; returns (indices of good images, batch, {index: error line})."""
        good, arrays, errors = [], [], {}
        spec = self.preprocess_spec
        with _Stopwatch(timings, "preprocess", accumulate=True):
            for index, path in enumerate(paths):
                try:
                    arrays.append(preprocess(load_image(path), spec))
                    good.append(index)
                except ImageError as exc:
                    errors[index] = str(exc)
        crop = int(spec["crop"])
        batch = np.stack(arrays) if arrays else np.zeros((0, 3, crop, crop), np.float32)
        return good, batch, errors

    def _reset_request_timings(self, loaded: LoadedPack) -> dict:
        loaded.timings_ms["preprocess"] = 0.0
        loaded.timings_ms["infer"] = 0.0
        return loaded.timings_ms

    def predict(self, paths: Iterable[str | os.PathLike], top_k: int = 5,
                batch_size: int = 32) -> list[dict]:
        """Top-k labels per image, in input order; an unreadable image gets ``{"image", "error"}``
        and the others are still predicted."""
        loaded = self._require_pack()
        labels = loaded.labels
        paths = list(paths)
        timings = self._reset_request_timings(loaded)
        results: list[dict] = []
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            good, batch, errors = self._load_batch(chunk, timings)
            ranked = []
            if len(good):
                with _Stopwatch(timings, "infer", accumulate=True):
                    ranked = top_predictions(self.logits(batch), labels, top_k)
            rows = dict(zip(good, ranked))
            for index, path in enumerate(chunk):
                if index in errors:
                    results.append({"image": str(path), "error": errors[index]})
                else:
                    results.append({"image": str(path), "top": rows[index]})
        return results

    def evaluate(self, folder: str | os.PathLike, batch_size: int = 64,
                 progress: bool = False) -> dict:
        """Top-1 accuracy of the active pack on an ImageFolder whose class names are pack labels.

        Unreadable images are skipped and listed under ``errors`` (they do not count).
        """
        from tqdm import tqdm  # only needed here; keeps `import device_runtime.runtime` light

        loaded = self._require_pack()
        classes, samples = list_image_folder(folder)
        label_index = {label: i for i, label in enumerate(loaded.labels)}
        unknown = [name for name in classes if name not in label_index]
        if unknown:
            raise DataError(
                f"{folder}: class folders {', '.join(unknown)} are not labels of task "
                f"{loaded.pack.task!r} ({', '.join(loaded.labels)})"
            )
        timings = self._reset_request_timings(loaded)
        correct = np.zeros(len(classes), dtype=np.int64)
        counts = np.zeros(len(classes), dtype=np.int64)
        errors = []
        with tqdm(total=len(samples), disable=not progress, unit="img", desc="eval") as bar:
            for start in range(0, len(samples), batch_size):
                chunk = samples[start:start + batch_size]
                good, batch, chunk_errors = self._load_batch([p for p, _ in chunk], timings)
                errors.extend({"image": str(chunk[i][0]), "error": e} for i, e in chunk_errors.items())
                if good:
                    with _Stopwatch(timings, "infer", accumulate=True):
                        predicted = np.argmax(self.logits(batch), axis=1)
                    for row, index in zip(predicted, good):
                        class_index = chunk[index][1]
                        counts[class_index] += 1
                        correct[class_index] += int(row == label_index[classes[class_index]])
                bar.update(len(chunk))
        n_images = int(counts.sum())
        return {
            "accuracy": float(correct.sum() / n_images) if n_images else 0.0,
            "n_images": n_images,
            "per_class": {
                name: {"accuracy": float(correct[i] / counts[i]) if counts[i] else 0.0,
                       "n": int(counts[i])}
                for i, name in enumerate(classes)
            },
            "errors": errors,
        }
