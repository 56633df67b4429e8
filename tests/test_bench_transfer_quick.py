"""`benchmarks/transfer.py --quick`: the transfer benchmark's code paths end to end (CI smoke run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_transfer_benchmark_writes_json_table_and_plot(tmp_path):
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "transfer.py"), "--quick", "--out", str(out),
         "--workdir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "transfer.json").read_text())
    grid = {c["id"] for c in data["grid"]}
    assert {"head", "bn", "full", data["default_km"]} <= grid
    bases = {b["name"] for b in data["config"]["bases"]}
    targets = set(data["config"]["targets"])
    # every configuration ran on every base x target x seed, and each sweep tried every rate
    finals = [r for r in data["runs"] if r["phase"] == "final"]
    assert len(finals) == len(grid) * len(bases) * len(targets) * len(data["config"]["seeds"])
    sweeps = [r for r in data["runs"] if r["phase"] == "sweep"]
    assert {r["lr"] for r in sweeps if r["method"] == "km"} == set(data["config"]["lrs"]["km"])
    for run in finals:
        assert 0.0 <= run["val_accuracy"] <= 1.0
        assert run["pack_bytes"] > 0 and run["seconds_per_step"] > 0
        if run["method"] == "head":
            assert run["trainable_params"] == 0
    # the chosen rate of each base x configuration is the one with the best holdout accuracy
    for (base, config) in {(r["base_name"], r["config_id"]) for r in sweeps}:
        tried = [r for r in sweeps if r["base_name"] == base and r["config_id"] == config]
        best = max(r["holdout_accuracy"] for r in tried)
        chosen = {r["lr"] for r in finals if r["base_name"] == base and r["config_id"] == config}
        assert len(chosen) == 1 and any(r["lr"] in chosen and r["holdout_accuracy"] == best for r in tried)
    summary = data["summary"]
    assert {a["base"] for a in summary["averages"]} == bases
    assert set(summary["default_km"]) == bases
    costs = {(c["base"], c["config"]): c for c in data["costs"]}
    for base in bases:
        assert costs[(base, "full")]["step_time_vs_full"] == pytest.approx(1.0)
        assert costs[(base, "full")]["peak_memory_vs_full"] == pytest.approx(1.0)
        assert costs[(base, "head")]["peak_memory_vs_full"] < 1.0  # no gradients through the backbone
    table = (out / "transfer.md").read_text()
    for base in bases:
        assert f"## {base}" in table
    assert (out / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
