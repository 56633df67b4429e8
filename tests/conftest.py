"""Shared fixtures: one small demo project per test session (data, pretrained base, export, keys).

Building it costs about half a minute on 2 CPU cores; tests that need it are marked slow.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

KM_EDGE = str(Path(sys.executable).with_name("km-edge"))
PRETRAIN_EPOCHS = 12
TASK_EPOCHS = 10
DATA_SCALE = 0.5


# fp16 keeps 11 significant bits: rounding moves a number by at most 2**-11 of itself.
FP16_UNIT_ROUNDOFF = 2.0**-11


def images_allowed(n: int) -> int:
    """How many of ``n`` images two float-equivalent paths may classify differently: at least one
    image, and 1 % of a large set (accuracy bounds are whole images, never a fraction of one)."""
    return max(1, math.ceil(0.01 * n))


def assert_same_predictions(logits_a, logits_b, atol: float) -> int:
    """Logits agree within ``atol``, and top-1 is identical on every row whose top-1/top-2
    margin in ``logits_a`` is more than twice the largest difference. Returns the number of rows
    with a smaller margin (near-ties, where the two may legitimately disagree)."""
    import numpy as np

    logits_a, logits_b = np.asarray(logits_a, np.float64), np.asarray(logits_b, np.float64)
    assert logits_a.shape == logits_b.shape
    largest = float(np.abs(logits_a - logits_b).max())
    assert largest <= atol, (largest, atol)
    top2 = np.sort(logits_a, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * largest
    disagree = np.flatnonzero(clear & (logits_a.argmax(1) != logits_b.argmax(1)))
    assert disagree.size == 0, f"top-1 differs on rows {disagree.tolist()} despite a clear margin"
    return int(np.sum(~clear))


@dataclass
class DemoProject:
    root: Path
    data: Path
    base_dir: Path
    base_weights: Path
    keys: Path
    pretrain_report: dict

    def run(self, *args, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run the km-edge CLI in this project's folder, as a user would."""
        return run_cli(*args, cwd=self.root, check=check, env=env)

    @property
    def base_spec(self) -> dict:
        return {"arch": "demo", "weights": str(self.base_weights), "input_size": 32}


def run_cli(*args, cwd, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    result = subprocess.run([KM_EDGE, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=full_env)
    if check and result.returncode != 0:
        raise AssertionError(f"km-edge {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr}")
    return result


@pytest.fixture(scope="session", autouse=True)
def device_state_file(tmp_path_factory) -> Path:
    """Device commands record accepted pack versions (anti-rollback); never in the tester's home."""
    path = tmp_path_factory.mktemp("device-state") / "rollback.json"
    previous = os.environ.get("KM_EDGE_STATE")
    os.environ["KM_EDGE_STATE"] = str(path)  # inherited by every CLI the tests start
    yield path
    if previous is None:
        os.environ.pop("KM_EDGE_STATE", None)
    else:
        os.environ["KM_EDGE_STATE"] = previous


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    """The hand-built tiny base of test_device_runtime.py (convs, a depthwise conv, BatchNorm),
    exported once for the session: read it, copy it to change it."""
    from test_device_runtime import export

    out = tmp_path_factory.mktemp("tiny-base")
    export(out)
    return out


@pytest.fixture(scope="session")
def demo_project(tmp_path_factory) -> DemoProject:
    from device_runtime.keys import generate_keypair
    from km_edge.config import render_config
    from km_edge.demodata import TARGET_TASKS, write_demo_data
    from km_edge.export import export_base
    from km_edge.models import build_base
    from km_edge.pretrain import pretrain_base

    root = tmp_path_factory.mktemp("project")
    data = root / "data"
    write_demo_data(data, seed=0, scale=DATA_SCALE)
    weights = root / "bases" / "demo.pth"
    report = pretrain_base(data / "source", "demo", weights, epochs=PRETRAIN_EPOCHS, batch_size=32, seed=0,
                           device="cpu", progress=False)
    config = render_config("demo", "bases/demo.pth", 32, {t: {"data": f"data/{t}"} for t in TARGET_TASKS})
    config = config.replace("epochs = 10", f"epochs = {TASK_EPOCHS}").replace('device = "auto"', 'device = "cpu"')
    (root / "km-edge.toml").write_text(config)
    export_base(build_base("demo", str(weights), input_size=32), root / "base")
    generate_keypair(root / "keys")
    return DemoProject(root, data, root / "base", weights, root / "keys", report)


@dataclass
class TrainedPack:
    task: str
    checkpoint: Path
    pack: Path
    pack_fp16: Path
    train_report: dict
    pack_report: dict
    pack_fp16_report: dict


@pytest.fixture(scope="session")
def letters_pack(demo_project) -> TrainedPack:
    """`km-edge pack --task letters` on the demo project: trains KM first, then signs the pack."""
    import json

    packed = json.loads(demo_project.run("pack", "--task", "letters", "--json", check=True).stdout)
    fp16 = json.loads(demo_project.run("pack", "--task", "letters", "--dtype", "fp16", "--out",
                                       "packs/letters-fp16.kmp", "--json", check=True).stdout)
    return TrainedPack(
        task="letters",
        checkpoint=demo_project.root / "checkpoints" / "letters.pt",
        pack=demo_project.root / "packs" / "letters.kmp",
        pack_fp16=demo_project.root / "packs" / "letters-fp16.kmp",
        train_report=packed["trained"],
        pack_report=packed,
        pack_fp16_report=fp16,
    )
