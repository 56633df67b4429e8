"""Backends that run the base graph with some initializers replaced (the rebuilt kernels).

``OrtBackend`` is the production path. Overrides go through
``SessionOptions.add_external_initializers``: they replace initializers stored as external data
*before* graph optimisation, so Conv+BN fusion at ORT_ENABLE_ALL uses the task's kernels.
(``add_initializer`` is silently ignored for conv weights at that level - measured.)
``ReferenceBackend`` runs the same graph with ``onnx.reference`` as a slow pure-Python check.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

__all__ = ["OrtBackend", "ReferenceBackend", "make_backend", "BACKENDS"]


def _as_float32(overrides: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(array, dtype=np.float32) for name, array in overrides.items()}


class OrtBackend:
    """onnxruntime session on the base graph with ``overrides`` {initializer name: float32 array}."""

    name = "ort"

    def __init__(self, graph_path: str | os.PathLike, overrides: Mapping[str, np.ndarray],
                 threads: int | None = None, providers: list[str] | None = None):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        # ORT uses these buffers in place: they must outlive the session, so keep them on self
        self._arrays = _as_float32(overrides)
        self._ort_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._arrays.values()]
        if self._arrays:
            options.add_external_initializers(list(self._arrays), self._ort_values)
        self._options = options
        self.session = ort.InferenceSession(
            str(graph_path), sess_options=options,
            providers=providers or ["CPUExecutionProvider"],
        )
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
                 threads: int | None = None):
    """Backend ``name`` ("ort" or "reference") on ``graph_path`` with ``overrides``."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {name!r}")
    return BACKENDS[name](graph_path, overrides, threads=threads)
