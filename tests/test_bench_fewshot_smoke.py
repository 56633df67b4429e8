"""CI-fast smoke run of the few-shot benchmark (benchmarks/fewshot.py): every method, first-order
MAML included, over two N-way cells on a tiny random demo base at 32 px, a few episodes. The
results file must carry a row per method and cell with a finite accuracy in [0, 1] and a finite CI,
the task-file bytes of every method, and both meta-learners' records."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("proto", "linear", "km0", "kmmeta", "lora0", "fomaml")
WAYS = (3, 4)


def test_fewshot_smoke_all_methods(tmp_path):
    pytest.importorskip("fontTools")
    out = tmp_path / "results" / "fewshot"
    args = [sys.executable, str(ROOT / "benchmarks" / "fewshot.py"), "--arch", "demo", "--weights", "none",
            "--input-size", "32", "--per-class", "3", "--ways", *map(str, WAYS), "--shots", "1", "--queries", "2",
            "--inner-steps", "2", "--meta-episodes", "2", "--meta-ways", "3", "--meta-shots", "1",
            "--meta-queries", "1", "--val-episodes", "1", "--episodes", "2", "--methods", ",".join(METHODS),
            "--work", str(tmp_path / "work"), "--out", str(out), "--pilot"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.with_suffix(".json").read_text())
    rows = {(r["method"], r["ways"], r["shots"]): r for r in report["rows"]}
    assert set(rows) == {(m, w, 1) for m in METHODS for w in WAYS}
    for row in rows.values():
        assert row["episodes"] == 2
        assert math.isfinite(row["accuracy"]) and 0.0 <= row["accuracy"] <= 1.0
        assert math.isfinite(row["ci95"]) and row["ci95"] >= 0.0
        assert row["pack_bytes"]["float32"] > row["pack_bytes"]["float16"] > 0
    # a KM pack carries modulators on top of the head-only pack; a bigger N means a bigger head
    assert rows[("km0", 3, 1)]["pack_bytes"]["float32"] > rows[("linear", 3, 1)]["pack_bytes"]["float32"]
    assert rows[("linear", 4, 1)]["pack_bytes"]["float32"] > rows[("linear", 3, 1)]["pack_bytes"]["float32"]
    assert set(report["meta_train"]) == {"kmmeta", "fomaml"}
    assert report["meta_train"]["fomaml"]["episodes"] == 2 and report["meta_train"]["fomaml"]["tail_params"] > 0
    table = (tmp_path / "results" / "fewshot.md").read_text()
    for method in METHODS:
        for ways in WAYS:
            assert f"| {ways} | 1 | {method} | 2 |" in table

    # --report-only rewrites the results from the state file and runs no new episode
    args[args.index("--episodes") + 1] = "50"
    result = subprocess.run([*args, "--report-only"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    again = json.loads(out.with_suffix(".json").read_text())
    assert {r["episodes"] for r in again["rows"]} == {2} and len(again["rows"]) == len(rows)


def test_fomaml_moves_only_the_tail(tmp_path):
    """First-order MAML changes the tail's weights and leaves the frozen prefix as the base has it."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fomaml

    from km_edge.models import build_base

    torch.manual_seed(0)
    base = build_base("demo", "none", input_size=32)
    learner = fomaml.TailLearner(base.backbone, base.feature_size, 3)
    prefix_before = [p.detach().clone() for p in learner.prefix.parameters()]
    tail_before = learner.get()
    images, labels = torch.randn(24, 3, 32, 32), [i // 4 for i in range(24)]  # 6 classes of 4
    record = fomaml.fomaml(learner, images, labels, ways=3, shots=2, queries=2, episodes=3, inner_steps=2,
                           lr=1e-2, head_lr=1e-2, outer_lr=1e-2, progress=False)
    assert record["episodes"] == 3 and record["tail_params"] == learner.n_params()
    assert any(not torch.equal(a, b) for a, b in zip(tail_before, learner.get()))
    assert all(torch.equal(a, b) for a, b in zip(prefix_before, learner.prefix.parameters()))
