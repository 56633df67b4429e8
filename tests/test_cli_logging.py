"""Log lines go to stderr through `logging`, at the level `km-edge -q` / `-v` picks; results stay on
stdout, and `--json` stdout stays one JSON document whatever is logged.

A tiny project (random-init demo base at 32 px, a two-class task of a few images, one epoch):
host commands run in-process (click's runner, one torch import), the device command and one
`--json` run as real processes, where stdout and stderr are really separate streams.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from km_edge.config import render_config

from conftest import run_cli

TASK = "tiny"
TRAIN_INFO = f"training {TASK} [km]"  # km_edge.train's info line
EPOCH_DEBUG = f"km-edge: debug: km_edge.train: {TASK} [km]: epoch 1/1"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("logging-project")
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 1)):
        for cls in ("a", "b"):
            folder = root / "data" / TASK / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    config = render_config("demo", "none", 32, {TASK: {"data": f"data/{TASK}"}})
    config = config.replace("epochs = 10", "epochs = 1").replace('device = "auto"', 'device = "cpu"')
    (root / "km-edge.toml").write_text(config)
    run_cli("keygen", cwd=root, check=True)
    run_cli("-q", "export-base", cwd=root, check=True)
    return root


def km_edge(root: Path, *args):
    """`km-edge ARGS` in ``root`` in-process; (exit code, stdout, stderr)."""
    from click.testing import CliRunner

    from km_edge.cli import main

    old = os.getcwd()
    os.chdir(root)
    try:
        result = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        os.chdir(old)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.slow
def test_default_logs_info_lines_but_not_debug(project):
    code, stdout, stderr = km_edge(project, "train", "--task", TASK)
    assert code == 0, stderr
    assert TRAIN_INFO in stderr and TRAIN_INFO not in stdout  # a log line, on stderr
    assert "km-edge: debug:" not in stderr
    assert f"{TASK} [km]: val folder accuracy" in stdout  # the result, on stdout


@pytest.mark.slow
def test_quiet_hides_info_lines_and_progress_bars(project):
    code, stdout, stderr = km_edge(project, "-q", "train", "--task", TASK)
    assert code == 0, stderr
    assert stderr == ""  # no info line, no progress bar
    assert f"{TASK} [km]: val folder accuracy" in stdout  # results are not logs: --quiet keeps them


@pytest.mark.slow
def test_verbose_shows_debug_lines(project):
    code, stdout, stderr = km_edge(project, "--verbose", "train", "--task", TASK)
    assert code == 0, stderr
    assert EPOCH_DEBUG in stderr and TRAIN_INFO in stderr


@pytest.mark.slow
def test_json_stdout_stays_pure_json_while_logging(project):
    packed = run_cli("-v", "pack", "--task", TASK, "--retrain", "--json", cwd=project, check=True)
    report = json.loads(packed.stdout)  # the whole of stdout is the one JSON document
    assert report["task"] == TASK and report["trained"]["task"] == TASK
    assert TRAIN_INFO in packed.stderr and EPOCH_DEBUG in packed.stderr  # the logs went to stderr

    image = next((project / "data" / TASK / "val" / "a").iterdir())
    ran = run_cli("-v", "run", "--pack", report["pack"], image, "--json", cwd=project, check=True)
    assert json.loads(ran.stdout)["predictions"][0]["image"] == str(image)
    assert f"km-edge: debug: device_runtime.runtime: {TASK}.kmp: task {TASK} v" in ran.stderr

    quiet = run_cli("-q", "run", "--pack", report["pack"], image, cwd=project, check=True)
    assert quiet.stderr == "" and quiet.stdout.startswith(f"{image}: ")


def test_verbose_and_quiet_together_are_a_usage_error(tmp_path):
    result = run_cli("-v", "-q", "init", "proj", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("km-edge: error:") and "--quiet" in result.stderr
    assert not (tmp_path / "proj").exists()


def test_a_device_command_reads_km_edge_toml_once(project):
    """verify finds the base and the trusted keys through km-edge.toml: read once, not per lookup."""
    result = run_cli("-v", "verify", "packs/absent.kmp", cwd=project)
    assert result.returncode == 2 and "absent.kmp: no such file" in result.stderr
    reads = [line for line in result.stderr.splitlines() if line.startswith("km-edge: debug: km_edge.cli: settings:")]
    assert reads == [f"km-edge: debug: km_edge.cli: settings: {(project / 'km-edge.toml').resolve()}"]
