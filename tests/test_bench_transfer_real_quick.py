"""`benchmarks/transfer.py --config real --quick`: the real-base benchmark's code paths end to end.

The quick mode swaps the ImageNet base for the random demo net and the targets for the one real
target that needs no fetch step (scikit-image's LFW faces), so what is checked is the protocol:
the split discipline, the rate sweep and its choice, test touched only by final runs, resuming
from the JSON-lines file, and the outputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_quick(out: Path, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "transfer.py"), "--config", "real", "--quick", "--out", str(out),
         "--workdir", str(cache)],
        capture_output=True, text=True, timeout=600,
    )


@pytest.mark.slow
def test_quick_real_transfer_benchmark_keeps_test_for_final_runs_and_resumes(tmp_path):
    out, cache = tmp_path / "results", tmp_path / "cache"
    result = run_quick(out, cache)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "transfer_real_quick.json").read_text())
    runs = [json.loads(line) for line in (out / "transfer_real_quick.jsonl").read_text().splitlines()]
    cfg, grid = data["config"], {c["id"] for c in data["grid"]}
    assert {"head", "bias", "full", "km-auto-k8c1-gelu-bn"} <= grid
    sweeps = [r for r in runs if r["phase"] == "sweep"]
    finals = [r for r in runs if r["phase"] == "final"]
    # test accuracy exists only on final runs; a sweep run never saw the test split
    assert all("test_accuracy" not in r for r in sweeps)
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in finals)
    assert len(finals) == len(grid) * len(cfg["targets"]) * len(cfg["seeds"])
    for config_id in grid:
        tried = [r for r in sweeps if r["config_id"] == config_id]
        pairs = {(r["lr"], r["head_lr"]) for r in tried}
        if config_id == "head":
            assert pairs == {(lr, lr) for lr in cfg["head_only_lrs"]}
        else:
            assert pairs == {(lr, h) for lr in cfg["body_lrs"] for h in cfg["head_lrs"]}
        best = max(r["holdout_accuracy"] for r in tried)
        chosen = {(r["lr"], r["head_lr"]) for r in finals if r["config_id"] == config_id}
        assert len(chosen) == 1  # every seed trains at the one rate pair chosen on the holdout
        assert any((r["lr"], r["head_lr"]) in chosen and r["holdout_accuracy"] == best for r in tried)
        assert {r["seed"] for r in finals if r["config_id"] == config_id} == set(cfg["seeds"])
    by_config = {r["config_id"]: r for r in finals}
    assert by_config["head"]["trainable_params"] == 0
    assert 0 < by_config["bias"]["trainable_params"] < by_config["bn-affine"]["trainable_params"]
    assert all(r["n_holdout"] > 0 and r["n_test"] > 0 for r in runs)
    # the saved sweep tensors are gone once the choice was scored
    assert not list((cache / "states").rglob("*.pt"))
    costs = {c["config"]: c for c in data["costs"]}
    assert costs["full"]["step_time_vs_full"] == pytest.approx(1.0)
    assert costs["head"]["peak_memory_vs_full"] < 1.0
    table = (out / "transfer_real_quick.md").read_text()
    assert "faces-lfw" in table and "BSD-3-Clause" in table and "**test** accuracy" in table
    assert (out / "transfer_real_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((cache / "realdata" / "faces-lfw" / "meta.json").read_text())
    assert meta["n_train"] == sum(meta["train_counts"].values()) and meta["classes"] == ["background", "face"]

    # a second start finds every run in the JSON-lines file and trains nothing
    again = run_quick(out, cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 jobs queued" in again.stdout
    assert len((out / "transfer_real_quick.jsonl").read_text().splitlines()) == len(runs)
