"""The plain install is the device install: no torch, and `km-edge run / eval / verify` work.

Builds a wheel of exactly what the Dockerfile copies (pyproject.toml, README.md, device_runtime/,
km_edge/), installs it WITHOUT the [train] extra into a fresh venv, checks that torch is not there,
and runs the letters pack of the demo project with that venv's `km-edge`.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("pyproject.toml", "README.md", "device_runtime", "km_edge")


def _base_python() -> str:
    """The interpreter this venv was made from (a venv of a venv would inherit nothing, but be sure)."""
    candidate = getattr(sys, "_base_executable", None) or shutil.which("python3")
    if not candidate or not Path(candidate).exists():
        pytest.skip("no base python interpreter to make a venv with")
    return candidate


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("device-install")
    source = work / "src"
    source.mkdir()
    for name in SHIPPED:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif origin.exists():
            shutil.copy2(origin, source / name)
        elif name == "README.md":  # pyproject names it as the long description
            (source / name).write_text("# km-edge\n")
        else:
            raise AssertionError(f"{origin} is missing")

    wheels = work / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check",
             "--wheel-dir", wheels]
    if importlib.util.find_spec("setuptools") is not None:
        build.append("--no-build-isolation")
    _run([*build, source.resolve()])  # an absolute path: a bare name would be looked up on the index
    (wheel,) = wheels.glob("km_edge-*.whl")

    venv = work / "venv"
    _run([_base_python(), "-m", "venv", venv])
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel])
    return venv


@pytest.mark.slow
def test_plain_install_has_no_torch_and_runs_packs(device_venv, demo_project, letters_pack):
    python, km_edge = device_venv / "bin" / "python", device_venv / "bin" / "km-edge"
    installed = _run([python, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"]).stdout
    names = {p["name"].lower() for p in json.loads(installed)}
    assert "km-edge" in names
    assert not names & {"torch", "torchvision"}, sorted(names)
    no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    # the package comes from the venv, not from the repository
    where = _run([python, "-c", "import device_runtime, km_edge.cli; print(device_runtime.__file__)"],
                 cwd=device_venv).stdout.strip()
    assert str(device_venv) in where

    def cli(*args) -> subprocess.CompletedProcess:
        return _run([km_edge, *args], cwd=demo_project.root)

    assert "run" in cli("--help").stdout

    image = sorted((demo_project.data / "letters" / "val").rglob("*.png"))[0]
    ran = json.loads(cli("run", "--pack", letters_pack.pack, image, "--top-k", "3", "--json").stdout)
    assert ran["pack"]["task"] == "letters" and len(ran["predictions"][0]["top"]) == 3

    val_dir = demo_project.data / "letters" / "val"
    evaluated = json.loads(cli("eval", "--pack", letters_pack.pack, val_dir, "--json").stdout)
    assert evaluated["accuracy"] == pytest.approx(letters_pack.pack_report["host_val_accuracy"], abs=1e-12)
    assert evaluated["n_images"] == len(list(val_dir.rglob("*.png")))

    verified = json.loads(cli("verify", letters_pack.pack, "--json").stdout)
    assert verified["ok"] is True and verified["base_checked"] is True
    assert "letters" in cli("inspect", letters_pack.pack).stdout

    # a host command says what is missing instead of crashing with a traceback
    host = subprocess.run([km_edge, "train", "--task", "letters"], cwd=demo_project.root,
                          capture_output=True, text=True)
    assert host.returncode != 0 and "Traceback" not in host.stderr
