"""`km-edge meta-train` and `km-edge train --init` as a user runs them, on a tiny random demo base.

What is checked: a few Reptile episodes move the modulators' zero-start last layer away from zero
and write a meta-init bound to the base; `train --init` starts the task's modulators from it (after
one optimiser step at a small learning rate every modulator tensor is within that step of the
meta-init, far from where a zero start would be); a meta-init learned on another base, or for other
modulator sizes, is refused with exit 2 and one line; episodes the source cannot supply are refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

KM_EDGE = str(Path(sys.executable).with_name("km-edge"))
SOURCE_CLASSES, TASK_CLASSES, PER_CLASS = 8, 3, 6
META_LR = 0.02  # inner learning rate while meta-training: big, so the init moves far in few episodes
TRAIN_LR = 1e-4  # one step of `train --init` at this rate moves any tensor by about this much


def km(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([KM_EDGE, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def write_classes(root: Path, names: list[str], seed: int) -> None:
    """Each class: a fixed random 8x8 colour pattern, upscaled, plus per-image noise and shift."""
    rng = np.random.default_rng(seed)
    for name in names:
        pattern = rng.integers(0, 256, (8, 8, 3)).astype(np.float32)
        big = np.kron(pattern, np.ones((4, 4, 1), np.float32))
        for i in range(PER_CLASS):
            image = np.roll(big, tuple(rng.integers(-2, 3, 2)), axis=(0, 1)) + rng.normal(0, 25, big.shape)
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")


def make_project(root: Path, seed: int = 0) -> Path:
    root.mkdir(parents=True)
    assert km(root, "init", "--arch", "demo", "--weights", "none", "--input-size", "32").returncode == 0
    write_classes(root / "source" / "train", [f"s{i}" for i in range(SOURCE_CLASSES)], seed)
    write_classes(root / "data" / "task" / "train", [f"t{i}" for i in range(TASK_CLASSES)], seed + 100)
    with open(root / "km-edge.toml", "a") as f:
        f.write('\n[tasks.task]\ndata = "data/task"\n')
    return root


def meta_train(root: Path, *extra: str) -> subprocess.CompletedProcess:
    return km(root, "meta-train", "--data", "source", "--ways", "3", "--shots", "2", "--queries", "2",
              "--episodes", "4", "--inner-steps", "3", "--lr", str(META_LR), "--out", "meta.pt", "--json", *extra)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = make_project(tmp_path_factory.mktemp("meta") / "project")
    result = meta_train(root)
    assert result.returncode == 0, result.stderr
    return root


def modulators(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if ".parametrizations.weight." in k}


def test_meta_train_moves_the_init_away_from_zero(project):
    document = torch.load(project / "meta.pt", weights_only=True)
    assert document["format"] == "km-edge-meta-init" and document["algorithm"] == "reptile"
    last = [v for k, v in document["tensors"].items() if k.endswith((".w2", ".b2"))]
    assert last, "the meta-init holds the modulators' last layers"
    # they start at exactly zero; after Reptile every layer's last layer has moved
    assert all(float(v.abs().max()) > 0 for v in last)
    assert max(float(v.abs().max()) for v in last) > 10 * TRAIN_LR
    assert not any(p.exists() for p in project.glob(".meta.pt.*"))  # no temporary file left behind


def test_meta_train_json_report(project, tmp_path):
    result = meta_train(project, "--out", str(tmp_path / "again.pt"), "--episodes", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["algorithm"] == "reptile" and report["episodes"] == 1 and report["ways"] == 3
    assert report["source_classes"] == SOURCE_CLASSES
    assert 0.0 <= report["final_query_accuracy"] <= 1.0


def test_train_init_starts_from_the_meta_init(project):
    init = modulators(torch.load(project / "meta.pt", weights_only=True)["tensors"])
    result = km(project, "train", "--task", "task", "--init", "meta.pt", "--max-steps", "1", "--epochs", "1",
                "--lr", str(TRAIN_LR), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["init"] == "meta.pt"
    trained = modulators(torch.load(project / "checkpoints" / "task.pt", weights_only=True)["tensors"])
    assert set(trained) == set(init)
    for key, value in init.items():
        # one AdamW step moves a tensor by at most about lr: the checkpoint started at the meta-init
        assert float((trained[key] - value).abs().max()) <= 1.01 * TRAIN_LR + 1e-7, key

    # without --init the same run starts at zero and ends far from the meta-init
    plain = km(project, "train", "--task", "task", "--max-steps", "1", "--epochs", "1", "--lr", str(TRAIN_LR),
               "--json")
    assert plain.returncode == 0, plain.stderr
    zero_start = modulators(torch.load(project / "checkpoints" / "task.pt", weights_only=True)["tensors"])
    far = max(float((zero_start[k] - init[k]).abs().max()) for k in init if k.endswith(".w2"))
    assert far > 5 * TRAIN_LR


def test_meta_init_of_another_base_is_refused(project, tmp_path):
    other = make_project(tmp_path / "other", seed=1)
    # another random demo base: same architecture, other weights
    (other / "bases").mkdir(exist_ok=True)
    torch.manual_seed(123)
    from km_edge.models import build_base, save_base_weights

    save_base_weights(other / "bases" / "demo-random.pth", build_base("demo", None, input_size=32))
    result = km(other, "train", "--task", "task", "--init", str(project / "meta.pt"), "--max-steps", "1", "--json")
    assert result.returncode == 2
    assert "different base" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (other / "checkpoints" / "task.pt").exists()  # refused before anything was written


def test_meta_init_for_other_modulators_is_refused(project):
    result = km(project, "train", "--task", "task", "--init", "meta.pt", "--kernel-hidden", "4", "--json")
    assert result.returncode == 2
    assert "meta-init modulators" in json.loads(result.stdout)["error"]


def test_episodes_the_source_cannot_supply_are_refused(project):
    result = km(project, "meta-train", "--data", "source", "--ways", "3", "--shots", "5", "--queries", "5",
                "--episodes", "1", "--out", "never.pt")
    assert result.returncode == 2
    assert "need 3 classes with at least 10 images" in result.stderr
    assert not (project / "never.pt").exists()


def test_bad_flag_values_exit_2(project):
    result = km(project, "meta-train", "--data", "source", "--ways", "1")
    assert result.returncode == 2 and "--ways" in result.stderr


def test_prototype_head_is_the_nearest_class_mean_classifier():
    from km_edge.meta import prototype_weights

    generator = torch.Generator().manual_seed(0)
    support = torch.randn(12, 16, generator=generator) * 3
    labels = torch.arange(4).repeat(3)
    queries = torch.randn(200, 16, generator=generator) * 3
    weight, bias = prototype_weights(support, labels, 4)
    means = torch.stack([support[labels == c].mean(0) for c in range(4)])
    nearest = torch.cdist(queries, means).argmin(1)
    assert torch.equal((queries @ weight.T + bias).argmax(1), nearest)
    # one shot per class: still a finite, non-degenerate head
    weight, bias = prototype_weights(support[:4], labels[:4], 4)
    assert torch.isfinite(weight).all() and torch.isfinite(bias).all()
    assert torch.equal((support[:4] @ weight.T + bias).argmax(1), labels[:4])
