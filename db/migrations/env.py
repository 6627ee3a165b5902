"""Alembic environment: runs on the connection `db.migrate` passes in (online mode only)."""

from __future__ import annotations

from alembic import context

from db.models import Base

# Any constant: serialises concurrent start-ups migrating the same PostgreSQL database.
_PG_MIGRATION_LOCK = 0x70706F66

connection = context.config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError("run migrations through db.migrate.upgrade_schema(engine)")
if connection.dialect.name == "postgresql":
    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
