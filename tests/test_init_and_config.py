"""`km-edge init` scaffolds a project; km-edge.toml settings are read, and flags override them."""

from __future__ import annotations

import json
import stat

from conftest import run_cli
from km_edge.config import load_settings, render_config


def test_init_scaffolds_config_folders_and_a_private_key(tmp_path):
    result = run_cli("init", "proj", "--arch", "resnet18", "--weights", "none", "--input-size", "160", "--json",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    project = tmp_path / "proj"
    for folder in ("data", "packs", "keys"):
        assert (project / folder).is_dir()
    assert stat.S_IMODE((project / "keys" / "signing.key").stat().st_mode) == 0o600
    assert (project / "keys" / "signing.pub").exists()
    assert len(report["key_id"]) == 16
    settings = load_settings(project)
    assert settings.found
    assert settings.base == {"arch": "resnet18", "weights": "none", "input_size": 160}
    assert settings.base_weights() is None


def test_init_refuses_to_overwrite_the_config(tmp_path):
    assert run_cli("init", "proj", cwd=tmp_path).returncode == 0
    again = run_cli("init", "proj", cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0 and "--force" in again.stderr
    assert run_cli("init", "proj", "--force", cwd=tmp_path).returncode == 0


def test_task_settings_and_flags_override_the_file(tmp_path):
    text = render_config("demo", "bases/demo.pth", 32, {"birds": {"data": "photos/birds", "epochs": 3}})
    text = text.replace("batch_size = 32", "batch_size = 16")
    (tmp_path / "km-edge.toml").write_text(text)
    (tmp_path / "data" / "cats").mkdir(parents=True)
    settings = load_settings(tmp_path)
    assert settings.task("birds")["data"] == str(tmp_path / "photos" / "birds")
    assert settings.task("cats")["data"] == str(tmp_path / "data" / "cats")  # found under data/
    options = settings.train_options("birds")
    assert options["epochs"] == 3 and options["batch_size"] == 16  # task table, then [train]
    options = settings.train_options("birds", epochs=7, lr=0.05, method=None)
    assert options["epochs"] == 7 and options["lr"] == 0.05 and options["method"] == "km"
    assert settings.base_weights() == str(tmp_path / "bases" / "demo.pth")


def test_unknown_task_is_refused_with_the_known_ones(tmp_path):
    (tmp_path / "km-edge.toml").write_text(render_config("demo", "none", 32, {"birds": {"data": "data/birds"}}))
    result = run_cli("train", "--task", "dogs", cwd=tmp_path)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "dogs" in line and "birds" in line


def test_broken_config_is_a_one_line_error(tmp_path):
    (tmp_path / "km-edge.toml").write_text("[base\narch = demo")
    result = run_cli("train", "--task", "x", cwd=tmp_path)
    assert result.returncode == 2
    assert "km-edge.toml" in result.stderr and "Traceback" not in result.stderr
