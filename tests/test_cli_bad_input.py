"""Bad input to the host commands: exit 2, one `km-edge: error:` line, no traceback, nothing written.

docs/DESIGN.md §8.3: "Bad input never crashes with a traceback and never leaves a half-written
file". Each case runs in its own copy of a tiny project (random-init demo base, a two-class task of a few
images), so no case sees another's leftovers and the shared demo project is never touched. After a
refusal the project's files are exactly what they were before (no checkpoint, no *.tmp, no base).

Most cases call the CLI's entry point in-process (click's runner) to pay torch's import once; the
sanity run, one data refusal, the usage error and the --json error run the real `km-edge` process.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from km_edge.config import render_config

from conftest import run_cli

TASK = "tiny"


# --- the tiny project ----------------------------------------------------------------------------
def _write_images(folder: Path, n: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def _write_task(root: Path, seed: int = 0) -> None:
    for split, n in (("train", 3), ("val", 1)):
        for k, cls in enumerate(("a", "b")):
            _write_images(root / split / cls, n, seed * 100 + k * 10 + (split == "val"))


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A valid tiny project: `km-edge train --task tiny` works in it (checked below)."""
    root = tmp_path_factory.mktemp("bad-input-template")
    _write_task(root / "data" / TASK)
    config = render_config("demo", "none", 32, {TASK: {"data": f"data/{TASK}"}})
    config = config.replace("epochs = 10", "epochs = 1").replace('device = "auto"', 'device = "cpu"')
    (root / "km-edge.toml").write_text(config)
    return root


@pytest.fixture(scope="module")
def foreign_weights(tmp_path_factory) -> dict[str, Path]:
    """Base weights files that are not for the demo architecture (outside every project)."""
    import torch
    import torchvision

    from km_edge.models import build_base, save_base_weights

    folder = tmp_path_factory.mktemp("foreign-weights")
    torch.manual_seed(0)
    tv_resnet18 = folder / "resnet18-torchvision.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tv_resnet18)
    km_resnet18 = save_base_weights(folder / "resnet18-km-edge.pth", build_base("resnet18", None, width=0.125))
    return {"torchvision resnet18": tv_resnet18, "km-edge resnet18": km_resnet18}


@pytest.fixture
def project(template, tmp_path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(template, root)
    return root


def files_of(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def set_config(root: Path, old: str, new: str) -> None:
    path = root / "km-edge.toml"
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def run_in_process(*args, cwd: Path) -> Outcome:
    """`km-edge ARGS` in ``cwd`` through click's test runner: the same entry point as the console
    script, without paying the torch import once per case (a few seconds each on a small CPU)."""
    from click.testing import CliRunner

    from km_edge.cli import main

    old = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    finally:
        os.chdir(old)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"km-edge {args} raised {result.exception!r}") from result.exception
    return Outcome(result.exit_code, result.stdout, result.stderr)


def refuse(root: Path, *args, words: tuple[str, ...] = (), subprocess: bool = False) -> str:
    """Run km-edge in ``root``; assert the refusal contract; return the error line."""
    before = files_of(root)
    result = (run_cli if subprocess else run_in_process)(*args, cwd=root)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("km-edge: error:"), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert "internal error" not in lines[0]
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    after = files_of(root)
    assert after == before, f"files appeared or vanished: {sorted(after ^ before)}"
    assert not [p for p in root.rglob("*.tmp")]
    checkpoints = root / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())
    return lines[0]


# --- the template itself is fine (so every refusal below is caused by its one defect) -------------
@pytest.mark.slow
def test_tiny_project_trains(project):
    result = run_cli("train", "--task", TASK, "--max-steps", 1, "--json", cwd=project)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["task"] == TASK and (project / "checkpoints" / f"{TASK}.pt").is_file()


# --- data ----------------------------------------------------------------------------------------
def test_missing_data_folder(project):
    with open(project / "km-edge.toml", "a") as handle:
        handle.write('\n[tasks.ghost]\ndata = "data/ghost"\n')
    refuse(project, "train", "--task", "ghost", words=("data/ghost", "does not exist"))


def test_empty_data_folder(project):
    (project / "data" / "empty" / "train").mkdir(parents=True)
    refuse(project, "train", "--task", "empty", words=("class folders",))


def test_class_folder_without_images(project):
    _write_images(project / "data" / "noimages" / "train" / "a", 3, seed=5)
    (project / "data" / "noimages" / "train" / "b").mkdir()
    (project / "data" / "noimages" / "train" / "b" / "notes.txt").write_text("not an image\n")
    refuse(project, "train", "--task", "noimages", words=("noimages/train/b", "no images"))


def test_unreadable_image(project):
    bad = project / "data" / TASK / "train" / "b" / "broken.png"
    garbage = np.random.default_rng(7).integers(0, 256, 200, dtype=np.uint8).tobytes()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + garbage)  # a PNG signature, then garbage
    # as a real process too: one line on the real stderr, nothing else printed there
    refuse(project, "train", "--task", TASK, words=("broken.png", "cannot read image"), subprocess=True)


def test_unreadable_image_also_stops_pack(project):
    """`pack` trains first when there is no checkpoint: the same refusal, and no pack file either."""
    (project / "data" / TASK / "val" / "a" / "garbage.png").write_bytes(b"definitely not a png")
    refuse(project, "pack", "--task", TASK, words=("garbage.png",))
    assert not (project / "packs").exists() or not any((project / "packs").iterdir())


def test_unknown_task(project):
    line = refuse(project, "train", "--task", "nosuch", words=("nosuch", "km-edge.toml"))
    assert TASK in line  # it names the tasks it knows


# --- base weights --------------------------------------------------------------------------------
def test_config_weights_of_another_arch(project, foreign_weights):
    """km-edge.toml says arch demo, weights a torchvision resnet18 state_dict."""
    path = foreign_weights["torchvision resnet18"]
    set_config(project, 'weights = "none"', f'weights = "{path}"')
    refuse(project, "train", "--task", TASK, words=(path.name, "do not fit architecture 'demo'"))


def test_export_base_weights_flag_of_another_arch(project, foreign_weights):
    """`export-base --weights` with a km-edge base file written for resnet18."""
    path = foreign_weights["km-edge resnet18"]
    refuse(project, "export-base", "--weights", path, "--out", "exported", words=(path.name, "are for 'resnet18', not 'demo'"))
    assert not (project / "exported").exists()


def test_config_weights_file_missing(project):
    set_config(project, 'weights = "none"', 'weights = "bases/missing.pth"')
    refuse(project, "train", "--task", TASK, words=("missing.pth",))


def test_export_base_weights_flag_missing(project):
    refuse(project, "export-base", "--weights", "bases/missing.pth", words=("missing.pth",))
    assert not (project / "base").exists()


# --- usage errors and --json -----------------------------------------------------------------------
def test_bad_method_is_a_usage_error(project):
    before = files_of(project)
    result = run_cli("train", "--task", TASK, "--method", "dropout", cwd=project)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--method" in result.stderr and "dropout" in result.stderr
    assert files_of(project) == before


def test_json_error_is_one_json_object(project):
    before = files_of(project)
    result = run_cli("train", "--task", "nosuch", "--json", cwd=project)
    assert result.returncode == 2
    error = json.loads(result.stdout)  # all of stdout is one JSON document
    assert isinstance(error, dict) and "nosuch" in error["error"]
    assert error["exit_code"] == 2
    assert "\n" not in error["error"]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("km-edge: error:") and "Traceback" not in result.stderr
    assert files_of(project) == before


# --- bad flag values and bad km-edge.toml values: usage errors, exit 2, the flag or key named ----
@pytest.mark.parametrize("args, named", [
    (("--kernel-hidden", "0"), "--kernel-hidden"),
    (("--channel-hidden", "-1"), "--channel-hidden"),
    (("--batch-size", "0"), "--batch-size"),
    (("--epochs", "0"), "--epochs"),
    (("--max-steps", "0"), "--max-steps"),
    (("--lr", "0"), "--lr"),
    (("--lr", "nan"), "--lr"),
    (("--seed", "-1"), "--seed"),
    (("--seed", "x"), "--seed"),
    (("--lora-rank", "0"), "--lora-rank"),
    (("--activation", "swish"), "--activation"),
])
def test_bad_flag_value_is_exit_2_naming_the_flag(project, args, named):
    refuse(project, "train", "--task", TASK, *args, words=(named,))


@pytest.mark.parametrize("old, new, named", [
    ("seed = 0", 'seed = "x"', "[train].seed"),
    ("epochs = 1", "epoch = 3", "[train]: unknown key(s) epoch"),
    ("batch_size = 32", "batch_size = 0", "[train].batch_size"),
    ("kernel_hidden = 8", "kernel_hidden = 2.5", "[train].kernel_hidden"),
    ('activation = "gelu"', 'activation = "swish"', "[train].activation"),
    ("input_size = 32", 'input_size = "32"', "[base].input_size"),
    ('keys = "keys"', "keys = 3", "[paths].keys"),
    ('keys = "keys"', 'keys = "keys"\nkeyz = "k"', "[paths]: unknown key(s) keyz"),
    (f'data = "data/{TASK}"', f'data = "data/{TASK}"\nepoch = 3', f"[tasks.{TASK}]: unknown key(s) epoch"),
    (f'data = "data/{TASK}"', f'data = "data/{TASK}"\nlr = -1.0', f"[tasks.{TASK}].lr"),
])
def test_bad_config_value_is_exit_2_naming_file_table_and_key(project, old, new, named):
    set_config(project, old, new)
    refuse(project, "train", "--task", TASK, words=("km-edge.toml", named))


def test_bad_flag_value_as_a_real_process_is_one_line(project):
    before = files_of(project)
    result = run_cli("train", "--task", TASK, "--kernel-hidden", "0", cwd=project)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("km-edge: error:") and "--kernel-hidden" in result.stderr
    assert "--help" in result.stderr  # the way out
    assert files_of(project) == before
