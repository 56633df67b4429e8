"""The plain install is the device install: no torch, and `km-edge run / eval / verify` work.

Builds a wheel of exactly what the Dockerfile copies (pyproject.toml, setup.py, README.md,
device_runtime/, km_edge/; pip compiles the rebuild kernel, as on a device with a C compiler),
installs it WITHOUT the [train] extra into a fresh venv, checks that torch is not there, and runs the letters pack of the demo project with that venv's `km-edge`. No network: the wheel's
dependencies are copied from the running venv (their installed files, by each one's RECORD) and
`pip check` confirms they satisfy it; pip itself installs with --no-index.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_same_predictions, images_allowed

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("pyproject.toml", "setup.py", "README.md", "device_runtime", "km_edge")


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
            # not the checkout's compiled kernel: the wheel build must compile its own
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
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
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    for dist in _device_dependencies():
        _copy_distribution(dist, site)
    # offline: the dependencies are already in place, and `pip check` proves they satisfy the wheel
    _run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index", "--no-deps", wheel])
    _run([python, "-m", "pip", "check", "--disable-pip-version-check"])
    return venv


def _device_dependencies() -> list[metadata.Distribution]:
    """The plain install's requirement closure (no extras), as installed in the venv running the
    tests: installing from here needs no network, and nothing of [train] (torch) can come along."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    todo = [Requirement(r) for r in metadata.requires("km-edge") or []]
    found: dict[str, metadata.Distribution] = {}
    while todo:
        requirement = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        found[name] = metadata.distribution(requirement.name)
        todo += [Requirement(r) for r in found[name].requires or []]
    assert not set(found) & {"torch", "torchvision"}, sorted(found)
    return list(found.values())


def _copy_distribution(dist: metadata.Distribution, site: Path) -> None:
    """Copy an installed distribution's files (its RECORD) into another venv's site-packages."""
    origin = Path(dist.locate_file("")).resolve()
    for entry in dist.files or []:
        source = Path(dist.locate_file(entry)).resolve()
        if not source.is_file() or not source.is_relative_to(origin):  # scripts in bin/ are not needed
            continue
        target = site / source.relative_to(origin)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


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
    # with a C compiler on the machine (as here), the install compiled the rebuild kernel
    engine = _run([python, "-c", "from device_runtime import native; print(native.engine(), native.PATH)"],
                  cwd=device_venv).stdout.split()
    if shutil.which("cc") or shutil.which("gcc"):
        assert engine[0] == "native" and str(device_venv) in engine[1], engine

    def cli(*args) -> subprocess.CompletedProcess:
        return _run([km_edge, *args], cwd=demo_project.root)

    assert "run" in cli("--help").stdout

    image = sorted((demo_project.data / "letters" / "val").rglob("*.png"))[0]
    ran = json.loads(cli("run", "--pack", letters_pack.pack, image, "--top-k", "3", "--json").stdout)
    assert ran["pack"]["task"] == "letters" and len(ran["predictions"][0]["top"]) == 3

    val_dir = demo_project.data / "letters" / "val"
    evaluated = json.loads(cli("eval", "--pack", letters_pack.pack, val_dir, "--json").stdout)
    n = len(list(val_dir.rglob("*.png")))
    assert evaluated["n_images"] == n
    host_correct = round(letters_pack.pack_report["host_val_accuracy"] * n)
    assert abs(round(evaluated["accuracy"] * n) - host_correct) <= images_allowed(n)
    # the same logits as the development install's runtime, image by image
    script = ("import json, sys, numpy as np; from device_runtime import Runtime; "
              "from device_runtime.keys import load_trusted_keys; "
              "from device_runtime.preprocess import load_image, preprocess; "
              "r = Runtime(sys.argv[1], load_trusted_keys([sys.argv[2]])); r.load_pack(sys.argv[3]); "
              "b = np.stack([preprocess(load_image(p), r.preprocess_spec) for p in sys.argv[4:]]); "
              "print(json.dumps(r.logits(b).tolist()))")
    images = [str(p) for p in sorted(val_dir.rglob("*.png"))[:16]]
    args = [demo_project.base_dir, demo_project.keys / "signing.pub", letters_pack.pack, *images]
    installed = np.array(json.loads(_run([python, "-c", script, *args], cwd=device_venv).stdout))
    from device_runtime import Runtime
    from device_runtime.keys import load_trusted_keys
    from device_runtime.preprocess import load_image, preprocess

    runtime = Runtime(demo_project.base_dir, load_trusted_keys([demo_project.keys / "signing.pub"]))
    runtime.load_pack(letters_pack.pack)
    here = runtime.logits(np.stack([preprocess(load_image(p), runtime.preprocess_spec) for p in images]))
    assert_same_predictions(here, installed, atol=1e-5)

    verified = json.loads(cli("verify", letters_pack.pack, "--json").stdout)
    assert verified["ok"] is True and verified["base_checked"] is True
    assert "letters" in cli("inspect", letters_pack.pack).stdout

    # a host command says what is missing instead of crashing with a traceback
    host = subprocess.run([km_edge, "train", "--task", "letters"], cwd=demo_project.root,
                          capture_output=True, text=True)
    assert host.returncode == 2, (host.returncode, host.stderr)
    assert host.stderr.strip().splitlines() == [
        "km-edge: error: 'train' runs on the host and needs torch: pip install 'km-edge[train]'"]
