"""The `storage-proxy` command: Optuna's gRPC storage proxy in front of one database, whose
connections then serve every worker (docs/operations.md, "Tens to hundreds of workers").

It listens on 127.0.0.1 unless `--host` says otherwise, and then says what that exposes. The
server is built here rather than with `optuna.storages.run_grpc_proxy_server` so that the
command can print the real port once it is bound (`--port 0`) and stop cleanly on Ctrl-C or
SIGTERM (exit code 0: stopping is how a proxy ends).
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import optuna

from storage import StorageError, get_storage, parse_url, redact
from study.config import ConfigError
from study.dashboard import check_port, exposure_warning, until_stopped

LACKS = "the storage proxy has no authentication or encryption"
THREADS = 10  # Optuna's default: calls are short; more threads would only queue in the pool


class ProxyError(ConfigError):
    """The server cannot start as asked (port taken, bad address): a message for the user."""


def make_proxy_server(storage: optuna.storages.BaseStorage, host: str, port: int):
    """A gRPC server for `storage` bound to `host:port` (port 0: a free one), not yet started;
    returns (server, bound port)."""
    import grpc
    from optuna.storages._grpc.auto_generated import api_pb2_grpc
    from optuna.storages._grpc.servicer import OptunaStorageProxyService

    server = grpc.server(ThreadPoolExecutor(max_workers=THREADS))
    api_pb2_grpc.add_StorageServiceServicer_to_server(OptunaStorageProxyService(storage), server)
    address = f"[{host.strip('[]')}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:  # grpcio's answer to a port it cannot bind
        raise ProxyError(f"cannot serve the storage proxy on {address}: {e}") from None
    return server, bound


def serve_proxy(storage_url: str, host: str, port: int, outage_grace_s: float) -> int:
    """Serve `storage_url` over gRPC until Ctrl-C or SIGTERM; returns the exit code."""
    kind = parse_url(storage_url).kind
    if kind == "grpc":
        raise StorageError("--storage of storage-proxy must be a database, not another proxy")
    if kind == "journal":
        raise StorageError(
            "Optuna's storage proxy cannot serve a journal file; use PostgreSQL, MySQL or SQLite"
        )
    check_port(port)
    if outage_grace_s <= 0:
        raise StorageError(f"--db-outage-grace must be a positive number, got {outage_grace_s}")
    backend = get_storage(storage_url, heartbeat=None, outage_grace_s=outage_grace_s)
    # Optuna's trial cache, as run_grpc_proxy_server's documentation asks: finished trials are
    # answered from memory, so many workers' samplers do not each reread the whole study.
    storage = optuna.storages.get_storage(backend)
    server, bound = make_proxy_server(storage, host, port)
    warning = exposure_warning(host, LACKS)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    server.start()
    try:
        shown = f"[{host.strip('[]')}]" if ":" in host else host
        # printed once the port is bound: a script (or a test) waiting for it can connect
        print(
            f"storage proxy for {redact(storage_url)} at grpc://{shown}:{bound} (Ctrl-C to stop)",
            flush=True,
        )
        until_stopped(server.wait_for_termination)
    finally:
        server.stop(grace=2).wait()
    print("storage proxy stopped")
    return 0
