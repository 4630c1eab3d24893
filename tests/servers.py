"""The database servers of the many-worker and outage tests: URLs, reachability, restarts, and a
TCP link that a test can cut (a network outage without stopping a server others use)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable

import optuna
from conftest import require

SERVERS = {
    "postgresql": "postgresql://postgres@127.0.0.1:5432/test",
    "mariadb": "mysql+pymysql://root@127.0.0.1:3306/test",
}


def reachable_url(name: str) -> str:
    """The server's URL; skipped (a failure in CI) when it does not answer."""
    import sqlalchemy

    url = SERVERS[name]
    try:
        engine = sqlalchemy.create_engine(url)
        with engine.connect() as con:
            con.execute(sqlalchemy.text("SELECT 1"))
        engine.dispose()
    except Exception as e:  # noqa: BLE001 - any connection failure means: no server here
        require(f"{name} is not reachable at {url}: {str(e).splitlines()[0]}")
    return url


def delete_studies(url: str, name: str) -> None:
    """Remove a test's study and its baseline study from a shared server (absent ones too)."""
    for study in (name, name + "-full-ft"):
        try:
            optuna.delete_study(study_name=study, storage=url)
        except KeyError:
            pass


def _wait(check, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _ok(cmd: list[str]) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


def restart(name: str, down_s: float = 3.0, while_down: Callable[[], None] = lambda: None) -> None:
    """Stop the real server (every connection dies), call `while_down()`, keep it down `down_s`
    seconds, start it again, as maintenance or a failover does; returns once it accepts
    connections. (A bare PostgreSQL restart is down for well under a second, which a worker
    between two storage calls may never notice: pooled connections are checked before use.)"""
    if name == "postgresql":
        version = sorted(os.listdir("/etc/postgresql"))[0]  # the cluster .ci/run starts
        subprocess.run(["pg_ctlcluster", version, "main", "stop"], check=True)
        while_down()
        time.sleep(down_s)
        subprocess.run(["pg_ctlcluster", version, "main", "start"], check=True)
        _wait(lambda: _ok(["pg_isready", "-q", "-h", "127.0.0.1", "-p", "5432"]), "PostgreSQL")
        return
    pid = subprocess.run(["pgrep", "-x", "mariadbd"], capture_output=True, text=True).stdout
    subprocess.run(["mariadb-admin", "-h", "127.0.0.1", "-u", "root", "shutdown"], check=True)
    # `shutdown` returns before the process has exited; a start before that is a no-op
    _wait(lambda: not _ok(["kill", "-0", *pid.split()]), "mariadbd to exit")
    while_down()
    time.sleep(down_s)
    subprocess.run(
        ["start-stop-daemon", "--start", "--oknodo", "--background",
         "--exec", "/usr/sbin/mariadbd", "--", "--user=mysql"],
        check=True,
    )  # fmt: skip
    _wait(lambda: _ok(["mariadb-admin", "-h", "127.0.0.1", "-u", "root", "ping"]), "MariaDB")


class Link:
    """A TCP forwarder from a free local port to `target`. `cut()` closes every connection and
    stops listening (new connections are refused, as by a stopped server); `restore()` listens
    again on the same port."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._listener: socket.socket | None = None

    def __enter__(self) -> Link:
        self.restore()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cut()

    def restore(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            socks, self._socks = self._socks, set()
        if listener is not None:
            listener.close()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._socks |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
