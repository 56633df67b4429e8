"""The few-shot benchmark harness end to end on a tiny random demo base: classes of the test
episodes are disjoint from meta-training and validation classes, a run resumes where it stopped
(earlier episodes are kept, not redone), and the results carry a CI per method and shot count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # renders ~3000 glyphs and runs a few episodes (about a minute)


def run(tmp_path: Path, episodes: int) -> dict:
    out = tmp_path / "results" / "fewshot"
    args = [sys.executable, str(ROOT / "benchmarks" / "fewshot.py"), "--arch", "demo", "--weights", "none",
            "--input-size", "32", "--per-class", "4", "--ways", "3", "--shots", "1", "--queries", "2",
            "--inner-steps", "2", "--meta-episodes", "2", "--meta-shots", "1", "--meta-queries", "2", "--val-episodes", "1", "--episodes", str(episodes),
            "--methods", "proto,linear,km0,kmmeta", "--work", str(tmp_path / "work"), "--out", str(out), "--pilot"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(out.with_suffix(".json").read_text())


def test_fewshot_harness_resumes_and_reports(tmp_path):
    pytest.importorskip("fontTools")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import glyph_source

    splits = glyph_source.build_splits(per_class=1)
    meta, val, test = (set(splits[n].classes) for n in ("meta", "val", "test"))
    assert test and not (test & (meta | val)) and not (meta & val)

    first = run(tmp_path, 1)
    state = json.loads((tmp_path / "work" / "state.json").read_text())
    kept = {k: list(v) for k, v in state["episodes"].items()}
    second = run(tmp_path, 3)
    state = json.loads((tmp_path / "work" / "state.json").read_text())
    for key, values in kept.items():
        assert len(state["episodes"][key]) == 3 and state["episodes"][key][:1] == values
    assert first["label"].startswith("PILOT")
    rows = {(r["method"], r["shots"]): r for r in second["rows"]}
    assert set(rows) == {(m, 1) for m in ("proto", "linear", "km0", "kmmeta")}
    for row in rows.values():
        assert row["episodes"] == 3 and 0.0 <= row["accuracy"] <= 1.0 and row["ci95"] >= 0.0
    table = (tmp_path / "results" / "fewshot.md").read_text()
    for method in ("proto", "linear", "km0", "kmmeta"):
        assert f"| 3 | 1 | {method} | 3 |" in table  # ways, shots, method, episodes
    assert "| 3 | 1 | kmmeta | linear | 3 |" in table  # the paired difference against the linear probe
