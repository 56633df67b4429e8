#!/usr/bin/env python
"""Throughput and latency of `km-edge serve` for 1 and 4 tasks, against a fresh `km-edge run` per image.

Exports a full-size base (mobilenet_v2 at 224 px, random weights: speed does not depend on the
values), signs default-KM packs with non-zero modulators for four tasks, starts `km-edge serve`
(1 inference worker, 1 onnxruntime thread, pinned with taskset when available) and drives it from
closed-loop HTTP clients over 127.0.0.1, one 224 px JPEG per request. Configurations, all in one run:

  1 task           every request to the same task
  4 tasks          requests round-robin over four tasks (all sessions cached)
  4 tasks, cache 1 the same with --cache-size 1: every request rebuilds its task's session
  run per image    `km-edge run` as a fresh process per image (what serve saves)

Each configuration runs ``--rounds`` times; the table gives the median round's throughput and the
p50 / p99 latency over all its requests. Writes benchmarks/results/serve.json and serve.md.

    python benchmarks/serve.py [--arch mobilenet_v2] [--requests 300] [--clients 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
KM_EDGE = str(Path(sys.executable).with_name("km-edge"))
N_CLASSES = 10
TASKS = ("t1", "t2", "t3", "t4")


def make_device(root: Path, arch: str, input_size: int) -> dict:
    """base/, keys/, packs/ (four KM tasks) and a test image under ``root``."""
    import numpy as np
    import torch
    from PIL import Image

    from device_runtime.keys import generate_keypair, load_private_key
    from device_runtime.pack import build_pack, write_pack
    from km_edge.export import export_base
    from km_edge.methods import MethodConfig, build_task_model
    from km_edge.models import build_base
    from km_edge.pack import task_tensors

    manifest = export_base(build_base(arch, input_size=input_size), root / "base")
    generate_keypair(root / "keys")
    key = load_private_key(root / "keys" / "signing.key")
    (root / "packs").mkdir()
    config = MethodConfig("km")
    for index, task in enumerate(TASKS):
        torch.manual_seed(index)
        model = build_task_model(build_base(arch, input_size=input_size), N_CLASSES, config, index)
        for module in model.modules():
            if hasattr(module, "w2"):
                torch.nn.init.normal_(module.w2, std=0.01)
        body = {"task": task, "pack_version": 1, "base_id": manifest["base_id"],
                "labels": [f"class{i}" for i in range(N_CLASSES)], "preprocess": manifest["preprocess"],
                "method": "km", "modulator": config.modulator.to_dict(), **task_tensors(model, config),
                "metrics": {}, "trainer": {}}
        write_pack(root / "packs" / f"{task}.kmp", build_pack(body, key))
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (input_size + 32, input_size + 32, 3), dtype=np.uint8)).save(
        buffer, format="JPEG", quality=90)
    (root / "image.jpg").write_bytes(buffer.getvalue())
    return {"arch": arch, "input_size": input_size, "base_bytes": manifest["graph_bytes"] + manifest["weights_bytes"],
            "pack_bytes": (root / "packs" / "t1.kmp").stat().st_size}


def _pinned(command: list, cpus: str | None) -> list:
    return ["taskset", "-c", cpus, *command] if cpus and shutil.which("taskset") else command


def start_server(root: Path, cache_size: int, cpus: str | None) -> tuple[subprocess.Popen, str]:
    command = [KM_EDGE, "serve", "--base", root / "base", "--pubkey", root / "keys" / "signing.pub",
               "--packs", root / "packs", "--state", root / "state.json", "--port", "0", "--threads", "1",
               "--workers", "1", "--queue-size", "64", "--cache-size", str(cache_size), "--log-level", "warning",
               "--json"]
    process = subprocess.Popen([str(c) for c in _pinned(command, cpus)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    ready = json.loads(process.stdout.readline())
    return process, ready["listening"]


def drive(url: str, image: bytes, tasks: tuple, requests: int, clients: int) -> dict:
    """Closed loop: ``clients`` threads each send requests one after another; latencies in ms."""
    import httpx

    latencies: list[float] = []
    failures = []
    counter = iter(range(requests))
    lock = threading.Lock()

    def client():
        with httpx.Client(base_url=url, timeout=120) as http:
            while True:
                with lock:
                    n = next(counter, None)
                if n is None:
                    return
                started = time.perf_counter()
                response = http.post(f"/v1/tasks/{tasks[n % len(tasks)]}/predict", content=image)
                elapsed = (time.perf_counter() - started) * 1000
                with lock:
                    (latencies if response.status_code == 200 else failures).append(elapsed)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"latencies_ms": latencies, "failures": len(failures), "wall_s": wall,
            "throughput_rps": len(latencies) / wall}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def measure_serve(root: Path, configs: list[tuple[str, tuple, int, int]], args) -> list[dict]:
    """All configurations' servers run side by side (idle unless driven) and their rounds alternate,
    so a change in the machine's load hits every configuration alike."""
    image = (root / "image.jpg").read_bytes()
    servers = [start_server(root, cache_size, args.server_cpus) for _, _, cache_size, _ in configs]
    results = [{"alone": [], "loaded": []} for _ in configs]
    try:
        for (_, tasks, _, _), (_, url) in zip(configs, servers):
            drive(url, image, tasks, max(8, len(tasks) * 4), args.clients)  # warm-up: sessions, connections
        for _ in range(args.rounds):
            for (_, tasks, _, requests), (_, url), result in zip(configs, servers, results):
                result["alone"].append(drive(url, image, tasks, max(4, requests // 4), 1))
                result["loaded"].append(drive(url, image, tasks, requests, args.clients))
    finally:
        for process, _ in servers:
            process.terminate()
            process.wait(60)
    rows = []
    for (name, tasks, cache_size, _), result in zip(configs, results):
        alone = [x for r in result["alone"] for x in r["latencies_ms"]]
        loaded = [x for r in result["loaded"] for x in r["latencies_ms"]]
        throughputs = [r["throughput_rps"] for r in result["loaded"]]
        rows.append({"config": name, "tasks": len(tasks), "cache_size": cache_size, "clients": args.clients,
                     "requests": len(alone) + len(loaded),
                     "failures": sum(r["failures"] for runs in result.values() for r in runs),
                     "throughput_rps_median": statistics.median(throughputs), "throughput_rps_max": max(throughputs),
                     "p50_ms": percentile(alone, 50), "p99_ms": percentile(alone, 99), "min_ms": min(alone),
                     "loaded_p50_ms": percentile(loaded, 50), "loaded_p99_ms": percentile(loaded, 99)})
        print(json.dumps(rows[-1]))
    return rows


def measure_run(root: Path, args) -> dict:
    """`km-edge run` as a fresh process per image: imports, base and pack load, one prediction."""
    command = [KM_EDGE, "run", "--pack", root / "packs" / "t1.kmp", root / "image.jpg", "--base", root / "base",
               "--pubkey", root / "keys" / "signing.pub", "--state", root / "state-run.json", "--threads", "1",
               "--json"]
    times = []
    for _ in range(args.run_repeats):
        started = time.perf_counter()
        subprocess.run([str(c) for c in _pinned(command, args.server_cpus)], check=True, capture_output=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
        times.append((time.perf_counter() - started) * 1000)
    row = {"config": "km-edge run per image", "tasks": 1, "cache_size": None, "clients": 1,
           "requests": len(times), "failures": 0, "throughput_rps_median": 1000 / statistics.median(times),
           "throughput_rps_max": 1000 / min(times), "p50_ms": statistics.median(times),
           "p99_ms": percentile(times, 99), "min_ms": min(times), "loaded_p50_ms": None, "loaded_p99_ms": None}
    print(json.dumps(row))
    return row


def write_markdown(path: Path, result: dict) -> None:
    setup = result["setup"]
    pinned = setup["pinned"]
    lines = [
        "# `km-edge serve`: throughput and latency",
        "",
        f"Base {setup['arch']} at {setup['input_size']} px ({setup['base_bytes'] / 2**20:.1f} MiB, random weights), "
        f"default-KM packs of {setup['pack_bytes'] / 1024:.0f} KiB with {N_CLASSES} classes; one "
        f"{setup['input_size'] + 32} px JPEG per request over 127.0.0.1. Server: 1 inference worker, 1 onnxruntime "
        f"thread{', pinned to CPU ' + setup['server_cpus'] if pinned else ''}; clients"
        f"{' on CPU ' + setup['client_cpus'] if pinned else ''}. Throughput and the loaded latencies: "
        f"{setup['clients']} closed-loop clients; latency: 1 client (nothing queued). The three server "
        f"configurations run side by side and their {setup['rounds']} rounds alternate ({setup['requests']} "
        "requests per round with 4 clients, a tenth of that with cache 1, a quarter with 1 client).",
        "",
        f"Machine: {setup['machine']}, {setup['cpus']} CPUs, shared with other jobs while measured (1-minute load "
        f"average {setup['load_average_1min'][0]} before, {setup['load_average_1min'][1]} after): the absolute "
        "figures are far below what an idle core gives; compare the rows with each other. "
        f"Reproduce: `{setup['command']}`.",
        "",
        "| configuration | tasks | session cache | throughput, 4 clients (req/s, median round) | "
        "p50 latency (ms) | p99 latency (ms) | p50 / p99 with 4 clients (ms) | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        cache = "–" if row["cache_size"] is None else str(row["cache_size"])
        loaded = ("–" if row["loaded_p50_ms"] is None
                  else f"{row['loaded_p50_ms']:.0f} / {row['loaded_p99_ms']:.0f}")
        lines.append(f"| {row['config']} | {row['tasks']} | {cache} | {row['throughput_rps_median']:.2f} | "
                     f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {loaded} | {row['failures']} |")
    rows = {row["config"]: row for row in result["rows"]}
    one, four, run, cold = rows["1 task"], rows["4 tasks"], rows["km-edge run per image"], rows["4 tasks, cache 1"]
    lines += [
        "",
        f"- Four tasks in one process: {four['throughput_rps_median'] / one['throughput_rps_median']:.2f}x the "
        f"throughput of one task and {four['p50_ms'] / one['p50_ms']:.2f}x its p50 latency: a request costs one "
        "inference whichever task it names, as long as the tasks' sessions are cached.",
        f"- A warm server answers in {one['p50_ms']:.0f} ms (p50) where a fresh `km-edge run` takes "
        f"{run['p50_ms']:.0f} ms ({run['p50_ms'] / one['p50_ms']:.0f}x): the process start, imports, base and "
        "pack load that `serve` pays once.",
        f"- With `--cache-size 1` every request to a different task rebuilds its session (kernels + onnxruntime "
        f"session): p50 {cold['p50_ms']:.0f} ms, {cold['p50_ms'] / four['p50_ms']:.0f}x the cached case. Size "
        "the cache to the tasks a device answers for.",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--requests", type=int, default=200, help="per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--run-repeats", type=int, default=7)
    parser.add_argument("--server-cpus", default="0", help="taskset CPU list for the server ('' for none)")
    parser.add_argument("--client-cpus", default="1", help="taskset CPU list for the clients ('' for none)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    pinned = bool(args.server_cpus and shutil.which("taskset"))
    if pinned and args.client_cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        setup = make_device(root, args.arch, args.input_size)
        load_before = os.getloadavg()
        rows = measure_serve(root, [
            ("1 task", TASKS[:1], 8, args.requests),
            ("4 tasks", TASKS, 8, args.requests),
            # every request rebuilds a session here: a tenth of the requests says enough
            ("4 tasks, cache 1", TASKS, 1, max(8, args.requests // 10)),
        ], args)
        rows.append(measure_run(root, args))
        load_after = os.getloadavg()
    setup.update(machine=platform.machine(), cpus=os.cpu_count(),
                 load_average_1min=[round(load_before[0], 1), round(load_after[0], 1)], clients=args.clients, rounds=args.rounds,
                 requests=args.requests, pinned=pinned, server_cpus=args.server_cpus, client_cpus=args.client_cpus,
                 command="python " + " ".join(["benchmarks/serve.py", *sys.argv[1:]]))
    result = {"setup": setup, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(result, indent=1))
    write_markdown(out / "serve.md", result)
    print(f"wrote {out / 'serve.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
