"""Schema migrations: an older database upgrades in place with its rows intact."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from db import Cursor, FeedbackStore
from db.engine import make_engine
from db.migrate import current_revision, head_revision, upgrade_schema
from db.models import Base
from store_fixtures import BACKENDS, fresh_store_url

CREATED = datetime(2025, 1, 2, 3, 4, 5)


@pytest.fixture(params=BACKENDS)
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of an empty database (no tables), once per backend."""
    with fresh_store_url(request.param, tmp_path) as url:
        yield url


def _table(name: str, *columns: sa.Column) -> sa.TableClause:
    return sa.table(name, *columns)


PROMPTS = _table(
    "prompts",
    sa.column("id"),
    sa.column("text"),
    sa.column("text_sha256"),
    sa.column("source"),
    sa.column("active", sa.Boolean),
    sa.column("created_at", sa.DateTime),
)
GENERATIONS = _table(
    "generations",
    sa.column("id"),
    sa.column("prompt_id"),
    sa.column("adapter_version"),
    sa.column("text"),
    sa.column("token_ids", sa.JSON),
    sa.column("logprobs", sa.JSON),
    sa.column("sampling", sa.JSON),
    sa.column("created_at", sa.DateTime),
)
RATINGS = _table(
    "ratings",
    sa.column("id"),
    sa.column("generation_id"),
    sa.column("rater"),
    sa.column("score"),
    sa.column("comment"),
    sa.column("is_current", sa.Boolean),
    sa.column("created_at", sa.DateTime),
)
PREFERENCES = _table(
    "preferences",
    sa.column("id"),
    sa.column("chosen_generation_id"),
    sa.column("rejected_generation_id"),
    sa.column("rater"),
    sa.column("created_at", sa.DateTime),
)
VERSIONS = _table(
    "adapter_versions",
    sa.column("version"),
    sa.column("path"),
    sa.column("parent"),
    sa.column("status"),
    sa.column("n_ratings"),
    sa.column("n_preferences"),
    sa.column("rating_cursor"),
    sa.column("preference_cursor"),
    sa.column("metrics", sa.JSON),
    sa.column("created_at", sa.DateTime),
)


def _insert(connection: sa.Connection, table: sa.TableClause, key: str = "id", **values: object) -> int:
    return connection.execute(sa.insert(table).values(**values).returning(table.c[key])).scalar_one()


def test_upgrade_from_0001_keeps_every_row(empty_url: str) -> None:
    engine = make_engine(empty_url)
    upgrade_schema(engine, "0001")
    assert current_revision(engine) == "0001"
    with engine.begin() as c:
        prompt = _insert(
            c,
            PROMPTS,
            text="Old prompt 🤖",
            text_sha256="0" * 64,
            source="uploaded",
            active=True,
            created_at=CREATED,
        )
        good, bad = (
            _insert(
                c,
                GENERATIONS,
                prompt_id=prompt,
                adapter_version=v,
                text=t,
                token_ids=[5, 6],
                logprobs=[-0.5, -1.5],
                sampling={"seed": 3},
                created_at=CREATED,
            )
            for v, t in ((0, "good <b>old</b>"), (0, "bad '; --"))
        )
        old = _insert(
            c,
            RATINGS,
            generation_id=good,
            rater="alice",
            score=2,
            comment=None,
            is_current=False,
            created_at=CREATED,
        )
        current = _insert(
            c,
            RATINGS,
            generation_id=good,
            rater="alice",
            score=5,
            comment="changed my mind",
            is_current=True,
            created_at=CREATED,
        )
        preference = _insert(
            c,
            PREFERENCES,
            chosen_generation_id=good,
            rejected_generation_id=bad,
            rater="bob",
            created_at=CREATED,
        )
        _insert(
            c,
            VERSIONS,
            key="version",
            version=1,
            path="adapters/v1",
            parent=0,
            status="published",
            n_ratings=1,
            n_preferences=1,
            rating_cursor=current,
            preference_cursor=preference,
            metrics={"reward": 0.75},
            created_at=CREATED,
        )
    engine.dispose()

    with FeedbackStore(empty_url) as store:
        assert store.schema_revision() == head_revision() == "0002"
        assert store.get_prompt(prompt).text == "Old prompt 🤖"
        assert store.get_generation(good).token_ids == (5, 6)
        history = store.rating_history(good)
        assert [(r.id, r.score, r.comment, r.current) for r in history] == [
            (old, 2, None, False),
            (current, 5, "changed my mind", True),
        ]
        assert history[0].created_at == CREATED.replace(tzinfo=timezone.utc)
        [pair] = store.feedback_since().preferences
        assert (pair.chosen.text, pair.rejected.text) == ("good <b>old</b>", "bad '; --")
        version = store.get_version(1)
        assert (version.status, version.cursor, version.metrics) == (
            "published",
            Cursor(current, preference),
            {"reward": 0.75},
        )
        assert version.status_changed_at == version.created_at  # backfilled by 0002
        assert store.worker_status().state == "no worker yet"  # the lease row came with 0001
        # the upgraded database keeps working: ids continue after the old rows
        assert store.rate(bad, "alice", 1).id > current
        assert store.add_prompt("new prompt") > prompt
        assert store.counts()["ratings_since_serving"] == 1


def test_models_match_migrated_schema(empty_url: str) -> None:
    with FeedbackStore(empty_url) as store, store._engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_simultaneous_first_starts_migrate_once(empty_url: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        try:
            barrier.wait()
            FeedbackStore(empty_url).close()
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with FeedbackStore(empty_url) as store:
        assert store.schema_revision() == "0002"
        assert store.acquire_lease("worker", 10)  # exactly one lease row
