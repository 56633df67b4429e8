"""Device commands find the base and the trusted keys in one order: flag > environment variable >
km-edge.toml [paths] > ./base and ./keys (the host's export-base and pack honour [paths] too)."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_cli


@pytest.fixture
def moved_project(demo_project, letters_pack, tmp_path):
    """A device folder whose km-edge.toml puts the base in elsewhere/ and the keys in trust/."""
    root = tmp_path / "device"
    root.mkdir()
    shutil.copytree(demo_project.base_dir, root / "elsewhere")
    (root / "trust").mkdir()
    shutil.copy(demo_project.keys / "signing.pub", root / "trust" / "signing.pub")
    shutil.copy(letters_pack.pack, root / "letters.kmp")
    (root / "km-edge.toml").write_text('[paths]\nbase = "elsewhere"\nkeys = "trust"\n')
    return root


@pytest.mark.slow
def test_device_commands_follow_paths_in_km_edge_toml(moved_project, demo_project):
    image = sorted((demo_project.data / "letters" / "val").rglob("*.png"))[0]
    env = {"KM_EDGE_BASE": "", "KM_EDGE_PUBKEY": "", "KM_EDGE_STATE": str(moved_project / "state.json")}
    verified = run_cli("verify", "letters.kmp", "--json", cwd=moved_project, env=env)
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["base_checked"] is True  # found elsewhere/, not ./base
    ran = run_cli("run", "--pack", "letters.kmp", image, "--json", cwd=moved_project, env=env)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["pack"]["task"] == "letters"


@pytest.mark.slow
def test_environment_and_flags_come_before_km_edge_toml(moved_project):
    env = {"KM_EDGE_PUBKEY": "", "KM_EDGE_STATE": str(moved_project / "state.json")}
    by_env = run_cli("verify", "letters.kmp", cwd=moved_project, env={**env, "KM_EDGE_BASE": "nowhere"})
    assert by_env.returncode == 0 and "base not checked" in by_env.stdout  # the env's base, absent
    by_flag = run_cli("run", "--pack", "letters.kmp", "x.png", "--base", "flagged", cwd=moved_project,
                      env={**env, "KM_EDGE_BASE": "elsewhere"})
    assert by_flag.returncode == 2 and "flagged" in by_flag.stderr
    no_key = run_cli("verify", "letters.kmp", "--pubkey", "missing.pub", cwd=moved_project, env=env)
    assert no_key.returncode == 2
    assert "missing.pub" in no_key.stderr and "--pubkey" in no_key.stderr  # names the way out


def test_serve_finds_its_packs_folder_by_flag_env_then_km_edge_toml(tmp_path):
    root = tmp_path / "device"
    root.mkdir()
    (root / "km-edge.toml").write_text('[paths]\npacks = "shelf"\n')
    env = {"KM_EDGE_PACKS": "", "KM_EDGE_STATE": str(root / "state.json")}
    # checked before anything is served: a missing folder is refused naming the one that was chosen
    from_toml = run_cli("serve", cwd=root, env=env)
    assert from_toml.returncode == 2 and "shelf: no such folder" in from_toml.stderr
    from_env = run_cli("serve", cwd=root, env={**env, "KM_EDGE_PACKS": "crate"})
    assert from_env.returncode == 2 and "crate: no such folder" in from_env.stderr
    from_flag = run_cli("serve", "--packs", "box", cwd=root, env={**env, "KM_EDGE_PACKS": "crate"})
    assert from_flag.returncode == 2 and "box: no such folder" in from_flag.stderr
