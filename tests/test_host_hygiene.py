"""Host hygiene: task names cannot leave their folders, temporary files never outlive a write, and
an unwritable destination is bad input (exit 2), not an internal error.

Issue 12: ``--task ../../evil_task`` wrote outside the project (exit 0), ``letters/../letters``
overwrote ``packs/letters.kmp`` with a pack whose signed task name differed, a read-only output
gave exit 1, and a killed ``km-edge pack`` left a hidden ``.NAME.kmp.XXXX.tmp`` nothing removed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from device_runtime.errors import OutputError
from device_runtime.files import STALE_AFTER_S, write_atomic
from device_runtime.text import check_task_name, printable

from conftest import run_cli
from test_cli_bad_input import TASK, files_of, project, refuse, template  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[1]


# --- task names --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../evil_task", "/etc", f"{TASK}/../{TASK}", "..", ".hidden",
                                  "-rf", "a b", "x" * 65, "tab\there", "esc\x1b[31m", ""])
def test_unsafe_task_names_are_refused(name):
    with pytest.raises(ValueError, match="task name"):
        check_task_name(name)


@pytest.mark.parametrize("name", ["letters", "my-task_2.v1", "A", "x" * 64])
def test_ordinary_task_names_are_accepted(name):
    assert check_task_name(name) == name


@pytest.mark.parametrize("command", ["train", "pack"])
@pytest.mark.parametrize("name", ["../../evil_task", "/etc", f"{TASK}/../{TASK}"])
def test_task_name_cannot_leave_the_project(project, tmp_path, command, name):
    # the data a traversal would find exists, so only the name rule stands in the way
    outside = (project / "data" / name).resolve()
    if not name.startswith("/") and not outside.exists():
        shutil.copytree(project / "data" / TASK, outside)
    around = files_of(tmp_path)
    line = refuse(project, command, "--task", name, "--max-steps", 1, words=("task name",))
    assert "not allowed" in line
    assert files_of(tmp_path) == around  # nothing written anywhere near the project either


def test_unwritable_destination_is_exit_2(project):
    from km_edge.config import random_base_name
    from km_edge.models import create_random_base

    create_random_base(project / "bases" / random_base_name("demo"), "demo", 32)  # as a first build would
    (project / "in-the-way").write_text("a file where a folder should be")
    refuse(project, "export-base", "--arch", "demo", "--weights", "none",
           "--out", "in-the-way/base", words=("in-the-way", "cannot write"))


# --- write_atomic ----------------------------------------------------------------------------------
def test_write_into_a_file_path_is_an_output_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot write"):
        write_atomic(tmp_path / "file" / "pack.kmp", b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_next_write_removes_stale_temporaries_of_dead_writers(tmp_path):
    target = tmp_path / "letters.kmp"
    dead = tmp_path / f".letters.kmp.{_dead_pid()}.k2j4h1.tmp"
    live = tmp_path / f".letters.kmp.{os.getppid()}.a8d7f0.tmp"      # a running writer's
    old = tmp_path / ".letters.kmp.x7yq2m0f.tmp"                      # pid-less, from older km-edge
    fresh = tmp_path / ".letters.kmp.p3rz8w1q.tmp"
    other = tmp_path / f".shapes.kmp.{_dead_pid()}.q1w2e3.tmp"       # another destination's
    for path in (dead, live, old, fresh, other):
        path.write_bytes(b"half a pack")
    long_ago = time.time() - STALE_AFTER_S - 60
    os.utime(old, (long_ago, long_ago))
    write_atomic(target, b"the pack")
    assert target.read_bytes() == b"the pack"
    assert not dead.exists() and not old.exists()
    assert live.exists() and fresh.exists() and other.exists()


SLOW_WRITER = textwrap.dedent("""
    import os, signal, sys, time
    import device_runtime.files as files

    # Ctrl-C as in a foreground terminal, even when the test run itself was started in the
    # background (a shell's `cmd &` starts it with SIGINT ignored, and children inherit that)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def slow_fsync(fd):  # stands for a large write: the temporary file exists, the rename not yet
        print("writing", flush=True)
        time.sleep(60)

    files.os.fsync = slow_fsync
    try:
        files.write_atomic(sys.argv[1], b"x" * 1000)
    except KeyboardInterrupt:
        sys.exit(130)
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_a_write_leaves_no_temporary_file(tmp_path, signum):
    target = tmp_path / "letters.kmp"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "writing"
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # mid-write
        child.send_signal(signum)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode in (128 + signum, -signum) and child.returncode != 0
    assert child.returncode == 128 + signum, child.stderr.read()  # cleaned up, not killed outright
    assert list(tmp_path.iterdir()) == []


# --- printing -------------------------------------------------------------------------------------
def test_printable_escapes_controls_and_cuts_long_values():
    assert printable("ant\x1b[31mred\nx") == "ant\\x1b[31mred\\x0ax"
    assert printable("evil\u202etxt.exe") == "evil\\u202etxt.exe"   # bidi override
    shown = printable("t" * 100_000)
    assert len(shown) < 300 and shown.endswith("...[99800 more characters]")
    assert printable("café ✓") == "café ✓"


@pytest.mark.parametrize("command", [("keygen", "--keys-dir", "in-the-way/keys"), ("init", "in-the-way/project")])
def test_keygen_and_init_into_a_blocked_path_are_exit_2(tmp_path, command):
    """A file where the keys folder (or the project) should go: one line naming it, exit 2."""
    (tmp_path / "in-the-way").write_text("a file where a folder should be")
    result = run_cli(*command, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "in-the-way" in lines[0] and "internal error" not in lines[0]
