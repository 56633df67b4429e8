"""What a `--weights` string means, decided in one place (km_edge.weights), and a wrong weights name
answered with the names that would work.
"""

from __future__ import annotations

import pytest

from device_runtime.errors import ConfigError
from km_edge.config import load_settings
from km_edge.models import build_base, get_arch, weights_names
from km_edge.weights import is_weights_file

from conftest import run_cli


def test_a_pth_name_is_a_file_even_before_it_exists(tmp_path):
    assert is_weights_file(tmp_path / "not-yet.pth") and is_weights_file("bases/x.pt")


def test_an_existing_file_is_a_file_whatever_its_suffix(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert is_weights_file(tmp_path / "weights.bin")


def test_a_name_is_not_a_file_even_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imagenet").mkdir()
    assert not is_weights_file("imagenet")
    (tmp_path / "km-edge.toml").write_text('[base]\narch = "efficientnet_lite0"\nweights = "imagenet"\n')
    assert load_settings(tmp_path).base_weights() == "imagenet"


def test_project_weights_file_is_read_from_the_project_folder(tmp_path):
    (tmp_path / "km-edge.toml").write_text('[base]\narch = "demo"\nweights = "bases/demo.pth"\n')
    assert load_settings(tmp_path).base_weights() == str(tmp_path / "bases" / "demo.pth")
    (tmp_path / "km-edge.toml").write_text('[base]\narch = "demo"\nweights = "none"\n')
    assert load_settings(tmp_path).base_weights() is None


@pytest.mark.parametrize("arch, wrong, listed", [
    ("resnet18", "IMAGENET1K_V9", ["IMAGENET1K_V1", "DEFAULT"]),
    ("efficientnet_lite0", "imagenet1k", ["imagenet", "pretrained"]),
    ("demo", "imagenet", []),
])
def test_wrong_weights_name_lists_the_valid_names(arch, wrong, listed):
    with pytest.raises(ConfigError) as error:
        build_base(arch, wrong)
    message = str(error.value)
    assert f"weights {wrong!r}: no such file, and {arch} has no weights of that name" in message
    for name in [*listed, "a local .pth file", "none"]:
        assert name in message
    assert all(name in message for name in weights_names(get_arch(arch)))  # every accepted name, not a sample


def test_wrong_weights_name_on_the_command_line_is_bad_input_naming_the_choices(tmp_path):
    result = run_cli("export-base", "--arch", "efficientnet_lite0", "--weights", "imagenet1k", "--out", tmp_path / "b",
                     cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pass --weights (or [base] weights in km-edge.toml) as one of imagenet, pretrained, a local .pth file, none" in lines[0], result.stderr
    assert not (tmp_path / "b").exists()
