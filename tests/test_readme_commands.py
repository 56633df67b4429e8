"""Every `km-edge ...` command in README.md's code blocks runs, so the README cannot drift.

The commands are extracted from the README itself and must be exactly the ones listed in
``COMMANDS`` below (a command added to or changed in the README fails the test until it is listed
here, with where it runs and the exit code it must give). They run as a user would, through the
`km-edge` console script, on the README's own story: `km-edge init birds ...`, the photos in
`data/birds/` (here the demo `letters` images), export, train, pack on the host; then the device
commands in a folder holding only what "On the device" says to copy (base/, keys/signing.pub, the
pack). To keep it to a minute, the project's km-edge.toml is switched to the tiny built-in `demo`
base with random weights and two training steps (the README: "the built-in `demo` net is a tiny
base for fast tests"); every command line is run as printed, except where ``COMMANDS`` states why.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import KM_EDGE, run_cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS_WITH_PYTHON = (ROOT / "README.md", ROOT / "packs" / "README.md")

# Where each README command runs, in this order, and the exit code it must give:
#   parent  the folder `km-edge init birds` runs in
#   project the birds/ project it makes (host)
#   scratch a fresh empty folder of its own (another project's `init`)
#   device  a folder with only base/, keys/signing.pub, birds.kmp and the images the commands name
COMMANDS = [
    ("km-edge init birds --arch efficientnet_lite0 --weights imagenet", "parent", 0),
    ("km-edge init cars --arch timm:mobilenetv3_large_100 --weights pretrained", "scratch", 0),
    ("km-edge init cars --arch timm:regnetx_002 --weights regnetx_002.pth", "scratch", 0),
    ("km-edge export-base", "project", 0),
    ("km-edge train --task birds", "project", 0),
    ("km-edge pack --task birds", "project", 0),
    ("km-edge eval --pack packs/birds.kmp data/birds/val", "project", 0),
    ("km-edge run --pack packs/birds.kmp image.jpg", "project", 0),
    ("km-edge run --pack birds.kmp photo1.jpg photo2.jpg --top-k 3", "device", 0),
    ("km-edge run --pack birds.kmp photo.jpg --json", "device", 0),
    ("km-edge eval --pack birds.kmp labelled-folder/", "device", 0),
    ("km-edge verify birds.kmp", "device", 0),
    ("km-edge verify birds.kmp --probe", "device", 0),
    ("km-edge inspect birds.kmp", "device", 0),
    # `serve` runs until stopped: started with `--port 0 --json` added (8080 may be taken on a
    # shared test machine; the JSON line names the port it got), answered once, then SIGTERM: exit 0
    ("km-edge serve --base base --packs packs --pubkey keys/signing.pub", "serve", 0),
]
IMAGES = ("image.jpg", "photo1.jpg", "photo2.jpg", "photo.jpg")


def readme_commands(text: str) -> list[str]:
    """`km-edge ...` lines of the fenced code blocks, comments removed, in order, without repeats."""
    commands = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("km-edge ") and line not in commands:
                commands.append(line)
    return commands


def test_the_test_runs_every_command_the_readme_shows():
    """A README command without an entry in COMMANDS (or an entry the README lost) fails here."""
    shown, listed = readme_commands(README.read_text()), [c for c, _, _ in COMMANDS]
    assert not set(shown) - set(listed), f"README commands the test does not run: {set(shown) - set(listed)}"
    assert not set(listed) - set(shown), f"commands the README no longer shows: {set(listed) - set(shown)}"
    assert len(listed) == len(set(listed))


def test_python_snippets_in_the_readmes_import_what_exists():
    """`from X import a, b` in the READMEs' Python blocks: every module and name exists."""
    import importlib

    checked = 0
    for doc in DOCS_WITH_PYTHON:
        for block in re.findall(r"^```python\n(.*?)^```", doc.read_text(), flags=re.S | re.M):
            for module, names in re.findall(r"^from ([\w.]+) import ([\w, ]+)$", block, flags=re.M):
                if module.split(".")[0] not in ("device_runtime", "km_edge"):
                    continue
                imported = importlib.import_module(module)
                for name in (n.strip() for n in names.split(",")):
                    assert hasattr(imported, name), f"{doc.name}: {module} has no {name}"
                    checked += 1
    assert checked >= 5


def _switch_to_demo_base(project: Path) -> None:
    """The project `init` wrote, on the tiny demo base with random weights and two training steps."""
    config = (project / "km-edge.toml").read_text()
    config = re.sub(r'(?m)^arch = .*$', 'arch = "demo"', config, count=1)
    config = re.sub(r'(?m)^weights = .*$', 'weights = "none"', config, count=1)
    config = re.sub(r'(?m)^input_size = .*$', "input_size = 32", config, count=1)
    config = re.sub(r'(?m)^device = .*$', 'device = "cpu"', config, count=1)
    config = re.sub(r'(?m)^batch_size = .*$', "batch_size = 16", config, count=1)
    config = re.sub(r'(?m)^epochs = .*$', "epochs = 1\nmax_steps = 2", config, count=1)
    assert 'arch = "demo"' in config and "max_steps = 2" in config
    (project / "km-edge.toml").write_text(config)


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    args = shlex.split(command)
    assert args[0] == "km-edge"
    return run_cli(*args[1:], cwd=cwd)


def _serve_once(command: str, cwd: Path) -> tuple[int, dict, str]:
    """Start `serve`, read its JSON ready line, ask /v1/tasks, stop it with SIGTERM."""
    import urllib.request

    args = [KM_EDGE, *shlex.split(command)[1:], "--port", "0", "--json"]
    process = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = json.loads(process.stdout.readline() or "{}")
        assert "listening" in ready, process.stderr.read() if process.poll() is not None else ready
        with urllib.request.urlopen(ready["listening"] + "/v1/tasks", timeout=30) as answer:
            tasks = json.loads(answer.read())
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode, tasks, process.stderr.read()


@pytest.mark.slow
def test_every_readme_command_runs_on_the_demo(tmp_path):
    if sorted(readme_commands(README.read_text())) != sorted(c for c, _, _ in COMMANDS):
        pytest.fail("README commands and COMMANDS differ: see test_the_test_runs_every_command_the_readme_shows")
    parent, device = tmp_path / "parent", tmp_path / "device"
    parent.mkdir()
    project = parent / "birds"
    results = {}
    for index, (command, where, expected) in enumerate(COMMANDS):
        if where == "scratch":
            cwd = tmp_path / f"scratch-{index}"
            cwd.mkdir()
        elif where == "device" and not device.exists():
            # what "On the device" copies: base/, the public key, the pack (as birds.kmp); and the images
            shutil.copytree(project / "base", device / "base")
            (device / "keys").mkdir(parents=True)
            shutil.copy(project / "keys" / "signing.pub", device / "keys" / "signing.pub")
            shutil.copy(project / "packs" / "birds.kmp", device / "birds.kmp")
            shutil.copytree(project / "data" / "birds" / "val", device / "labelled-folder")
            for name in IMAGES:
                shutil.copy(project / name, device / name)
            cwd = device
        else:
            cwd = {"parent": parent, "project": project, "device": device, "serve": project}[where]
        if where == "serve":
            code, tasks, stderr = _serve_once(command, cwd)
            assert code == expected, (command, stderr)
            assert [t["task"] for t in tasks["tasks"]] == ["birds"], tasks
            continue
        ran = _run(command, cwd)
        assert ran.returncode == expected, f"{command} (in {where}) exited {ran.returncode}:\n{ran.stderr}"
        assert "Traceback" not in ran.stderr
        results[command] = ran
        if command.startswith("km-edge init birds"):
            # the README: "put the photos in ImageFolder layout" -- the demo letters task stands in
            _switch_to_demo_base(project)
            made = run_cli("demo-data", tmp_path / "demo-data", "--scale", "0.2", cwd=tmp_path, check=True)
            assert made.returncode == 0
            shutil.copytree(tmp_path / "demo-data" / "letters", project / "data" / "birds")
            one = sorted((project / "data" / "birds" / "val").rglob("*.png"))[0]
            for name in IMAGES:  # the README's image names, as JPEG files
                from PIL import Image

                Image.open(one).convert("RGB").save(project / name, "JPEG")

    # what the README says those commands leave behind
    assert (project / "base" / "manifest.json").is_file()
    assert (project / "checkpoints" / "birds.pt").is_file()
    assert (project / "packs" / "birds.kmp").is_file()
    assert "accuracy" in results["km-edge eval --pack packs/birds.kmp data/birds/val"].stdout
    report = json.loads(results["km-edge run --pack birds.kmp photo.jpg --json"].stdout)
    assert {"pack", "backend", "predictions", "timings_ms"} <= set(report)
    top3 = results["km-edge run --pack birds.kmp photo1.jpg photo2.jpg --top-k 3"].stdout.splitlines()
    assert len(top3) == 2 and all(line.count(",") == 2 for line in top3)
    assert "OK" in results["km-edge verify birds.kmp"].stdout
    assert "scores a probe image finitely" in results["km-edge verify birds.kmp --probe"].stdout
    assert "labels" in results["km-edge inspect birds.kmp"].stdout
    for index, (command, where, _) in enumerate(COMMANDS):
        if where == "scratch":  # init only writes the settings and keys; nothing is downloaded
            made = tmp_path / f"scratch-{index}" / "cars"
            assert (made / "km-edge.toml").is_file() and (made / "keys" / "signing.key").is_file()
            assert not (made / "bases").exists()


def test_max_steps_past_the_epochs_reports_the_passes_it_made(tmp_path):
    """README: `--max-steps` trains exactly that many steps, overriding `--epochs`, and the report's
    `epochs` is the passes actually made (it printed the configured epochs before)."""
    from km_edge.demodata import write_demo_data
    from km_edge.options import TRAIN_DEFAULTS
    from km_edge.train import train_task

    write_demo_data(tmp_path / "data", seed=0, scale=0.2, progress=False)
    options = dict(TRAIN_DEFAULTS, epochs=1, batch_size=8, device="cpu")
    first = train_task("letters", tmp_path / "data" / "letters", {"arch": "demo", "input_size": 32}, options,
                       tmp_path / "one.pt", progress=False)
    per_epoch = first["steps"]
    assert first["epochs"] == 1 and per_epoch >= 1
    longer = train_task("letters", tmp_path / "data" / "letters", {"arch": "demo", "input_size": 32},
                        dict(options, max_steps=per_epoch + 1), tmp_path / "two.pt", progress=False)
    assert longer["steps"] == per_epoch + 1
    assert longer["epochs"] == 2


def test_design_citations_point_to_sections_that_exist():
    """Code, tests and READMEs cite docs/DESIGN.md by section (`DESIGN.md §8.3`, `#3-kernel-modulation`)."""
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    numbers = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", design, flags=re.M))
    anchors = {re.sub(r"[^\w\- ]", "", title).strip().lower().replace(" ", "-")
               for title in re.findall(r"^#{2,3} (.+)$", design, flags=re.M)}
    cited = 0
    for path in [*ROOT.glob("*.md"), *ROOT.glob("packs/*.md"), *ROOT.glob("device_runtime/**/*.py"),
                 *ROOT.glob("km_edge/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py")]:
        text = path.read_text()
        for number in re.findall(r"DESIGN\.md §(\d+(?:\.\d+)?)", text):
            assert number in numbers, f"{path.name} cites DESIGN.md §{number}, which does not exist"
            cited += 1
        for anchor in re.findall(r"DESIGN\.md#([\w-]+)", text):
            assert anchor in anchors, f"{path.name} links DESIGN.md#{anchor}, which does not exist"
            cited += 1
    assert cited >= 3
