"""Pytest fixtures for tests that need a feedback store.

`store_url` / `store` give each test a fresh database at the newest schema: a SQLite file in
tmp_path (copied from a migrated template, which is faster than migrating every time), and,
when PPO_FEEDBACK_TEST_PG_URL is set (see .ci/start_postgres.sh), a new schema of that
PostgreSQL database, dropped afterwards. Without the variable the PostgreSQL case is skipped.

    from store_fixtures import store, store_url  # noqa: F401  (pytest finds fixtures by name)
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from db.store import FeedbackStore

PG_URL_ENV = "PPO_FEEDBACK_TEST_PG_URL"
BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


@contextmanager
def fresh_postgres_url(base_url: str) -> Iterator[str]:
    """Yield a URL of `base_url`'s database whose connections see only a new empty schema;
    the schema is dropped on exit."""
    schema = f"test_{uuid.uuid4().hex[:16]}"
    admin = create_engine(base_url)
    try:
        with admin.begin() as connection:
            connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        url = make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


@contextmanager
def fresh_store_url(backend: str, directory: Path, template: Path | None = None) -> Iterator[str]:
    """Yield the URL of a fresh database of `backend` ("sqlite" or "postgres"); SQLite files go
    into `directory`, copied from `template` (a closed, migrated SQLite file) when given."""
    if backend == "sqlite":
        path = directory / "feedback.db"
        if template is not None:
            shutil.copyfile(template, path)
        yield f"sqlite:///{path}"
        return
    base_url = os.environ.get(PG_URL_ENV)
    if not base_url:
        pytest.skip(f'{PG_URL_ENV} is not set; start PostgreSQL with: eval "$(bash .ci/start_postgres.sh)"')
    with fresh_postgres_url(base_url) as url:
        yield url


def sqlite_path(url: str) -> Path | None:
    """Return the file of a SQLite URL, None for other databases."""
    parsed = make_url(url)
    return Path(parsed.database) if parsed.get_backend_name() == "sqlite" and parsed.database else None


@functools.cache
def migrated_sqlite_template() -> Path:
    """Return a closed SQLite file at the newest schema, made once per process, for copying."""
    directory = Path(tempfile.mkdtemp(prefix="ppo-feedback-template-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    path = directory / "feedback.db"
    FeedbackStore(path).close()  # closing the last connection checkpoints the WAL into the file
    return path


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh database, once per backend (SQLite: already migrated; PostgreSQL: an
    empty schema that the first FeedbackStore migrates)."""
    with fresh_store_url(request.param, tmp_path, migrated_sqlite_template()) as url:
        yield url


@pytest.fixture
def store(store_url: str) -> Iterator[FeedbackStore]:
    """A FeedbackStore on a fresh database of each backend, closed after the test."""
    feedback_store = FeedbackStore(store_url)
    try:
        yield feedback_store
    finally:
        feedback_store.close()
