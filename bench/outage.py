"""Database outages for `bench/load.py --db-outage SECONDS`: the store unavailable for a while, then back.

- SQLite (`hold_sqlite_lock`): a separate connection holds `BEGIN EXCLUSIVE` for the outage. In WAL
  mode (the store's) that shuts out every writer, while readers go on reading the last commit; a writer
  waits up to the store's busy timeout (30 s) and then goes on, so a 10 s outage delays writes but
  refuses none.
- PostgreSQL (`TcpGate`): the app and the worker reach the server through a TCP forwarder on
  loopback; for the outage it cuts every connection and refuses new ones (what clients see when the
  server stops: connections lost, then refused), then lets them through again. This leaves a shared
  server alone, which stopping it or `ALTER DATABASE ... ALLOW_CONNECTIONS false` would not.
"""
from __future__ import annotations

import socket
import sqlite3
import threading
import time
from pathlib import Path

from sqlalchemy.engine import make_url


def hold_sqlite_lock(path: str | Path, seconds: float) -> dict[str, float]:
    """Hold `BEGIN EXCLUSIVE` on the SQLite file `path` for `seconds`; return {"waited_s" (for the lock),
    "start", "end"} (epoch seconds of the outage)."""
    asked = time.time()
    connection = sqlite3.connect(str(path), timeout=60.0, isolation_level=None)
    try:
        connection.execute("BEGIN EXCLUSIVE")
        start = time.time()
        time.sleep(seconds)
        connection.execute("ROLLBACK")
    finally:
        connection.close()
    return {"waited_s": round(start - asked, 2), "start": start, "end": time.time()}


class TcpGate:
    """A TCP forwarder on 127.0.0.1 to a server, which can cut its connections for a while (`outage`)."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, name="tcp-gate", daemon=True).start()

    def url_for(self, url: str) -> str:
        """Return the database URL `url` with its host and port replaced by the gate's."""
        return make_url(url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if not self._open.is_set():
                client.close()  # refused while the outage lasts
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
                with self._lock:
                    self._sockets.discard(s)

    def outage(self, seconds: float) -> dict[str, float]:
        """Cut every connection and refuse new ones for `seconds`; return {"start", "end"} (epoch seconds)."""
        start = time.time()
        self._open.clear()
        with self._lock:
            cut = list(self._sockets)
        for s in cut:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        time.sleep(seconds)
        self._open.set()
        return {"start": start, "end": time.time()}

    def close(self) -> None:
        """Stop accepting and cut every connection; returns nothing."""
        self.listener.close()
        self._open.clear()
        with self._lock:
            for s in list(self._sockets):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def is_postgres(db: str) -> bool:
    """Return whether `db` is a PostgreSQL URL (else a SQLite file or URL)."""
    return "://" in db and make_url(db).get_backend_name() == "postgresql"
