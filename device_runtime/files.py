"""Bounded reads and atomic writes of the files km-edge keeps (keys, manifests, trust lists, packs).

Reads: :func:`read_bounded` never reads more than a limit (an endless special file or a huge file
is refused, not read) and turns every OS failure into the caller's error class, one line naming
the file. Writes: a crash, a signal or a refusal never leaves a half-written pack, base or key.

The data goes to a hidden temporary file beside the destination (``.NAME.<pid>.<random>.tmp``),
is fsynced and renamed over the destination. The temporary file is removed when the write fails,
on Ctrl-C (KeyboardInterrupt) and on SIGTERM/SIGHUP (turned into SystemExit for the duration of
the write when the process has no handler of its own). A run killed outright (SIGKILL, power loss)
cannot clean up, so every write first removes the stale temporary files of the same destination
left by writers that are no longer running. Any OS failure (permissions, a file where a folder
should be, a full disk) is an :class:`OutputError` naming the destination.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError

__all__ = ["read_bounded", "write_atomic", "remove_stale_temporaries"]

# temporary files without a writer's pid in their name (older km-edge) count as stale after this
STALE_AFTER_S = 3600
_CLEANUP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def read_bounded(path: str | os.PathLike, limit: int, error: type[Exception], what: str,
                 missing: str | None = None, label: str | None = None) -> bytes:
    """The bytes of ``path`` if it holds at most ``limit`` of them; otherwise, and for a missing,
    unreadable or directory path, ``error`` with one line naming the file as ``label`` (the path by
    default). ``missing`` replaces the "WHAT not found" wording, e.g. to say which command makes the
    file. A file whose size says it is too large is refused unread."""
    label = label or str(path)
    too_large = f"{label}: larger than {_amount(limit)}, not a {what}"
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size > limit:
                raise error(too_large)
            data = handle.read(limit + 1)  # one byte past the limit: an endless special file is refused
    except FileNotFoundError:
        raise error(f"{label}: {missing or what + ' not found'}") from None
    except IsADirectoryError:
        raise error(f"{label}: is a directory, not a {what}") from None
    except OSError as exc:
        raise error(f"{label}: cannot read {what} ({' '.join(str(exc.strerror or exc).split())})") from None
    if len(data) > limit:
        raise error(too_large)
    return data


def _amount(n_bytes: int) -> str:
    return f"{n_bytes // 2**20} MiB" if n_bytes >= 2**20 and n_bytes % 2**20 == 0 else f"{n_bytes:,} bytes"


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # someone else's live process (or not a pid at all)
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove ``.NAME.<pid>.*.tmp`` files beside ``path`` whose writer is gone (and pid-less ones
    older than ``STALE_AFTER_S``); returns what was removed. Never raises for a file it cannot
    remove."""
    path = Path(path)
    prefix, removed = _temp_prefix(path), []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        writer = name[len(prefix):-len(".tmp")].split(".")[0]
        try:
            if writer.isdigit():
                stale = not _pid_alive(int(writer))
            else:
                stale = time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
            if stale and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def _exit_on_signal(signum, frame):  # noqa: ARG001 - signal handler signature
    raise SystemExit(128 + signum)


@contextmanager
def _signals_clean_up():
    """While the temporary file exists, SIGTERM/SIGHUP raise SystemExit so ``finally`` runs.

    Only where Python can install handlers (the main thread) and only for signals that still have
    the default action: a program's own handlers are left alone.
    """
    replaced = {}
    if threading.current_thread() is threading.main_thread():
        for sig in _CLEANUP_SIGNALS:
            if signal.getsignal(sig) is signal.SIG_DFL:
                replaced[sig] = signal.signal(sig, _exit_on_signal)
    try:
        yield
    finally:
        for sig, previous in replaced.items():
            signal.signal(sig, previous)


def write_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``.

    Raises :class:`OutputError` if the destination cannot be written; ``path`` is then unchanged.
    """
    path = Path(path)
    tmp_name = None
    with _signals_clean_up():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(path)
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f"{_temp_prefix(path)}{os.getpid()}.",
                                            suffix=".tmp")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp_name, mode)
            os.replace(tmp_name, path)
            tmp_name = None
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror or type(exc).__name__})") from None
        finally:
            if tmp_name is not None and os.path.lexists(tmp_name):
                os.unlink(tmp_name)
    return path
