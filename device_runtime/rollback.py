"""The device's persistent anti-rollback state: the highest pack version accepted per task and key.

Like a TUF client's trusted metadata, this small JSON file makes "never accept a version lower than
one already seen" hold across restarts: ``run``, ``eval``, ``verify`` and ``serve`` all check a pack
against it before using it, and every accepted pack raises the record. The file is written
atomically (temporary file in the same folder, fsync, rename, fsync of the folder) under an
exclusive lock, merging with what is on disk, so concurrent device processes never lose a record.

A corrupt or unreadable file is an error (``StateError``), never silently reset: resetting it would
re-open the very downgrade it exists to stop. How an operator rolls back on purpose is in the
README ("Rolling back on purpose"): sign the old content again as a new, higher version.

Where the file lives: ``--state FILE``, else ``$KM_EDGE_STATE``, else
``$XDG_STATE_HOME/km-edge/rollback.json`` (``~/.local/state/km-edge/rollback.json``).
"""

from __future__ import annotations

import contextlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from .errors import OutputError, RollbackError, StateError
from .files import write_atomic

try:  # POSIX; a platform without it gets no cross-process lock (devices are Linux)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = ["RollbackState", "default_state_path", "STATE_ENV", "STATE_FORMAT"]

STATE_ENV = "KM_EDGE_STATE"
STATE_FORMAT = "km-edge-rollback-state"
STATE_FORMAT_VERSION = 1
# One record is ~50 bytes; a megabyte is tens of thousands of tasks and keys.
MAX_STATE_BYTES = 1 * 2**20
_HEX = frozenset("0123456789abcdef")


def default_state_path() -> Path:
    """``$KM_EDGE_STATE``, else ``$XDG_STATE_HOME/km-edge/rollback.json`` (XDG default ~/.local/state)."""
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV])
    state_home = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state_home) / "km-edge" / "rollback.json"


class RollbackState:
    """The state file at ``path``; reads it on every check, so other processes' records count."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_path = self.path.with_name(f".{self.path.name}.lock")

    # --- reading ----------------------------------------------------------------------------
    def highest(self) -> dict[str, dict[str, int]]:
        """{task: {key_id: highest accepted pack_version}}; empty when the file does not exist yet.

        No lock needed: writers replace the file by an atomic rename, so a reader sees the old or
        the new document, never half of one (and reading creates nothing)."""
        return self._read()

    def recorded(self, task: str, key_id: str) -> int | None:
        return self.highest().get(task, {}).get(key_id)

    def check(self, pack, label: str) -> None:
        """Raise RollbackError if ``pack`` is older than the version recorded for its task and key."""
        recorded = self.recorded(pack.task, pack.key_id)
        if recorded is not None and int(pack.pack_version) < recorded:
            raise RollbackError(
                f"{label}: pack version {pack.pack_version} of task {pack.task!r} is older than "
                f"version {recorded} this device already accepted from key {pack.key_id} "
                f"(state file {self.path}); to roll back on purpose, sign the old content as "
                f"version {recorded + 1} or higher (on the host: `km-edge pack --task {pack.task} "
                f"--version {recorded + 1}`)"
            )

    # --- writing ----------------------------------------------------------------------------
    def record(self, pack) -> bool:
        """Raise the record for the pack's task and key to its version; True if the file changed."""
        task, signer, version = pack.task, pack.key_id, int(pack.pack_version)
        with self._locked():
            highest = self._read()  # under the lock: a record made meanwhile by another process counts
            if highest.get(task, {}).get(signer, 0) >= version:
                return False
            highest.setdefault(task, {})[signer] = version
            self._write(highest)
            return True

    # --- the file ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        """Exclusive lock (a lock file beside the state) around a read-modify-write."""
        if fcntl is None:
            yield
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self._lock_path, "a+b")
        except OSError as exc:
            raise StateError(self._cannot("lock", exc)) from None
        with handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _cannot(self, what: str, exc: OSError) -> str:
        return (f"cannot {what} the anti-rollback state file {self.path} ({exc.strerror or exc}); "
                f"point --state or {STATE_ENV} at a writable file")

    def _corrupt(self, reason: str) -> StateError:
        return StateError(
            f"anti-rollback state file {self.path} is corrupt ({reason}); it is never reset "
            "silently: restore it from a backup, or delete it deliberately to forget every recorded "
            f"version (see README, 'Rolling back on purpose'), or point --state (or {STATE_ENV}) at "
            "the right file"
        )

    def _read(self) -> dict[str, dict[str, int]]:
        try:
            with open(self.path, "rb") as handle:
                data = handle.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StateError(self._cannot("read", exc)) from None
        if len(data) > MAX_STATE_BYTES:
            raise self._corrupt(f"larger than {MAX_STATE_BYTES // 2**20} MiB")
        try:
            document = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise self._corrupt(f"not JSON: {' '.join(str(exc).split())}") from None
        return self._validate(document)

    def _validate(self, document) -> dict[str, dict[str, int]]:
        if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
            raise self._corrupt(f"not a {STATE_FORMAT} document")
        if document.get("format_version") != STATE_FORMAT_VERSION:
            raise self._corrupt(f"format_version {document.get('format_version')!r} is not "
                                f"{STATE_FORMAT_VERSION}")
        highest = document.get("highest")
        if not isinstance(highest, dict):
            raise self._corrupt("'highest' must be a map of task -> key id -> version")
        for task, by_key in highest.items():
            if not task or not isinstance(by_key, dict) or not by_key:
                raise self._corrupt(f"task {task!r} must map key ids to versions")
            for signer, version in by_key.items():
                if len(signer) != 16 or not set(signer) <= _HEX:
                    raise self._corrupt(f"task {task!r} has a bad key id {signer!r}")
                if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                    raise self._corrupt(f"task {task!r} key {signer} has a bad version {version!r}")
        return highest

    def _write(self, highest: dict[str, dict[str, int]]) -> None:
        document = {
            "format": STATE_FORMAT,
            "format_version": STATE_FORMAT_VERSION,
            "updated": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "highest": {task: dict(sorted(by_key.items())) for task, by_key in sorted(highest.items())},
        }
        try:
            write_atomic(self.path, (json.dumps(document, indent=2) + "\n").encode(), mode=0o644)
        except OutputError as exc:
            raise StateError(f"{exc}; point --state or {STATE_ENV} at a writable file") from None
        _fsync_directory(self.path.parent)  # the rename itself survives a power cut


def _fsync_directory(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the file itself is fsynced
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
