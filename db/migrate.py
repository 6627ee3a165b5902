"""Alembic migrations run from code: no alembic.ini, works from any working directory."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
# Alembic keeps the running migration in module globals (alembic.context, alembic.op), so two
# threads of one process must not migrate at the same time. Processes are serialised by the
# database itself (BEGIN IMMEDIATE on SQLite, an advisory lock on PostgreSQL, see env.py).
_ALEMBIC_LOCK = threading.Lock()


def alembic_config(connection: Connection | None = None) -> Config:
    """Return an Alembic Config for `db/migrations`, bound to `connection` when given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade_schema(engine: Engine, revision: str = "head") -> None:
    """Upgrade the database to `revision` in one transaction, keeping its data; returns nothing."""
    _migrate(engine, command.upgrade, revision)


def downgrade_schema(engine: Engine, revision: str) -> None:
    """Take the database back to the older `revision` in one transaction (what later migrations
    added is dropped); returns nothing."""
    _migrate(engine, command.downgrade, revision)


def _migrate(engine: Engine, step: Callable[[Config, str], None], revision: str) -> None:
    """Run an Alembic `step` to `revision` in one transaction.

    On SQLite foreign keys are off while it runs and checked as a whole before it commits (the
    procedure SQLite documents for rebuilding a table, which batch migrations do): a rebuilt
    table's old copy is dropped with rows still referring to it, so per-row checks would fail.
    """
    with _ALEMBIC_LOCK, engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:  # outside a transaction, where SQLite ignores this pragma
            _sqlite_pragma(connection, "foreign_keys = OFF")
        try:
            with connection.begin():
                step(alembic_config(connection), revision)
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                    if broken:
                        raise RuntimeError(f"migrating to {revision} broke foreign keys: {broken[:5]}")
        finally:
            if sqlite:
                _sqlite_pragma(connection, "foreign_keys = ON")


def _sqlite_pragma(connection: Connection, pragma: str) -> None:
    connection.connection.driver_connection.execute(f"PRAGMA {pragma}")  # type: ignore[union-attr]


def current_revision(engine: Engine) -> str | None:
    """Return the database's Alembic revision, or None for an empty database."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    """Return the newest revision shipped in `db/migrations`."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head
