#!/usr/bin/env python
"""Device benchmark: `km-edge bench` over full-size bases, plus cache-bounded RSS and the ORT-side
rebuild alternative. Writes results/device.json and results/device.md.

Each base is built with random weights (speed does not depend on the values) at 224 px, exported
through km-edge's export path, and gets default-KM packs (fp32 and fp16) whose modulators are all
non-zero. Every measurement runs in a child process pinned to one core (``taskset``) with one
onnxruntime thread; figures are medians and minimums, and every ratio is taken inside one run.

    python benchmarks/device.py                          # every registry base + EfficientNet-Lite0
    python benchmarks/device.py --bases mobilenet_v2 --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from device_runtime.native import ENV as NATIVE_ENV  # noqa: E402  (after the path: runs from a checkout)
from device_runtime.ramcopy import ENV as RAM_COPY_ENV  # noqa: E402

DEFAULT_BASES = ["mobilenet_v2", "mobilenet_v3_small", "resnet18", "efficientnet_b0", "tf_efficientnet_lite0"]
ROTATION_PACKS = 6   # distinct packs loaded round-robin ...
ROTATION_CACHE = 4   # ... into a cache this size
ROTATION_LOADS = 40
KM_EDGE = str(Path(sys.executable).with_name("km-edge"))
RESULTS = ROOT / "benchmarks" / "results"


# --- preparing bases and packs (host side, torch) -----------------------------------------------
def build_benchmark_base(arch: str):
    """A random-weight base at 224 px: from the registry, or timm's tf_efficientnet_lite0 built
    directly when the registry does not (yet) have it."""
    import torch

    from km_edge import models

    torch.manual_seed(0)
    if arch in models.ARCHS:
        return models.build_base(arch, None)
    if arch == "tf_efficientnet_lite0":
        import timm
        from torch import nn

        net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        features = nn.Sequential(net.conv_stem, net.bn1, net.blocks, net.conv_head, net.bn2)
        return models.BaseModel(arch, "none", models.PooledBackbone(features).eval(), net.num_features, 224, 256,
                                models.IMAGENET_MEAN, models.IMAGENET_STD)
    raise SystemExit(f"unknown base {arch!r}")


def prepare(arch: str, workdir: Path, key_path: Path) -> dict:
    """Export the base and write the bench packs (fp32, fp16, rotation packs); returns paths."""
    import numpy as np
    import torch
    from torch import nn

    from device_runtime.keys import load_private_key
    from device_runtime.km import ModulatorSpec
    from device_runtime.pack import build_pack, write_pack
    from km_edge.adapters import attach_km
    from km_edge.export import export_base

    folder = workdir / arch
    info = {"base": str(folder / "base"), "fp32": str(folder / "bench-fp32.kmp"),
            "fp16": str(folder / "bench-fp16.kmp"),
            "rotation": [str(folder / f"rotate-{i}.kmp") for i in range(ROTATION_PACKS)]}
    if all(Path(p).exists() for p in [info["fp32"], info["fp16"], *info["rotation"]]):
        return info
    base = build_benchmark_base(arch)
    manifest = export_base(base, folder / "base")
    spec = ModulatorSpec()
    modulators = attach_km(base.backbone, spec)
    bns = [(n, m) for n, m in base.backbone.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    key = load_private_key(key_path)

    def body(seed: int) -> dict:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for modulator in modulators.values():
                for name in ("w1", "b1", "w2", "b2"):
                    tensor = getattr(modulator, name)
                    tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
        rng = np.random.default_rng(seed)
        return {
            "task": "bench", "pack_version": 1, "base_id": manifest["base_id"],
            "labels": [f"class{i}" for i in range(10)], "preprocess": manifest["preprocess"], "method": "km",
            "modulator": spec.to_dict(),
            "layers": [m.pack_entry(n) for n, m in modulators.items()],
            "head": {"weight": rng.normal(0, 0.01, (10, base.feature_size)).astype(np.float32),
                     "bias": np.zeros(10, np.float32)},
            "bn": [{"name": n, "tensors": {t: getattr(m, t).detach().numpy() * (1 + 0.01 * seed)
                                           for t in ("weight", "bias", "running_mean", "running_var")}}
                   for n, m in bns],
            "metrics": {}, "trainer": {},
        }

    write_pack(info["fp32"], build_pack(body(1), key, storage_dtype="float32"))
    write_pack(info["fp16"], build_pack(body(1), key, storage_dtype="float16"))
    for i, path in enumerate(info["rotation"]):
        write_pack(path, build_pack(body(100 + i), key, storage_dtype="float32"))
    return info


# --- children (device side, no torch) ----------------------------------------------------------
def _runtime(base: str, pubkey: str, cache_size: int = 4):
    from device_runtime.keys import load_trusted_keys
    from device_runtime.runtime import Runtime

    return Runtime(base, load_trusted_keys([pubkey]), threads=1, cache_size=cache_size)


def child_rotation(base: str, pubkey: str, packs: list[str]) -> dict:
    from device_runtime.bench import rotation_rss

    return rotation_rss(_runtime(base, pubkey, ROTATION_CACHE), packs, loads=ROTATION_LOADS)


def child_handover(base: str, pubkey: str, pack_path: str, repeats: int) -> dict:
    """Cold loads of one pack by two runtimes in one process, alternating, each beside a plain
    session: one creates sessions from its RAM copy of the base files, the other (``RAM_COPY_ENV``
    off) hands the fused kernels over with add_external_initializers. Paired, so a busy moment of a
    shared machine falls on both."""
    from device_runtime.bench import plain_session
    from device_runtime.runtime import release_memory

    runtimes = {}
    for mode, setting in (("ram_copy", os.environ.get(RAM_COPY_ENV)), ("in_memory", "off")):
        if setting is None:
            os.environ.pop(RAM_COPY_ENV, None)
        else:
            os.environ[RAM_COPY_ENV] = setting
        runtimes[mode] = _runtime(base, pubkey)
        runtimes[mode].load_pack(pack_path)  # the copy is made at the first load: not timed
    times = {key: [] for key in ("plain", "ram_copy", "in_memory", "ram_copy_session", "in_memory_session")}
    for run in range(repeats):
        for mode in (("ram_copy", "in_memory") if run % 2 == 0 else ("in_memory", "ram_copy")):
            runtime = runtimes[mode]
            release_memory()
            start = time.perf_counter()
            plain = plain_session(runtime)
            times["plain"].append((time.perf_counter() - start) * 1000.0)
            del plain
            runtime.clear_cache()
            start = time.perf_counter()
            loaded = runtime.load_pack(pack_path)
            times[mode].append((time.perf_counter() - start) * 1000.0)
            times[f"{mode}_session"].append(loaded.timings_ms["session"])
    plain = statistics.median(times["plain"])
    return {"via": {mode: runtimes[mode].fused_kernels_via for mode in runtimes},
            "median_ms": {key: round(statistics.median(values), 2) for key, values in times.items()},
            "over_plain": {mode: round(statistics.median(times[mode]) / plain, 3)
                           for mode in ("ram_copy", "in_memory")},
            "repeats": repeats}


def ort_side_graph(runtime, pack) -> bytes:
    """The base graph with a KM subgraph (Reshape, MatMul, Add, tanh-GELU, MatMul, Add, Mul,
    Reshape) in front of every adapted Conv; all its inputs are initializers, so ORT's constant
    folding builds the modulated kernels at session creation with its own kernels.

    GELU is written with standard ops: ORT 1.32 does not constant-fold the contrib op FastGelu
    (the subgraph then runs at every inference; measured 4.9x slower inference on resnet18)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from device_runtime import km

    model = onnx.load(str(runtime.base.graph_path), load_external_data=False)
    graph = model.graph
    convs = {node.input[1]: node for node in graph.node if node.op_type == "Conv"}
    new_inits, new_nodes = [], []
    for layer in pack.layers:
        if layer.adapter != "km" or layer.activation != "gelu":
            raise SystemExit("the ORT-side experiment covers default KM packs (gelu) only")
        name = runtime.base.initializer_for(layer.name)
        shape = runtime.base.conv_shapes[layer.name]
        if layer.kind == "channel" and shape[2] * shape[3] != 1:
            raise SystemExit("the ORT-side experiment covers channel modulators on 1x1 convs only")
        t = layer.tensors
        d = t["w1"].shape[0]
        p = f"km.{layer.name}."
        arrays = {"vshape": np.array([-1, d], np.int64), "wshape": np.array(shape, np.int64),
                  "w1": (t["w1"] / np.float32(layer.scale)).astype(np.float32), "b1": t["b1"],
                  "w2": (t["w2"] * np.float32(0.5)).astype(np.float32), "b2": (t["b2"] + 1).astype(np.float32),
                  "ca": np.array(km.GELU_SQRT_2_OVER_PI * km.GELU_CUBIC, np.float32),
                  "c": np.array(km.GELU_SQRT_2_OVER_PI, np.float32), "one": np.array(1.0, np.float32)}
        new_inits += [numpy_helper.from_array(np.asarray(a), p + k) for k, a in arrays.items()]
        new_nodes += [
            helper.make_node("Reshape", [name, p + "vshape"], [p + "v"]),
            helper.make_node("MatMul", [p + "v", p + "w1"], [p + "h0"]),
            helper.make_node("Add", [p + "h0", p + "b1"], [p + "h"]),
            # 2 gelu(h) = h * (1 + tanh(h * (c + ca h^2))); the 0.5 is folded into w2
            helper.make_node("Mul", [p + "h", p + "h"], [p + "h2"]),
            helper.make_node("Mul", [p + "h2", p + "ca"], [p + "t0"]),
            helper.make_node("Add", [p + "t0", p + "c"], [p + "t1"]),
            helper.make_node("Mul", [p + "t1", p + "h"], [p + "t2"]),
            helper.make_node("Tanh", [p + "t2"], [p + "t3"]),
            helper.make_node("Add", [p + "t3", p + "one"], [p + "t4"]),
            helper.make_node("Mul", [p + "h", p + "t4"], [p + "a"]),
            helper.make_node("MatMul", [p + "a", p + "w2"], [p + "g"]),
            helper.make_node("Add", [p + "g", p + "b2"], [p + "g1"]),
            helper.make_node("Mul", [p + "v", p + "g1"], [p + "vm"]),
            helper.make_node("Reshape", [p + "vm", p + "wshape"], [p + "w"]),
        ]
        convs[name].input[1] = p + "w"
    graph.initializer.extend(new_inits)
    nodes = new_nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model.SerializeToString()


def child_ort_side(base: str, pubkey: str, pack_path: str, repeats: int) -> dict:
    """ORT-side rebuild vs km-edge's own rebuild (its engine: compiled kernel or numpy), end to end,
    interleaved in one process."""
    import numpy as np
    import onnxruntime as ort

    from device_runtime.backends import OrtBackend
    from device_runtime.pack import read_pack, read_pack_file

    runtime = _runtime(base, pubkey, 1)
    graph_copy = Path(base) / "ort-side.onnx"  # beside base.weights, where its external data lives

    def ort_side_load():
        start = time.perf_counter()
        pack = read_pack(read_pack_file(pack_path), runtime.trusted_keys)
        graph_copy.write_bytes(ort_side_graph(runtime, pack))
        overrides = {runtime.base.initializer_for(layer.name, t): a
                     for layer in pack.bn for t, a in layer.tensors.items()}
        backend = OrtBackend(graph_copy, overrides, threads=1)
        return backend, (time.perf_counter() - start) * 1000.0

    images = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    backend, _ = ort_side_load()
    runtime.load_pack(pack_path)
    ours, theirs = runtime.features(images), backend.features(images)
    max_diff = float(np.abs(theirs - ours).max() / max(1e-30, float(np.abs(ours).max())))
    # folded or not: a subgraph ORT did not fold would run at every inference
    infer = {"km_edge": [], "ort_side": []}
    for _ in range(5):
        for key, model in (("km_edge", runtime), ("ort_side", backend)):
            start = time.perf_counter()
            model.features(images[:1])
            infer[key].append((time.perf_counter() - start) * 1000.0)
    ort_ms, ours_ms = [], []
    for _ in range(repeats):
        del backend
        backend, ms = ort_side_load()
        ort_ms.append(ms)
        runtime.clear_cache()
        start = time.perf_counter()
        runtime.load_pack(pack_path)
        ours_ms.append((time.perf_counter() - start) * 1000.0)
    graph_copy.unlink()
    return {"ort_side_load_ms": {"median": statistics.median(ort_ms), "min": min(ort_ms)},
            "km_edge_load_ms": {"median": statistics.median(ours_ms), "min": min(ours_ms)},
            "features_max_rel_diff": max_diff, "onnxruntime": ort.__version__,
            "infer_batch1_ms": {k: statistics.median(v) for k, v in infer.items()}}


def child_rebuild_cost(base: str, pubkey: str, pack_path: str, repeats: int) -> dict:
    """Where the rebuild time goes: the fp32 pack's rebuild with each activation in its place
    (same layers, kinds and hidden sizes) against the memory floor, and the multiply-adds per conv
    weight the modulators need. A rebuild far above the floor with relu as well is bound by the
    modulators' small matmuls, not by memory traffic."""
    import dataclasses

    import numpy as np

    from device_runtime import km, native
    from device_runtime.pack import read_pack, read_pack_file

    runtime = _runtime(base, pubkey, 1)
    pack = read_pack(read_pack_file(pack_path), runtime.trusted_keys)
    kernels = runtime.base.conv_kernels()
    layers = [layer for layer in pack.layers if layer.adapter == "km"]
    buffer = np.empty(km.rebuild_size(kernels, layers), dtype=np.float32)
    weights = sum(int(np.prod(kernels[layer.name].shape)) for layer in layers)
    macs = 0
    for layer in layers:
        d, h = layer.tensors["w1"].shape
        rows = int(np.prod(kernels[layer.name].shape)) // d
        macs += rows * ((d + 1) * (h + 1) + (h + 1) * d + d)  # [v,1]@[w1;b1], [a,1]@[w2;b2+1], v*g
    timings = {}
    for activation in ("gelu", "relu", "tanh", "silu"):
        variant = [dataclasses.replace(layer, activation=activation) for layer in layers]
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            outputs = km.rebuild_kernels(kernels, variant, 1, buffer)  # views of the buffer, by layer
            runs.append((time.perf_counter() - start) * 1000.0)
        timings[activation] = {"median": statistics.median(runs), "min": min(runs)}
    floor = []
    for _ in range(repeats):  # the same bytes read and written into the same buffer
        start = time.perf_counter()
        for layer in layers:
            np.copyto(outputs[layer.name], kernels[layer.name])
        floor.append((time.perf_counter() - start) * 1000.0)
    return {"floor_ms": {"median": statistics.median(floor), "min": min(floor)},
            "engine": native.engine(),
            "rebuild_ms": timings, "macs_per_weight": round(macs / max(1, weights), 1),
            "activation": layers[0].activation if layers else None}


# --- the parent ---------------------------------------------------------------------------------
def _pinned(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None and shutil.which("taskset") else []


def _env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra)


def _json_of(command: list[str], **env) -> dict:
    result = subprocess.run(command, capture_output=True, text=True, env=_env(**env))
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return json.loads(result.stdout)


def _child(cpu, kind: str, *args, env: dict | None = None) -> dict:
    return _json_of([*_pinned(cpu), sys.executable, __file__, "--child", kind, *map(str, args)], **(env or {}))


def load_conditions() -> dict:
    return {"loadavg_1_5_15": list(os.getloadavg()), "cpus": os.cpu_count()}


def fmt(value, digits=1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def write_markdown(path: Path, results: dict) -> None:
    meta = results["meta"]
    lines = [
        "# Device benchmark",
        "",
        f"`python benchmarks/device.py` on {meta['machine']}, one core pinned (`taskset -c {meta['cpu']}`), "
        f"1 onnxruntime thread, ORT_ENABLE_ALL, onnxruntime {meta['onnxruntime']}, numpy {meta['numpy']}; "
        f"medians of {meta['repeats']} cold loads (minimums in brackets). Bases have random weights at 224 px; "
        "packs are default KM (auto k8/c1, GELU, BatchNorm) with non-zero modulators. "
        f"Load average at start {meta['load_start']}, at end {meta['load_end']} on {meta['cpus']} CPUs "
        + ("(the machine was shared with other jobs: absolute times are noisy, ratios are taken inside one run)."
           if max(meta["load_start"][0], meta["load_end"][0]) > 1.5 else
           "(an otherwise idle machine; ratios are taken inside one run)."),
        "",
        "## Pack load (CPU provider)",
        "",
        f"Kernels rebuilt by: {', '.join(sorted({r['bench']['fp32'].get('rebuild_engine', 'numpy') for r in results['bases'].values()}))} "
        "(`native`: the compiled kernel, device_runtime/_kmnative.c; `numpy`: the fallback).",
        f"Kernels onnxruntime fuses at load reach the session through: "
        f"{'; '.join(sorted({r['bench']['fp32'].get('fused_kernels_via', '?') for r in results['bases'].values()}))} "
        "(see *How the kernels reach the session* below).",
        "",
        "| base | pack | conv MiB | verify | rebuild | session | load_pack total | plain session | total / plain | "
        "probe (serve) | with probe / plain | rebuild / floor | rebuild / fresh-array floor | cache hit | "
        "CPU time: total / plain | CPU time: rebuild / floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arch, row in results["bases"].items():
        for dtype in ("fp32", "fp16"):
            b = row["bench"][dtype]
            load = b["load_ms"]
            lines.append(
                f"| {arch} | {dtype} | {b['conv_bytes'] / 2**20:.1f} | {fmt(load['verify']['median'])} | "
                f"{fmt(load['rebuild']['median'])} ({fmt(load['rebuild']['min'])}) | {fmt(load['session']['median'])} | "
                f"{fmt(load['total']['median'])} ({fmt(load['total']['min'])}) | "
                f"{fmt(b['plain_session_ms']['median'])} ({fmt(b['plain_session_ms']['min'])}) | "
                f"**{fmt(b['load_over_plain']['median'], 2)}×** ({fmt(b['load_over_plain']['min'], 2)}×) | "
                f"{fmt(load['probe']['median'])} | {fmt(b['load_with_probe_over_plain']['median'], 2)}× | "
                f"**{fmt(b['rebuild_over_floor']['median'], 1)}×** ({fmt(b['rebuild_over_floor']['min'], 1)}×) | "
                f"{fmt(b['rebuild_over_floor_fresh']['median'], 1)}× | "
                f"{fmt(load['cache_hit']['median'], 2)} | {fmt(b['cpu_load_over_plain']['median'], 2)}× | "
                f"{fmt(b['cpu_rebuild_over_floor']['median'], 1)}× |")
    lines += [
        "",
        "Times in ms (wall clock). *load_pack total*: verify + rebuild + session, what `km-edge run`, `eval` "
        "and a library `Runtime.load_pack` pay. *floor*: a numpy read of the same conv bytes written into a "
        "buffer reused across runs, as the rebuild writes into one, measured between the loads; "
        "*fresh-array floor*: the same copy into new arrays (it adds page faults the rebuild does not pay, "
        "so it flatters the rebuild; earlier reports used it). *plain session*: `onnxruntime.InferenceSession` "
        "on the same base graph with the same options and no pack. *probe (serve)*: the new pack's scores on "
        "one mid-grey image, checked finite (one batch-1 inference, the session's first); `serve` runs it "
        "before a pack replaces a served one (`load_pack(probe=True)`), elsewhere a request's own score "
        "check refuses such a pack at its first image. *CPU time* columns: the same ratios in process CPU "
        "time, which other jobs on a shared machine disturb far less than wall time.",
        "",
        "## How the kernels reach the session (fp32 pack)",
        "",
        "| base | plain session | session, RAM copy | session, in memory | load_pack, RAM copy | "
        "load_pack, in memory | load / plain, RAM copy | load / plain, in memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arch, row in results["bases"].items():
        handover = row.get("handover")
        if handover is None:
            continue
        ms, over = handover["median_ms"], handover["over_plain"]
        lines.append(
            f"| {arch} | {fmt(ms['plain'])} | {fmt(ms['ram_copy_session'])} | {fmt(ms['in_memory_session'])} | "
            f"{fmt(ms['ram_copy'])} | {fmt(ms['in_memory'])} | **{fmt(over['ram_copy'], 2)}×** | "
            f"{fmt(over['in_memory'], 2)}× |")
    lines += [
        "",
        "Medians in ms of cold loads by two runtimes in one process, alternating, each load after a plain "
        "session (`--child handover`). *RAM copy*: the runtime copies base.onnx and base.weights once into "
        "a private folder on a RAM file system (/dev/shm), rebuilds the kernels onnxruntime fuses at load "
        "into that copy and creates the session from it, as a plain session reads the base "
        f"(device_runtime/ramcopy.py). *In memory*: `{RAM_COPY_ENV}=off`, every kernel handed over with "
        "`add_external_initializers`, what the runtime does where it has no RAM folder.",
        "",
        "## Inference with a pack vs the plain base (fp32 pack, paired alternating runs)",
        "",
        "| base | batch 1 pack p50 / p90 | batch 1 plain p50 / p90 | ratio | batch 8 pack p50 / p90 | "
        "batch 8 plain p50 / p90 | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for arch, row in results["bases"].items():
        inf = row["bench"]["fp32"]["infer_ms"]
        cells = []
        for key in ("batch1", "batch8"):
            r = inf.get(key)
            if r is None:
                cells += ["–", "–", "–"]
                continue
            cells += [f"{fmt(r['pack']['median'], 2)} / {fmt(r['pack']['p90'], 2)}",
                      f"{fmt(r['plain']['median'], 2)} / {fmt(r['plain']['p90'], 2)}",
                      f"**{fmt(r['ratio_median_paired'], 3)}**"]
        lines.append(f"| {arch} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Memory: 40 loads of 6 rotating packs, cache_size 4",
        "",
        "| base | conv MiB | RSS after 1st load | after 4 (cache full) | after 40 | after 40 / after 4 | "
        "per cached pack | per cached pack / conv bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arch, row in results["bases"].items():
        r = row["rotation"]
        lines.append(
            f"| {arch} | {row['conv_mib']:.1f} | {r['rss_mib_after_first']} | {r['rss_mib_after_cache_full']} | "
            f"{r['rss_mib_after_all']} | **{r['growth_after_full']:.3f}** | {r['per_cached_pack_mib']} MiB | "
            f"{r['per_cached_pack_over_conv_bytes']}× |")
    if any("rebuild_cost" in row for row in results["bases"].values()):
        lines += [
            "",
            "## Where the rebuild time goes (fp32 pack, each activation in place of GELU)",
            "",
            "| base | engine | MACs per conv weight | floor | gelu (default) | relu | tanh | silu | gelu / floor | "
            "relu / floor |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for arch, row in results["bases"].items():
            for key in ("rebuild_cost", "rebuild_cost_numpy"):
                r = row.get(key)
                if not r:
                    continue
                f, t = r["floor_ms"]["median"], r["rebuild_ms"]
                lines.append(
                    f"| {arch} | {r.get('engine', 'numpy')} | {r['macs_per_weight']} | {fmt(f, 2)} | "
                    + " | ".join(fmt(t[a]["median"], 2) for a in ("gelu", "relu", "tanh", "silu"))
                    + f" | **{fmt(t['gelu']['median'] / f, 1)}×** | **{fmt(t['relu']['median'] / f, 1)}×** |")
        lines += [
            "",
            "Medians in ms of `km.rebuild_kernels` (one thread, warm buffer) over the pack's layers, by the "
            "compiled kernel (*native*, what a load uses where the install built it) and by the numpy fallback "
            f"(`{NATIVE_ENV}=0`, measured in the same run); *floor*: a "
            "numpy read of the same conv bytes written into the same buffer, back to back (caches warmer than "
            "between loads). *MACs per conv weight*: multiply-adds of the modulators "
            "(both augmented matmuls and the final product) per weight rebuilt: a 3x3 kernel modulator with 8 "
            "hidden units costs about 18, a 1x1 channel modulator with 1 hidden unit about 6, against one read "
            "and one write for the floor.",
        ]
    if any("ort_side" in row for row in results["bases"].values()):
        lines += [
            "",
            "## Alternative: onnxruntime does the rebuild (KM subgraph constant-folded at session creation)",
            "",
            "| base | km-edge: rebuild + session | ORT-side: graph rewrite + session | ORT-side / km-edge | "
            "features max diff (relative) | infer batch 1: km-edge / ORT-side |",
            "|---|---|---|---|---|---|",
        ]
        for arch, row in results["bases"].items():
            r = row.get("ort_side")
            if r:
                lines.append(
                    f"| {arch} | {fmt(r['km_edge_load_ms']['median'])} ({fmt(r['km_edge_load_ms']['min'])}) | "
                    f"{fmt(r['ort_side_load_ms']['median'])} ({fmt(r['ort_side_load_ms']['min'])}) | "
                    f"**{r['ort_side_load_ms']['median'] / r['km_edge_load_ms']['median']:.2f}×** | "
                    f"{r['features_max_rel_diff']:.1e} | {fmt(r['infer_batch1_ms']['km_edge'])} / "
                    f"{fmt(r['infer_batch1_ms']['ort_side'])} ms |")
    lines += ["", "## GPU execution providers", "", results["gpu_note"], "", *target_lines(results), ""]
    path.write_text("\n".join(lines))


TARGETS = {  # issue 9's targets: figure -> bound
    "rebuild / floor (wall)": 3.0,
    "load_pack / plain session (wall)": 1.3,
    "RSS after 40 loads / after cache full": 1.1,
    "inference pack / plain (batch 1 and 8)": 1.02,
}


def target_lines(results: dict) -> list[str]:
    """Which figures of this run meet the targets, by base (medians; a noisy machine moves them)."""
    lines = ["## Targets in this run", "", "| base | " + " | ".join(f"{k} ≤ {v}" for k, v in TARGETS.items()) + " |",
             "|---|" + "---|" * len(TARGETS)]
    for arch, row in results["bases"].items():
        bench = row["bench"]
        figures = [
            max(bench[d]["rebuild_over_floor"]["median"] for d in ("fp32", "fp16")),
            max(bench[d]["load_over_plain"]["median"] for d in ("fp32", "fp16")),
            row["rotation"]["growth_after_full"],
            max(r["ratio_median_paired"] for r in bench["fp32"]["infer_ms"].values()),
        ]
        cells = [f"{value:.2f} {'✓' if value <= bound else '✗'}" for value, bound in zip(figures, TARGETS.values())]
        lines.append(f"| {arch} | " + " | ".join(cells) + " |")
    lines += ["", "Worst of the fp32 and fp16 packs (and of both batch sizes)."]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bases", nargs="+", default=DEFAULT_BASES)
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".cache" / "device")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cpu", type=int, default=(os.cpu_count() or 1) - 1, help="core to pin children to")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--runs", type=int, default=30, help="paired inference runs per batch size")
    parser.add_argument("--no-ort-side", action="store_true", help="skip the ORT-side rebuild experiment")
    parser.add_argument("--quick", action="store_true", help="few repeats (a smoke run)")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite device.md from device.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        kind, rest = args.child[0], args.child[1:]
        if kind == "rotation":
            print(json.dumps(child_rotation(rest[0], rest[1], rest[2:])))
        elif kind == "ort-side":
            print(json.dumps(child_ort_side(rest[0], rest[1], rest[2], int(rest[3]))))
        elif kind == "handover":
            print(json.dumps(child_handover(rest[0], rest[1], rest[2], int(rest[3]))))
        elif kind == "rebuild-cost":
            print(json.dumps(child_rebuild_cost(rest[0], rest[1], rest[2], int(rest[3]))))
        return 0

    if args.markdown_only:
        write_markdown(args.out / "device.md", json.loads((args.out / "device.json").read_text()))
        return 0

    import numpy
    import onnxruntime

    if args.quick:
        args.repeats, args.runs = 3, 4
    args.workdir.mkdir(parents=True, exist_ok=True)
    keys = args.workdir / "keys"
    if not (keys / "signing.key").exists():
        from device_runtime.keys import generate_keypair

        generate_keypair(keys)
    pubkey = str(keys / "signing.pub")
    results = {"meta": {
        "machine": f"{platform.machine()} {platform.processor() or ''} ({os.cpu_count()} CPUs)".strip(),
        "cpu": args.cpu, "cpus": os.cpu_count(), "repeats": args.repeats, "runs": args.runs,
        "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
        "load_start": [round(v, 2) for v in os.getloadavg()],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, "bases": {}}
    for arch in args.bases:
        print(f"[{arch}] preparing", flush=True)
        info = prepare(arch, args.workdir, keys / "signing.key")
        row = {"load_start": list(os.getloadavg()), "bench": {}}
        for dtype in ("fp32", "fp16"):
            print(f"[{arch}] km-edge bench {dtype}", flush=True)
            row["bench"][dtype] = _json_of([
                *_pinned(args.cpu), KM_EDGE, "bench", "--pack", info[dtype], "--base", info["base"],
                "--pubkey", pubkey, "--threads", "1", "--batch", "8", "--repeats", str(args.repeats),
                # inference is reported for the fp32 pack (an fp16 pack decodes to the same float32 graph)
                "--runs", str(args.runs if dtype == "fp32" else 2), "--provider", "cpu", "--json"])
        print(f"[{arch}] kernels through the RAM copy or in memory", flush=True)
        row["handover"] = _child(args.cpu, "handover", info["base"], pubkey, info["fp32"], 2 * args.repeats)
        row["conv_mib"] = round(row["bench"]["fp32"]["conv_bytes"] / 2**20, 2)
        print(f"[{arch}] rotation RSS", flush=True)
        row["rotation"] = _child(args.cpu, "rotation", info["base"], pubkey, *info["rotation"])
        if not args.no_ort_side:
            print(f"[{arch}] ORT-side rebuild", flush=True)
            row["ort_side"] = _child(args.cpu, "ort-side", info["base"], pubkey, info["fp32"], args.repeats)
        print(f"[{arch}] rebuild cost by activation, compiled kernel and numpy", flush=True)
        row["rebuild_cost"] = _child(args.cpu, "rebuild-cost", info["base"], pubkey, info["fp32"], args.repeats)
        row["rebuild_cost_numpy"] = _child(args.cpu, "rebuild-cost", info["base"], pubkey, info["fp32"],
                                           args.repeats, env={NATIVE_ENV: "0"})
        row["load_end"] = list(os.getloadavg())
        results["bases"][arch] = row
        b = row["bench"]["fp32"]
        print(f"[{arch}] load/plain {b['load_over_plain']['median']}x, rebuild/floor "
              f"{b['rebuild_over_floor']['median']}x, RSS growth {row['rotation']['growth_after_full']}", flush=True)
    results["meta"]["load_end"] = [round(v, 2) for v in os.getloadavg()]
    results["gpu_note"] = (
        "Not run: this machine has no GPU (onnxruntime offers "
        f"{', '.join(onnxruntime.get_available_providers())}). `--provider cuda|tensorrt` is tested here "
        "only for its refusal (exit 2, one line); `auto` resolves to the CPU.")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(args.out / "device.md", results)
    print(f"wrote {args.out / 'device.json'} and {args.out / 'device.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
