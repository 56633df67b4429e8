"""`km-edge bench`: the device-side profile runs on a device install's code path and reports every
figure a user compares (load breakdown, plain-session and memory-floor references, paired inference,
RSS). Timings are checked for presence and consistency, never for speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_device_runtime import device_folder, make_pack

from device_runtime import native
from device_runtime.basefiles import Base
from device_runtime.bench import rotation_rss
from device_runtime.keys import load_trusted_keys
from device_runtime.runtime import Runtime

KM_EDGE = str(Path(sys.executable).with_name("km-edge"))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    base, key = device_folder(root)
    packs = [make_pack(root / f"task{i}.kmp", base, key, task=f"task{i}", seed=i) for i in range(4)]
    return root, packs


def bench(root, *args):
    env = {k: v for k, v in os.environ.items() if k != "KM_EDGE_PROVIDER"}
    return subprocess.run([KM_EDGE, "bench", *map(str, args)], cwd=root, capture_output=True, text=True, env=env)


def test_bench_reports_the_load_breakdown_references_and_inference(project):
    root, packs = project
    result = bench(root, "--pack", packs[0], "--batch", "3", "--repeats", "3", "--runs", "4", "--threads", "1",
                   "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["provider"] == "cpu" and report["task"] == "task0" and report["threads"] == 1
    assert report["rebuild_engine"] == native.engine()  # what rebuilt the kernels being timed
    # how the fused kernels reached the sessions timed: the RAM copy, or in memory and why
    assert report["fused_kernels_via"].startswith(("RAM copy of the base files (", "add_external_initializers ("))
    load = report["load_ms"]
    for key in ("verify", "rebuild", "session", "total", "cache_hit", "probe", "total_with_probe"):
        assert load[key]["n"] == 3 and 0 < load[key]["min"] <= load[key]["median"] <= load[key]["p90"]
    # the probe (what serve adds to a swap) is reported beside load_pack, not inside it
    assert load["total_with_probe"]["min"] >= load["total"]["min"] + load["probe"]["min"] * 0.99
    assert report["load_with_probe_over_plain"]["median"] >= report["load_over_plain"]["median"]
    # the parts are inside the total of the same loads
    assert load["verify"]["min"] + load["rebuild"]["min"] + load["session"]["min"] <= load["total"]["p90"] * 1.01
    assert report["plain_session_ms"]["n"] == 3 and report["rebuild_floor_ms"]["n"] == 3
    assert report["load_over_plain"]["median"] == pytest.approx(
        load["total"]["median"] / report["plain_session_ms"]["median"], rel=1e-2)
    assert report["rebuild_over_floor"]["median"] > 0 and report["rebuild_floor_fresh_ms"]["n"] == 3
    conv_bytes = sum(k.nbytes for k in Base.open(root / "base").conv_kernels().values())
    assert report["conv_bytes"] == conv_bytes  # the test pack adapts every conv
    assert set(report["infer_ms"]) == {"batch1", "batch3"}
    for row in report["infer_ms"].values():
        assert row["pack"]["n"] == 4 and row["plain"]["n"] == 4 and row["ratio_median_paired"] > 0
    assert report["rss_mib"]["rss"] > 0 and report["rss_mib"]["peak"] >= report["rss_mib"]["rss"]

    text = bench(root, "--pack", packs[0], "--repeats", "2", "--runs", "2")
    assert text.returncode == 0, text.stderr
    for word in ("verify", "rebuild", "session", "cache_hit", "plain base session", "memory floor", "batch8", "RSS"):
        assert word in text.stdout


def test_bench_refuses_bad_input_with_one_line(project, tmp_path):
    root, packs = project
    bad = tmp_path / "bad.kmp"
    bad.write_bytes(b"not a pack")
    for args in (["--pack", bad], ["--pack", tmp_path / "missing.kmp"]):
        result = bench(root, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("km-edge: error:")
    result = bench(root, "--pack", packs[0], "--batch", "0")  # a usage error, reported by click
    assert result.returncode == 2 and "--batch" in result.stderr


def test_rotation_keeps_the_cache_bounded(project):
    root, packs = project
    runtime = Runtime(root / "base", load_trusted_keys([root / "keys" / "signing.pub"]), cache_size=2)
    report = rotation_rss(runtime, packs, loads=8)
    assert report["loads"] == 8 and len(report["trace_mib"]) == 8 and report["cache_size"] == 2
    assert len(runtime.cached) == 2
    with pytest.raises(ValueError, match="more packs"):
        rotation_rss(runtime, packs[:2], loads=4)
