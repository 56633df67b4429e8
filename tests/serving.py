"""Helpers for the serve and rollback tests: a tiny device folder and a `km-edge serve` process.

The device is the hand-built ONNX base of ``test_device_runtime`` (no torch, exported in well under
a second) with real signed packs, so the HTTP tests exercise the whole path (verify, rebuild,
onnxruntime, head) in seconds. ``test_serve_real_pack`` checks the same server on a trained demo pack.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image
from test_device_runtime import export, make_pack

from device_runtime.basefiles import Base
from device_runtime.files import write_atomic
from device_runtime.keys import generate_keypair, load_private_key

KM_EDGE = str(Path(sys.executable).with_name("km-edge"))
START_TIMEOUT_S = 60
_STARTED: list[subprocess.Popen] = []


@atexit.register
def _stop_leftovers() -> None:
    """A test that failed before stopping its server must not leave it running."""
    for process in _STARTED:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@dataclass
class Device:
    """A device folder: base/, keys/, packs/, a state file and a few images."""

    root: Path

    def __post_init__(self):
        export(self.base_dir)
        generate_keypair(self.root / "keys")
        self.packs.mkdir()
        self.scratch.mkdir()
        self.images.mkdir()
        for index, colour in enumerate([(200, 10, 30), (10, 200, 30), (30, 10, 200)]):
            Image.new("RGB", (24, 20), colour).save(self.images / f"img{index}.png")
        self._base = Base.open(self.base_dir)
        self.signing_key = load_private_key(self.root / "keys" / "signing.key")

    @property
    def base_dir(self) -> Path:
        return self.root / "base"

    @property
    def packs(self) -> Path:
        return self.root / "packs"

    @property
    def scratch(self) -> Path:
        return self.root / "scratch"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def state(self) -> Path:
        return self.root / "state" / "rollback.json"

    @property
    def pubkey(self) -> Path:
        return self.root / "keys" / "signing.pub"

    def image_bytes(self, index: int = 0) -> bytes:
        return (self.images / f"img{index}.png").read_bytes()

    def pack_bytes(self, task: str, version: int, seed: int | None = None, key=None, **kwargs) -> bytes:
        """A real signed pack for the tiny base (seed decides its tensors)."""
        path = self.scratch / f"{task}-{version}-{seed}.kmp"
        make_pack(path, self._base, key or self.signing_key, task=task, version=version,
                  seed=version if seed is None else seed, **kwargs)
        return path.read_bytes()

    def drop(self, name: str, data: bytes) -> Path:
        """Put a pack into the packs folder the way operators should: atomically."""
        return write_atomic(self.packs / name, data)

    def cli(self, *args, state: Path | None = None) -> subprocess.CompletedProcess:
        """A device command on this folder (base, key and state given explicitly)."""
        return subprocess.run(
            [KM_EDGE, *map(str, args), "--base", self.base_dir, "--pubkey", self.pubkey,
             "--state", state or self.state],
            capture_output=True, text=True, cwd=self.root)


@dataclass
class Served:
    """A running `km-edge serve` process and an HTTP client for it."""

    process: subprocess.Popen
    url: str
    log_path: Path
    token: str | None = None
    client: httpx.Client = field(init=False)

    def __post_init__(self):
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=30.0)

    def log(self) -> str:
        return self.log_path.read_text()

    def predict(self, task: str, data: bytes, **params) -> httpx.Response:
        return self.client.post(f"/v1/tasks/{task}/predict", content=data, params=params)

    def tasks(self) -> dict:
        return {t["task"]: t for t in self.client.get("/v1/tasks").json()["tasks"]}

    def refused(self) -> dict:
        return {r["file"]: r for r in self.client.get("/v1/tasks").json()["refused"]}

    def metrics(self) -> str:
        return self.client.get("/metrics").text

    def wait_for(self, condition, what: str, timeout_s: float = 30.0):
        """Poll ``condition()`` until it returns something truthy (the poller works in the background)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; server log:\n{self.log()[-3000:]}")

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then the exit code."""
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)


# `km-edge` with torch made unimportable: proves serve runs on a device install (no torch)
WITHOUT_TORCH = [sys.executable, "-c", "import sys; sys.modules.update(torch=None, torchvision=None); "
                 "sys.argv[0] = 'km-edge'; from km_edge.cli import main; main()"]


def start_server(device: Device, *args, token: str | None = None, state: Path | None = None,
                 log_name: str = "serve.log", launcher=(KM_EDGE,)) -> Served:
    """`km-edge serve` on 127.0.0.1 and a free port; returns once it printed its address."""
    log_path = device.root / log_name
    command = [*launcher, "serve", "--base", device.base_dir, "--pubkey", device.pubkey, "--packs", device.packs,
               "--state", state or device.state, "--port", "0", "--threads", "1", "--poll-interval", "0.1",
               "--json", *args]
    with open(log_path, "w") as log:  # a file, not a pipe: a chatty server must never block on it
        process = subprocess.Popen([str(c) for c in command], stdout=subprocess.PIPE, stderr=log, text=True,
                                   cwd=device.root, env=dict(os.environ, OMP_NUM_THREADS="1"))
    _STARTED.append(process)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(START_TIMEOUT_S)
    if not line or not line[0].strip():
        process.kill()
        raise AssertionError(f"serve did not start (exit {process.wait()}):\n{log_path.read_text()[-3000:]}")
    import json

    ready = json.loads(line[0])
    if "listening" not in ready:
        process.wait(30)
        raise AssertionError(f"serve did not start (exit {process.returncode}): {ready}")
    served = Served(process, ready["listening"], log_path, token)
    served.ready = ready
    return served


class SlowBody:
    """A request body that sends one byte and then waits for ``release`` before ending.

    The server admits a request before reading its body, so this holds a worker slot for as long
    as the test wants: the deterministic way to fill the queue or to have a request in flight.
    """

    def __init__(self, data: bytes):
        self.data, self.release, self.started = data, threading.Event(), threading.Event()

    def __iter__(self):
        self.started.set()
        yield self.data[:1]
        self.release.wait(60)
        yield self.data[1:]
