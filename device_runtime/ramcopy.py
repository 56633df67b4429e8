"""The base's graph and weights copied to a RAM file system, for the sessions of pack loads to read.

Why: onnxruntime creates a session faster when it reads a conv kernel from the graph's own weights
file than when the same kernel is handed over with ``add_external_initializers`` (resnet18: 148 ms
against 156-161 ms, the kernels being the same bytes; ``benchmarks/results/device.md``). So on the
CPU provider a Runtime copies base.onnx and base.weights once into a private folder on a RAM file
system, rebuilds the kernels onnxruntime fuses at load straight into that copy of base.weights, at
their own offsets, and creates the session from the copy: what a plain session of the base does,
with the task's kernels. Only those kernels are ever written, and no session reads them once it
exists (``backends.fused_at_load``), so the next load may overwrite them; kernels onnxruntime keeps
using and a pack's BatchNorm tensors still go through ``add_external_initializers``.

The folder (mode 0700) holds a lock for as long as its Runtime lives; it is removed when the Runtime
is collected or the process exits, and a folder whose lock nobody holds (its process died) is removed
by the next Runtime that makes one. Where no RAM folder can be had (not Linux, no /dev/shm, not
enough room, ``KM_EDGE_RAM_DIR=off``) the runtime hands every kernel over in memory: the same
numbers, a slower session.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np

__all__ = ["RamCopy", "create", "ENV", "DEFAULT_DIR"]

ENV = "KM_EDGE_RAM_DIR"  # a folder on a RAM file system for the copy, or "off"
DEFAULT_DIR = "/dev/shm"
PREFIX = "km-edge-"
LOCK_FILE = "lock"
HEADROOM_BYTES = 16 * 2**20  # left free on the RAM file system for everyone else
_STALE_UNLOCKED_S = 60.0  # a folder with no lock file yet may be one another process is creating


class RamCopy:
    """A private copy of one base's graph and weights in RAM; see the module docstring."""

    def __init__(self, folder: Path, graph_path: Path, floats: np.ndarray, offsets: dict[str, int],
                 base_kernels: dict[str, np.ndarray], lock_fd: int):
        self.folder = folder
        self.graph_path = graph_path  # what the sessions of pack loads are created from
        self._floats = floats  # float32 view of the whole copy of base.weights (shared mapping)
        self._offsets = offsets  # conv layer -> first element of its kernel in _floats
        self._base_kernels = base_kernels
        self._placed: set[str] = set()  # layers whose kernel in the copy may differ from the base's
        self._finalizer = weakref.finalize(self, _remove, folder, lock_fd, os.getpid())

    def place(self, names: list[str]) -> tuple[np.ndarray, list[int]]:
        """The float32 buffer and element offsets where the kernels of ``names`` are to be written.
        Every other kernel an earlier call placed is restored to the base's first, so once they
        are written the copy is the base with exactly ``names`` replaced."""
        for name in self._placed.difference(names):
            start = self._offsets[name]
            kernel = self._base_kernels[name]
            self._floats[start:start + kernel.size] = kernel.reshape(-1)
        self._placed = set(names)
        return self._floats, [self._offsets[name] for name in names]

    def close(self) -> None:
        """Remove the folder now (it is also removed when the copy is collected)."""
        self._finalizer()


def create(base) -> tuple[RamCopy | None, str]:
    """A RAM copy of ``base`` (a :class:`device_runtime.basefiles.Base`), or None and why not."""
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in ("off", "0", "no"):
        return None, f"{ENV}={setting}"
    parent = Path(setting or DEFAULT_DIR)
    try:
        import fcntl
    except ImportError:  # Windows
        return None, "no RAM file system support on this platform"
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return None, f"{parent} is not a writable folder (set {ENV} to a RAM folder)"
    _remove_stale(parent, fcntl)
    graph_bytes, weights_bytes = base.manifest["graph_bytes"], base.manifest["weights_bytes"]
    free = shutil.disk_usage(parent).free
    if free < graph_bytes + weights_bytes + HEADROOM_BYTES:
        return None, (f"{parent} has {free // 2**20} MiB free, the copy needs "
                      f"{(graph_bytes + weights_bytes) // 2**20} MiB and {HEADROOM_BYTES // 2**20} to spare")
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent))
    lock_fd = -1
    try:
        lock_fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        graph_path = folder / base.graph_path.name
        weights_path = folder / base.weights_path.name
        # written out in full, so every page exists: writes through the mapping below can never
        # meet a full file system (a SIGBUS, where a write() would only fail)
        shutil.copyfile(base.graph_path, graph_path)
        shutil.copyfile(base.weights_path, weights_path)
        base.check_unchanged()  # the copies are of the files base_id was verified against
        floats = np.zeros(0, dtype=np.float32)
        if weights_bytes >= 4:
            mapped = np.memmap(weights_path, dtype=np.uint8, mode="r+")
            floats = np.asarray(mapped[:weights_bytes // 4 * 4]).view(np.float32)
    except OSError as error:
        _remove(folder, lock_fd)
        return None, f"could not copy the base to {parent}: {error.strerror or error}"
    except BaseException:
        _remove(folder, lock_fd)
        raise
    offsets = {name: offset // 4 for name, offset in base.conv_offsets().items()}
    return RamCopy(folder, graph_path, floats, offsets, base.conv_kernels(), lock_fd), f"copy in {folder}"


def _remove(folder: Path, lock_fd: int, owner: int | None = None) -> None:
    if owner is not None and owner != os.getpid():
        return  # a forked child exiting: the folder is its parent's
    shutil.rmtree(folder, ignore_errors=True)
    if lock_fd >= 0:
        os.close(lock_fd)  # after the removal, so no other process takes the folder for stale


def _remove_stale(parent: Path, fcntl) -> None:
    """Remove this user's copies whose lock nobody holds: their processes are gone."""
    try:
        entries = [entry for entry in os.scandir(parent) if entry.name.startswith(PREFIX)]
    except OSError:
        return
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            status = entry.stat()
            if status.st_uid != os.getuid():
                continue
            lock_path = Path(entry.path) / LOCK_FILE
            if not lock_path.exists():
                if time.time() - status.st_mtime > _STALE_UNLOCKED_S:
                    shutil.rmtree(entry.path, ignore_errors=True)
                continue
            fd = os.open(lock_path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # held: a live Runtime's
            continue
        _remove(Path(entry.path), fd)
