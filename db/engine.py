"""Engines for the feedback store: SQLite by default (WAL, busy timeout, foreign keys), any URL otherwise."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

DEFAULT_DB_PATH = "data/feedback.db"
SQLITE_BUSY_TIMEOUT_MS = 30_000
_READ_ONLY = "ppo_feedback_read_only"


def sqlite_url_or(url_or_path: str | os.PathLike[str]) -> str:
    """Return a SQLAlchemy URL: URLs unchanged, a plain path as an absolute `sqlite:///` URL.

    For SQLite files (path or URL) the parent directory is created.
    """
    text = os.fspath(url_or_path)
    if "://" in text:
        url = make_url(text)
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return text
    path = Path(text).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def make_engine(url: str) -> Engine:
    """Return an engine for `url`; on SQLite every connection gets WAL, busy_timeout and foreign keys,
    and write transactions start with BEGIN IMMEDIATE so that concurrent writers queue."""
    sqlite = make_url(url).get_backend_name() == "sqlite"
    engine = create_engine(url, pool_pre_ping=not sqlite)  # servers drop idle connections; files don't
    if sqlite:
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def read_only(engine: Engine) -> Engine:
    """Return a view of `engine` (same pool) whose transactions only read: plain BEGIN on SQLite."""
    return engine.execution_options(**{_READ_ONLY: True})


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take BEGIN away from the sqlite3 module; _sqlite_on_begin issues it (SQLAlchemy's recipe).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        # FULL: a commit that returned survives power loss too, not only a killed process.
        cursor.execute("PRAGMA synchronous = FULL")
    finally:
        cursor.close()


def _sqlite_on_begin(connection: Connection) -> None:
    mode = "DEFERRED" if connection.get_execution_options().get(_READ_ONLY) else "IMMEDIATE"
    connection.exec_driver_sql(f"BEGIN {mode}")
