"""Run the app under uvicorn on a socket bound here, so the real port is known before serving.

uvicorn owns the signals: on SIGTERM or SIGINT it stops accepting connections, lets requests in
flight finish (up to ``shutdown_timeout_s``), then runs the app's lifespan shutdown, which stops the
pack poller after its current load and drains the inference threads. The anti-rollback state and
packs are only ever replaced by atomic renames, so a stop at any moment leaves no half-written file.
"""

from __future__ import annotations

import signal
import socket

__all__ = ["bind", "run"]

BACKLOG = 2048  # uvicorn's default


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0 picks a free one): connections made before
    uvicorn starts accepting wait in the backlog instead of being refused."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def run(app, sock: socket.socket, *, log_level: str = "info", access_log: bool = False,
        shutdown_timeout_s: int = 30, limit_concurrency: int | None = None) -> bool:
    """Serve until SIGTERM/SIGINT; False if the app failed to start."""
    import uvicorn

    config = uvicorn.Config(app, log_config=None, log_level=log_level, access_log=access_log,
                            lifespan="on", timeout_graceful_shutdown=shutdown_timeout_s,
                            limit_concurrency=limit_concurrency, server_header=False)
    server = uvicorn.Server(config)
    # uvicorn re-raises the stopping signal once it has shut down; with these handlers in place (it
    # restores them first) that lands here and a graceful stop exits 0 rather than "killed by 15"
    stopped_by: list[int] = []
    previous = {sig: signal.signal(sig, lambda number, frame: stopped_by.append(number))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return bool(server.started)
