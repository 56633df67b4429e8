"""The tasks a server answers for: one verified pack per task, swapped atomically on updates.

The packs folder is the source of truth (Triton's model repository in poll mode): every scan looks
at each ``*.kmp`` whose size, mtime or inode changed, verifies it and, when it is a newer version of
its task, builds its session and swaps it in with one dictionary assignment. A request takes the
task's entry once and finishes on it, so an update never fails a request in flight. A refused file
(bad signature, untrusted key, other base, malformed, not newer, older than the device's recorded
version) is logged once with its one-line reason and counted; the served version keeps serving.

At most ``cache_size`` tasks keep a live onnxruntime session; the least recently used one is
dropped and rebuilt from the pack bytes kept here on its next request (a cache miss).
"""

from __future__ import annotations

import hashlib
import logging
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..errors import (
    BadSignatureError,
    BaseMismatchError,
    DowngradeError,
    KmEdgeError,
    MalformedPackError,
    NonFiniteError,
    NotNewerError,
    RollbackError,
    ShapeMismatchError,
    StateError,
    UnknownFormatError,
    UntrustedKeyError,
    with_remedy,
)
from ..pack import read_pack, read_pack_file
from ..runtime import LoadedPack, Runtime

__all__ = ["PackCatalog", "ServedPack", "Refusal", "TaskNotFound", "TaskRefused", "refusal_reason"]

log = logging.getLogger(__name__)
PACK_SUFFIX = ".kmp"
MAX_NAME_SHOWN = 80  # characters of a requested task name echoed in an error

# Refusal reason labels (the `reason` label of km_edge_pack_refusals_total), most specific first.
REFUSAL_REASONS = (
    (RollbackError, "rollback"),
    (DowngradeError, "downgrade"),
    (NotNewerError, "not_newer"),
    (BadSignatureError, "bad_signature"),
    (UntrustedKeyError, "untrusted_key"),
    (BaseMismatchError, "base_mismatch"),
    (ShapeMismatchError, "shape_mismatch"),
    (NonFiniteError, "not_finite"),
    (UnknownFormatError, "unknown_format"),
    (MalformedPackError, "malformed"),
    (StateError, "state_error"),
    (KmEdgeError, "refused"),
)


def refusal_reason(exc: BaseException) -> str:
    for kind, reason in REFUSAL_REASONS:
        if isinstance(exc, kind):
            return reason
    return "internal"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class TaskNotFound(KmEdgeError):
    """No pack of this task is loaded, and no file for it was refused."""


class TaskRefused(KmEdgeError):
    """No pack of this task is loaded because its file was refused (the message says why)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class ServedPack:
    """A task's accepted pack: its verified content, exact bytes and (while cached) its session."""

    pack: object
    data: bytes
    sha256: str
    path: Path
    loaded_at: str
    loaded: LoadedPack | None = None

    @property
    def task(self) -> str:
        return self.pack.task

    @property
    def version(self) -> int:
        return int(self.pack.pack_version)

    def describe(self) -> dict:
        pack = self.pack
        return {
            "task": pack.task, "pack_version": self.version, "base_id": pack.base_id,
            "labels": list(pack.labels), "key_id": pack.key_id, "created": pack.created,
            "loaded_at": self.loaded_at, "file": self.path.name, "sha256": self.sha256,
            "session_cached": self.loaded is not None,
        }


@dataclass
class Refusal:
    file: str
    task: str
    reason: str
    message: str
    at: str = field(default_factory=_now)

    def describe(self) -> dict:
        return {"file": self.file, "task": self.task, "reason": self.reason, "message": self.message,
                "at": self.at}


@dataclass
class _FileSeen:
    signature: tuple | None  # (mtime_ns, size, inode) when last examined
    task: str | None = None  # the task its pack named, once known


class PackCatalog:
    """Served packs by task, fed by :meth:`scan` of ``packs_dir`` (the poller calls it)."""

    def __init__(self, runtime: Runtime, packs_dir: str | Path, *, cache_size: int = 8,
                 unload_removed: bool = True, metrics=None):
        self.runtime = runtime
        self.packs_dir = Path(packs_dir)
        self.cache_size = max(1, int(cache_size))
        self.unload_removed = unload_removed
        self.metrics = metrics
        self._tasks: dict[str, ServedPack] = {}
        self._sessions: OrderedDict[str, None] = OrderedDict()  # tasks with a live session, LRU first
        self._refusals: dict[str, Refusal] = {}  # file name -> its latest refusal
        self._files: dict[Path, _FileSeen] = {}
        self._lock = threading.Lock()  # guards the dicts above; never held while building
        self._build_lock = threading.Lock()  # Runtime.load_pack is not thread-safe
        self._scan_lock = threading.Lock()  # one scan at a time
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # --- what requests see ----------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return bool(self._tasks)

    def served(self) -> list[ServedPack]:
        with self._lock:
            return sorted(self._tasks.values(), key=lambda s: s.task)

    def refusals(self) -> list[Refusal]:
        with self._lock:
            return sorted(self._refusals.values(), key=lambda r: r.file)

    def lookup(self, task: str) -> ServedPack:
        """The task's served pack; TaskRefused if its only file was refused, else TaskNotFound."""
        with self._lock:
            served = self._tasks.get(task)
            if served is not None:
                return served
            refused = [r for r in self._refusals.values() if r.task == task]
        if refused:
            latest = max(refused, key=lambda r: r.at)
            raise TaskRefused(f"task {task!r} is not loaded: {latest.message}", latest.reason)
        raise TaskNotFound(f"no task {task[:MAX_NAME_SHOWN]!r} is loaded (GET /v1/tasks lists them)")

    def session(self, task: str) -> tuple[ServedPack, LoadedPack]:
        """The task's current pack and a live session for it (rebuilt here after an eviction)."""
        served = self.lookup(task)
        with self._lock:
            loaded = served.loaded
            if loaded is not None:
                if task in self._sessions:
                    self._sessions.move_to_end(task)
                self._count("cache_hits")
                return served, loaded
        self._count("cache_misses")
        with self._build_lock:
            served = self.lookup(task)  # the newest, should an update have landed meanwhile
            loaded = served.loaded  # or built by another request while this one waited
            if loaded is None:
                loaded = self.runtime.load_pack(served.path, data=served.data)
        with self._lock:
            if self._tasks.get(task) is served and served.loaded is None:
                served.loaded = loaded
                self._remember_session(task)
        return served, loaded

    # --- scanning -------------------------------------------------------------------------
    def scan(self) -> dict:
        """Examine new or changed files and removed ones; returns what changed (for logs/tests)."""
        with self._scan_lock:
            changes = {"loaded": [], "refused": [], "unloaded": []}
            try:
                candidates = sorted(p for p in self.packs_dir.iterdir()
                                    if p.name.endswith(PACK_SUFFIX) and not p.name.startswith("."))
            except OSError as exc:
                log.error("cannot list the packs folder %s (%s); keeping the served packs",
                          self.packs_dir, exc.strerror or exc)
                return changes
            present = set()
            for path in candidates:
                try:
                    info = path.stat()
                except OSError:
                    continue  # removed between listing and stat: the next scan sees it gone
                if not stat.S_ISREG(info.st_mode):
                    continue
                present.add(path)
                signature = (info.st_mtime_ns, info.st_size, info.st_ino)
                seen = self._files.setdefault(path, _FileSeen(None))
                if seen.signature == signature:
                    continue
                seen.signature = signature
                self._consider(path, seen, changes)
            for path in [p for p in self._files if p not in present]:
                self._forget(path, changes)
            return changes

    def _consider(self, path: Path, seen: _FileSeen, changes: dict) -> None:
        task = path.name[: -len(PACK_SUFFIX)]
        try:
            data = read_pack_file(path)
            digest = hashlib.sha256(data).hexdigest()
            with self._lock:
                if any(s.sha256 == digest for s in self._tasks.values()):
                    return  # the same bytes are being served already (a copy, a touch)
            pack = read_pack(data, self.runtime.trusted_keys, name=path.name)
            task = seen.task = pack.task
            current = self._tasks.get(task)
            if current is not None and pack.pack_version < current.version:
                raise DowngradeError(
                    f"{path.name}: pack version {pack.pack_version} of task {task!r} is older than "
                    f"version {current.version} being served ({current.path.name})")
            if current is not None and pack.pack_version == current.version:
                raise NotNewerError(
                    f"{path.name}: pack version {pack.pack_version} of task {task!r} is the version "
                    f"being served ({current.path.name}) with other content; an update needs a "
                    "higher version")
            with self._build_lock:
                # probed: a pack whose scores overflow is refused here, never swapped in
                loaded = self.runtime.load_pack(path, data=data, probe=True)
                # swapped in before the lock goes: a rebuild never sees the Runtime ahead of the table
                self._install(ServedPack(loaded.pack, data, digest, path, _now(), loaded), changes)
        except Exception as exc:  # noqa: BLE001 - the poller must outlive any bad file
            self._refuse(path, task, exc, changes)

    def _install(self, served: ServedPack, changes: dict) -> None:
        with self._lock:
            previous = self._tasks.get(served.task)
            self._tasks[served.task] = served  # the swap: new requests use it from here on
            self._refusals.pop(served.path.name, None)
            self._remember_session(served.task)
        if self.metrics is not None:
            self.metrics.pack_loads.inc(task=served.task)
        was = f" (was v{previous.version} from {previous.path.name})" if previous else ""
        log.info("loaded task %s v%d from %s%s", served.task, served.version, served.path.name, was)
        changes["loaded"].append(served.describe())

    def _refuse(self, path: Path, task: str, exc: BaseException, changes: dict) -> None:
        reason = refusal_reason(exc)
        # the operator reads the way out here as a CLI user does on stderr
        text = with_remedy(exc) if isinstance(exc, KmEdgeError) else str(exc)
        message = " ".join(text.split()) or type(exc).__name__
        if reason == "internal":
            log.exception("internal error while loading %s", path.name)
            message = f"{path.name}: internal error: {type(exc).__name__}: {message}"
        refusal = Refusal(path.name, task, reason, message)
        with self._lock:
            self._refusals[path.name] = refusal
        if self.metrics is not None:
            self.metrics.refusals.inc(reason=reason)
        log.warning("refused %s [%s]: %s", path.name, reason, message)
        changes["refused"].append(refusal.describe())

    def _forget(self, path: Path, changes: dict) -> None:
        self._files.pop(path, None)
        with self._lock:
            self._refusals.pop(path.name, None)
            gone = [s for s in self._tasks.values() if s.path == path] if self.unload_removed else []
            for served in gone:
                del self._tasks[served.task]
                self._sessions.pop(served.task, None)
        for served in gone:
            log.info("unloaded task %s: %s was removed", served.task, path.name)
            if self.metrics is not None:
                self.metrics.unloads.inc(task=served.task)
            changes["unloaded"].append(served.task)
            # another file of this task may now be its newest acceptable pack: look at it again
            for other in self._files.values():
                if other.task in (served.task, None):
                    other.signature = None

    def _remember_session(self, task: str) -> None:
        """Mark ``task``'s session most recently used; drop the oldest beyond the cache size."""
        self._sessions[task] = None
        self._sessions.move_to_end(task)
        while len(self._sessions) > self.cache_size:
            evicted, _ = self._sessions.popitem(last=False)
            if evicted in self._tasks:
                self._tasks[evicted].loaded = None

    def _count(self, name: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).inc()

    # --- polling --------------------------------------------------------------------------
    def start_polling(self, interval_s: float) -> None:
        """Scan every ``interval_s`` seconds in a background thread until :meth:`stop_polling`."""
        def loop():
            while not self._stop.wait(interval_s):
                try:
                    self.scan()
                except Exception:  # noqa: BLE001 - keep polling; the next scan may succeed
                    log.exception("pack folder scan failed")

        self._stop.clear()
        self._poller = threading.Thread(target=loop, name="km-edge-pack-poller", daemon=True)
        self._poller.start()

    def stop_polling(self) -> None:
        """Stop the poller after its current scan (a pack load in progress completes)."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join()
            self._poller = None
