"""Device-side profile of one task pack: what ``km-edge bench`` prints.

Everything is measured in one process as ratios against a reference taken in the same run, so the
numbers compare across machines: a pack load against a plain onnxruntime session of the same base
(same options and provider), the kernel rebuild against a numpy read + write of the same conv bytes
(the memory floor), and inference with the pack against the plain base in paired, alternating runs.
Pin the process (``taskset -c 0``) and pass ``threads=1`` for stable figures.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from . import native
from .backends import make_backend
from .runtime import release_memory

__all__ = ["profile_pack", "plain_session", "rss_bytes", "rotation_rss"]


def rss_bytes() -> dict[str, int]:
    """Resident set size now and its peak, in bytes (Linux /proc; elsewhere the peak only)."""
    status = Path("/proc/self/status")
    if status.exists():
        values = {}
        for line in status.read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
        return {"rss": values.get("VmRSS", 0), "peak": values.get("VmHWM", 0)}
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024
    return {"rss": peak, "peak": peak}


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"median": round(statistics.median(ordered), 3), "min": round(ordered[0], 3),
            "p90": round(p90, 3), "n": len(ordered)}


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _cpu_ms(start: float) -> float:
    return (time.process_time() - start) * 1000.0


def _ratio(numerator: dict, denominator: dict) -> dict[str, float]:
    return {key: round(numerator[key] / denominator[key], 3) if denominator[key] else None
            for key in ("median", "min")}


def plain_session(runtime):
    """A session of ``runtime``'s base graph with no pack, with the runtime's backend, threads and
    provider: the reference a pack load is measured against."""
    return make_backend(runtime.backend_name, runtime.base.graph_path, {}, runtime.threads,
                        provider=runtime.provider.for_key("base") if runtime.backend_name == "ort" else None)


def profile_pack(runtime, pack_path: str | os.PathLike, batch: int = 8, repeats: int = 10,
                 infer_runs: int = 20) -> dict:
    """Load breakdown, cache hit, plain-session and memory-floor references, paired inference.

    ``runtime`` is a :class:`device_runtime.runtime.Runtime`; its cache is cleared between cold
    loads. Returns a JSON-ready dict; every timing is in milliseconds.
    """
    pack_path = Path(pack_path)
    repeats, infer_runs, batch = max(1, int(repeats)), max(2, int(infer_runs)), max(1, int(batch))
    base = runtime.base

    # warm-up: page cache, first-call costs of onnxruntime and numpy
    runtime.clear_cache()
    loaded = runtime.load_pack(pack_path)
    adapted = [layer.name for layer in loaded.pack.layers]
    kernels = base.conv_kernels()
    conv_bytes = sum(kernels[name].nbytes for name in adapted)
    plain_session(runtime)

    # the memory floor: read the base kernels and write them where the rebuild writes them (the
    # runtime's reused buffer; a fresh array would add page faults the rebuild does not pay, that
    # figure is kept as floor_fresh). Sessions never read that buffer after their creation.
    destination = runtime.rebuild_kernels(loaded.pack)

    parts: dict[str, list[float]] = {k: [] for k in ("verify", "rebuild", "session", "probe", "total",
                                                     "total_with_probe")}
    plain, floor, floor_fresh, cache_hit = [], [], [], []
    # CPU time (process_time) of the same steps: on a shared machine it is what the work costs,
    # whatever other processes do to wall time
    cpu: dict[str, list[float]] = {k: [] for k in ("total", "plain", "rebuild", "floor")}
    for _ in range(repeats):
        # both the plain session and the load start from a trimmed heap (clear_cache trims too),
        # so neither gets pages the other just freed
        release_memory()
        start, cpu_start = time.perf_counter(), time.process_time()
        plain_backend = plain_session(runtime)
        plain.append(_ms(start))
        cpu["plain"].append(_cpu_ms(cpu_start))
        del plain_backend
        start = time.perf_counter()
        copies = [np.array(kernels[name], copy=True) for name in adapted]
        floor_fresh.append(_ms(start))
        del copies
        start, cpu_start = time.perf_counter(), time.process_time()
        for name in adapted:
            np.copyto(destination[name], kernels[name])
        floor.append(_ms(start))
        cpu["floor"].append(_cpu_ms(cpu_start))
        runtime.clear_cache()
        cpu_start = time.process_time()
        runtime.rebuild_kernels(loaded.pack)  # as a load does (sessions no longer read the shared buffer)
        cpu["rebuild"].append(_cpu_ms(cpu_start))
        start, cpu_start = time.perf_counter(), time.process_time()
        loaded = runtime.load_pack(pack_path)
        parts["total"].append(_ms(start))
        cpu["total"].append(_cpu_ms(cpu_start))
        for key in ("verify", "rebuild", "session"):
            parts[key].append(loaded.timings_ms.get(key, 0.0))
        # what load_pack(probe=True) adds (serve probes every pack it swaps in)
        start = time.perf_counter()
        runtime.probe(loaded)
        parts["probe"].append(_ms(start))
        parts["total_with_probe"].append(parts["total"][-1] + parts["probe"][-1])
        start = time.perf_counter()
        runtime.load_pack(pack_path)
        cache_hit.append(_ms(start))
    cpu_stats = {key: _stats(values) for key, values in cpu.items()}

    load = {key: _stats(values) for key, values in parts.items()}
    load["cache_hit"] = _stats(cache_hit)
    plain_stats, floor_stats, fresh_stats = _stats(plain), _stats(floor), _stats(floor_fresh)
    rss_after_load = rss_bytes()

    pack_backend = loaded.backend
    plain_backend = plain_session(runtime)
    crop = int(runtime.preprocess_spec["crop"])
    rng = np.random.default_rng(0)
    inference = {}
    for n in sorted({1, batch}):
        images = rng.normal(size=(n, 3, crop, crop)).astype(np.float32)
        for _ in range(3):
            pack_backend.features(images)
            plain_backend.features(images)
        pack_ms, plain_ms = [], []
        for run in range(infer_runs):
            order = ((pack_backend, pack_ms), (plain_backend, plain_ms))
            for backend, sink in (order if run % 2 == 0 else order[::-1]):
                start = time.perf_counter()
                backend.features(images)
                sink.append(_ms(start))
        ratios = [a / b for a, b in zip(pack_ms, plain_ms)]
        inference[f"batch{n}"] = {
            "pack": _stats(pack_ms), "plain": _stats(plain_ms),
            "ratio_median_paired": round(statistics.median(ratios), 3),
        }
    del plain_backend

    return {
        "pack": str(pack_path),
        "task": loaded.pack.task,
        "storage_dtype": getattr(loaded.pack, "storage_dtype", None),
        "base_id": base.base_id,
        "arch": base.manifest.get("arch"),
        "backend": runtime.backend_name,
        "provider": runtime.provider.name,
        "trt_fp16": runtime.provider.trt_fp16 if runtime.provider.name == "tensorrt" else None,
        "threads": runtime.threads,
        "rebuild_engine": native.engine(),  # the compiled kernel, or numpy where the install has none
        "fused_kernels_via": runtime.fused_kernels_via,  # the RAM copy of the base files, or in memory
        "repeats": repeats,
        "conv_bytes": int(conv_bytes),
        "load_ms": load,
        "plain_session_ms": plain_stats,
        "load_over_plain": _ratio(load["total"], plain_stats),
        "load_with_probe_over_plain": _ratio(load["total_with_probe"], plain_stats),
        "rebuild_floor_ms": floor_stats,
        "rebuild_floor_fresh_ms": fresh_stats,
        "rebuild_over_floor": _ratio(load["rebuild"], floor_stats),
        "rebuild_over_floor_fresh": _ratio(load["rebuild"], fresh_stats),
        "cpu_ms": cpu_stats,
        "cpu_load_over_plain": _ratio(cpu_stats["total"], cpu_stats["plain"]),
        "cpu_rebuild_over_floor": _ratio(cpu_stats["rebuild"], cpu_stats["floor"]),
        "infer_ms": inference,
        "rss_mib": {key: round(value / 2**20, 1) for key, value in rss_after_load.items()},
    }


def rotation_rss(runtime, pack_paths: list, loads: int = 40) -> dict:
    """RSS while loading ``pack_paths`` round-robin ``loads`` times into ``runtime``'s cache.

    Reports RSS after the first load, after the first ``cache_size`` loads (cache full) and after
    all loads, and the memory a cached pack costs as a multiple of the base's conv bytes.
    """
    n = runtime.cache_size
    if len(pack_paths) <= n:
        raise ValueError(f"rotation needs more packs ({len(pack_paths)}) than cache_size ({n})")
    runtime.clear_cache()
    trace = []
    for index in range(loads):
        runtime.load_pack(pack_paths[index % len(pack_paths)])
        trace.append(rss_bytes()["rss"])
    conv_bytes = sum(k.nbytes for k in runtime.base.conv_kernels().values())
    per_pack = (trace[n - 1] - trace[0]) / max(1, n - 1)
    return {
        "cache_size": n,
        "packs": len(pack_paths),
        "loads": loads,
        "rss_mib_after_first": round(trace[0] / 2**20, 1),
        "rss_mib_after_cache_full": round(trace[n - 1] / 2**20, 1),
        "rss_mib_after_all": round(trace[-1] / 2**20, 1),
        "rss_mib_max": round(max(trace) / 2**20, 1),
        "growth_after_full": round(trace[-1] / trace[n - 1], 3),
        "per_cached_pack_mib": round(per_pack / 2**20, 1),
        "per_cached_pack_over_conv_bytes": round(per_pack / conv_bytes, 2),
        "trace_mib": [round(v / 2**20, 1) for v in trace],
    }
