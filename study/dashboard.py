"""The `dashboard` command: serve optuna-dashboard for a storage, on 127.0.0.1 by default
(docs/operations.md, "Dashboard security").

optuna-dashboard provides the WSGI app; this module runs it under a threaded `wsgiref` server
that it owns, so the command can print the real URL once the port is bound and stop cleanly on
Ctrl-C or SIGTERM (exit code 0: stopping is how a dashboard ends).
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import sys
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from types import FrameType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna

from storage import get_storage, redact
from study.config import ConfigError


class DashboardError(ConfigError):
    """The server cannot start as asked (port taken, bad address): a message for the user."""


class _Server(ThreadingMixIn, WSGIServer):
    # The dashboard's page polls every few seconds while a user may also load a slow plot: one
    # thread per request keeps the page responsive. Daemon threads: a stop never waits on them.
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    # The page polls the API every few seconds; a log line per request would bury the URL and
    # any warning. Errors inside the app still reach stderr through wsgi.errors.
    def log_message(self, format: str, *args: object) -> None:
        pass


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, `localhost`)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public interface, so assume it does


def exposure_warning(
    host: str, lacks: str = "optuna-dashboard has no authentication"
) -> str | None:
    """The warning to print when a server that `lacks` protection serves on `host`; None on the
    loopback address."""
    if is_loopback(host):
        return None
    return (
        f"warning: serving on {host}, not only 127.0.0.1: {lacks}, so anyone who can reach this"
        " address and port can read, change or delete your studies"
    )


def dashboard_url(host: str, port: int) -> str:
    """The URL to open on this machine; for a wildcard address (all interfaces) the loopback one."""
    bare = host.strip("[]")
    shown = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(bare, bare)
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}/dashboard"


def make_dashboard_server(
    storage: optuna.storages.BaseStorage, host: str, port: int, artifact_store: Any = None
) -> WSGIServer:
    """Bind `host:port` (port 0: a free one) and return the server, not yet serving.

    With the artifact store, the dashboard lists each trial's kept weights.
    """
    import optuna_dashboard

    app = optuna_dashboard.wsgi(storage, artifact_store=artifact_store)
    server_class = _Server6 if ":" in host else _Server
    try:
        return make_server(
            host.strip("[]"), port, app, server_class=server_class, handler_class=_QuietHandler
        )
    except OSError as e:
        raise DashboardError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None


def check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise DashboardError(f"--port must be between 0 and 65535 (0: any free port), not {port}")


def serve(
    storage_url: str,
    host: str,
    port: int,
    artifact_dir: str | None = None,
) -> int:
    """Serve optuna-dashboard for `storage_url` until Ctrl-C or SIGTERM; returns the exit code."""
    from storage.artifacts import artifact_dir as store_folder
    from storage.artifacts import open_store
    from study.studies import all_studies

    check_port(port)
    storage = get_storage(storage_url, heartbeat=None, create=False)
    # The store the studies were made with, when they agree on one; else the default.
    recorded = [s.user_attrs.get("artifact_dir") for s in all_studies(storage)]
    folder = store_folder(artifact_dir, storage_url, recorded)
    server = make_dashboard_server(storage, host, port, open_store(folder))
    try:
        warning = exposure_warning(host)
        if warning:
            print(warning, file=sys.stderr, flush=True)
        url = dashboard_url(host, server.server_address[1])
        # Printed once the port is bound: whoever waits for this line (a script, a test) can
        # connect at once. flush: stdout is a pipe there, not a terminal.
        print(f"optuna-dashboard for {redact(storage_url)} at {url} (Ctrl-C to stop)", flush=True)
        until_stopped(server.serve_forever)
    finally:
        server.server_close()
    print("dashboard stopped")
    return 0


def until_stopped(block: Callable[[], None]) -> None:
    """Run `block` (a server's serving loop) in this thread; Ctrl-C (SIGINT) or SIGTERM ends it
    without a traceback."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # leaves serve_forever's select loop at once

    # Signal handlers can only be set from the main thread; elsewhere (a test thread) the
    # caller stops the server with server.shutdown().
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if in_main else None
    try:
        block()
    except KeyboardInterrupt:
        pass
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
