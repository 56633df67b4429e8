"""Backends that run the base graph with some initializers replaced (the rebuilt kernels).

``OrtBackend`` is the production path. Overrides go through
``SessionOptions.add_external_initializers``: they replace initializers stored as external data
*before* graph optimisation, so Conv+BN fusion at ORT_ENABLE_ALL uses the task's kernels.
(``add_initializer`` is silently ignored for conv weights at that level - measured.) Reading a
kernel from the graph's weights file is faster still at session creation, which is why the Runtime
may pass a graph in its RAM copy of the base files (``ramcopy``) with the fused kernels already in it.
``ReferenceBackend`` runs the same graph with ``onnx.reference`` as a slow pure-Python check.

Execution providers: ``cpu`` (the default and the reference), ``cuda``, ``tensorrt`` (with an
engine cache per task pack, keyed by the pack's sha256 and the base_id, and an FP16 option) and
``auto`` (the best one this onnxruntime build offers). A GPU provider that is asked for by name and
cannot run is refused with :class:`ProviderError`, never silently replaced by the CPU.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from .errors import ProviderError

__all__ = ["OrtBackend", "ReferenceBackend", "make_backend", "BACKENDS", "PROVIDERS",
           "resolve_provider", "ProviderConfig"]

# km-edge's provider names -> onnxruntime's, best first (``auto`` takes the first available)
ORT_PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
PROVIDERS = ("cpu", "cuda", "tensorrt", "auto")
DEFAULT_PROVIDER = "cpu"


def resolve_provider(provider: str | None) -> str:
    """``cpu``/``cuda``/``tensorrt`` for ``provider`` (``auto``: the best this build offers)."""
    provider = (provider or DEFAULT_PROVIDER).lower()
    if provider not in PROVIDERS:
        raise ProviderError(
            f"execution provider must be one of {', '.join(PROVIDERS)}, got {provider!r}"
        )
    available = ort.get_available_providers()
    if provider == "auto":
        return next(name for name, ort_name in ORT_PROVIDERS.items()
                    if ort_name in available or name == "cpu")
    if ORT_PROVIDERS[provider] not in available:
        raise ProviderError(
            f"execution provider {provider!r} is not available in this onnxruntime "
            f"(it offers {', '.join(available)}); install onnxruntime-gpu with CUDA"
            f"{' and TensorRT' if provider == 'tensorrt' else ''} on a GPU device, "
            f"or use --provider cpu"
        )
    return provider


class ProviderConfig:
    """Which execution provider a session uses, with its options.

    ``trt_cache_dir`` holds TensorRT engines; ``cache_key`` (set per task pack) names the
    sub-folder, so switching back to a task reuses its engine instead of building it again.
    """

    def __init__(self, provider: str | None = None, trt_fp16: bool = False,
                 trt_cache_dir: str | os.PathLike | None = None, cache_key: str | None = None):
        self.name = resolve_provider(provider)
        self.trt_fp16 = bool(trt_fp16)
        self.trt_cache_dir = trt_cache_dir
        self.cache_key = cache_key

    def for_key(self, cache_key: str) -> "ProviderConfig":
        """The same provider with TensorRT engines cached under ``cache_key``."""
        keyed = copy.copy(self)
        keyed.cache_key = cache_key
        return keyed

    def ort_providers(self) -> list:
        """The ``providers`` argument of ``ort.InferenceSession``: this provider, then the CPU."""
        chain: list = []
        if self.name == "tensorrt":
            options = {"trt_fp16_enable": self.trt_fp16}
            if self.trt_cache_dir is not None:
                folder = os.path.join(os.fspath(self.trt_cache_dir), self.cache_key or "base")
                os.makedirs(folder, exist_ok=True)
                options.update(trt_engine_cache_enable=True, trt_engine_cache_path=folder,
                               trt_timing_cache_enable=True, trt_timing_cache_path=folder)
            chain.append((ORT_PROVIDERS["tensorrt"], options))
        if self.name in ("tensorrt", "cuda"):
            chain.append(ORT_PROVIDERS["cuda"])
        chain.append(ORT_PROVIDERS["cpu"])
        return chain

    def check_session(self, session) -> None:
        """Refuse a session where onnxruntime fell back from the GPU provider to the CPU."""
        wanted = ORT_PROVIDERS[self.name]
        used = session.get_providers()
        if wanted not in used:
            raise ProviderError(
                f"execution provider {self.name!r} could not start here (onnxruntime is using "
                f"{', '.join(used)}); check the GPU driver and CUDA/TensorRT libraries, "
                f"or use --provider cpu"
            )


def _as_float32(overrides: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(array, dtype=np.float32) for name, array in overrides.items()}


class OrtBackend:
    """onnxruntime session on the base graph with ``overrides`` {initializer name: float32 array}."""

    name = "ort"

    def __init__(self, graph_path: str | os.PathLike, overrides: Mapping[str, np.ndarray],
                 threads: int | None = None, provider: ProviderConfig | str | None = None):
        if not isinstance(provider, ProviderConfig):
            provider = ProviderConfig(provider)
        self.provider = provider
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        # ORT may use these buffers in place: they must outlive the session, so keep them on self
        # (the Runtime passes kernels ORT copies at load in a reused buffer; see Runtime)
        self._arrays = _as_float32(overrides)
        self._ort_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._arrays.values()]
        if self._arrays:
            options.add_external_initializers(list(self._arrays), self._ort_values)
        self._options = options
        self.session = ort.InferenceSession(
            str(graph_path), sess_options=options, providers=provider.ort_providers(),
        )
        provider.check_session(self.session)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def features(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 -> (N, F) float32."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: batch})[0]


class ReferenceBackend:
    """The same graph and overrides evaluated by ``onnx.reference`` (slow; for checking ORT)."""

    name = "reference"

    def __init__(self, graph_path: str | os.PathLike, overrides: Mapping[str, np.ndarray],
                 threads: int | None = None):
        graph_path = str(graph_path)
        model = onnx.load(graph_path, load_external_data=True)
        arrays = _as_float32(overrides)
        replaced = set()
        for tensor in model.graph.initializer:
            if tensor.name in arrays:
                tensor.CopyFrom(numpy_helper.from_array(arrays[tensor.name], tensor.name))
                replaced.add(tensor.name)
        unknown = sorted(set(arrays) - replaced)
        if unknown:
            raise ValueError(f"overrides name initializers the graph does not have: {unknown}")
        initializer_names = {tensor.name for tensor in model.graph.initializer}
        self.input_name = next(i.name for i in model.graph.input if i.name not in initializer_names)
        self.output_name = model.graph.output[0].name
        self.evaluator = ReferenceEvaluator(model)

    def features(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        output = self.evaluator.run([self.output_name], {self.input_name: batch})[0]
        return np.asarray(output, dtype=np.float32)


BACKENDS = {"ort": OrtBackend, "reference": ReferenceBackend}


def make_backend(name: str, graph_path: str | os.PathLike, overrides: Mapping[str, np.ndarray],
                 threads: int | None = None, provider: ProviderConfig | str | None = None):
    """Backend ``name`` ("ort" or "reference") on ``graph_path`` with ``overrides``; ``provider``
    (ort only) is an execution provider name or a :class:`ProviderConfig`."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {name!r}")
    if name == "reference":
        if provider is not None and getattr(provider, "name", provider) not in ("cpu", "auto"):
            raise ProviderError("the reference backend runs on the CPU only; use --backend ort")
        return ReferenceBackend(graph_path, overrides, threads=threads)
    return OrtBackend(graph_path, overrides, threads=threads, provider=provider)


def fused_at_load(graph_path: str | os.PathLike) -> set[str]:
    """Conv weight initializers that onnxruntime folds into a new tensor while it builds a session.

    A Conv whose only consumer is a BatchNormalization (with constant parameters) is fused by
    ORT's level-1 ConvBNFusion on every execution provider: the session computes its own fused
    weight and drops the original, so the buffer handed in through ``add_external_initializers``
    is not read after the session exists. The Runtime rebuilds those kernels into one reused
    buffer instead of keeping a copy per cached pack; every other override stays alive with its
    session. (Checked in tests/test_fast_rebuild.py by overwriting the buffer after loading.)
    """
    model = onnx.load(str(graph_path), load_external_data=False)
    graph = model.graph
    constants = {tensor.name for tensor in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {value.name for value in graph.output}
    fused = set()
    for node in graph.node:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        weight, output = node.input[1], node.output[0]
        users = consumers.get(output, [])
        if (weight not in constants or len(consumers.get(weight, [])) != 1 or len(users) != 1
                or output in graph_outputs or (len(node.input) > 2 and node.input[2] not in constants)):
            continue
        bn = users[0]
        if (bn.op_type == "BatchNormalization" and bn.domain in ("", "ai.onnx")
                and all(name in constants for name in bn.input[1:5])
                and all(not name for name in bn.output[1:])):
            fused.add(weight)
    return fused
