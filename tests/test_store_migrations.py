"""Schema migrations: an older database upgrades in place with its rows intact."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from db import Cursor, FeedbackStore, NewGeneration, StoreError
from db.engine import make_engine
from db.migrate import current_revision, downgrade_schema, head_revision, upgrade_schema
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
        assert store.schema_revision() == head_revision() == "0006"
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
        assert store.rate(good, "alice", 1).id > current
        assert store.add_prompt("new prompt") > prompt
        assert store.counts()["ratings_since_serving"] == 1
        # 0005: the old prompt is admitted; bob, who picked on alice's page, may judge it still (a viewer)
        assert store.get_prompt(prompt).admission == "admitted"
        assert store.rate(good, "bob", 4).rater == "bob"
        with pytest.raises(StoreError, match="was not shown to 'alice'"):
            store.rate(bad, "alice", 1)  # bad is on bob's page, never shown to alice


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
        assert store.schema_revision() == head_revision()
        assert store.acquire_lease("worker", 10)  # exactly one lease row


def _generation(c: sa.Connection, prompt: int, version: int, minutes: float) -> int:
    return _insert(
        c,
        GENERATIONS,
        prompt_id=prompt,
        adapter_version=version,
        text=f"v{version} at {minutes}",
        token_ids=[],
        logprobs=[],
        sampling={},
        created_at=CREATED + timedelta(minutes=minutes),
    )


def _rating(c: sa.Connection, generation: int, rater: str, minutes: float, current: bool = True) -> int:
    return _insert(
        c,
        RATINGS,
        generation_id=generation,
        rater=rater,
        score=3,
        comment=None,
        is_current=current,
        created_at=CREATED + timedelta(minutes=minutes),
    )


def _seed_0002(engine: sa.Engine) -> dict[str, list[int]]:
    """Write generations of two prompts at revision 0002; return them by the page each should get."""
    with engine.begin() as c:
        p1, p2 = (
            _insert(c, PROMPTS, text=t, text_sha256=t * 64, source="builtin", active=True, created_at=CREATED)
            for t in ("1", "2")
        )
        ana_first = [_generation(c, p1, 0, 0) for _ in range(3)]  # one request; ana rates at +1 min
        ben = [_generation(c, p1, 0, 0)]  # the same prompt, version and time, but rated by ben
        ana_second = [_generation(c, p1, 0, 3), _generation(c, p1, 0, 3.5)]  # after ana rated the first
        unrated = [_generation(c, p1, 0, 30), _generation(c, p1, 0, 39)]  # one burst, nobody rated
        unrated_later = [_generation(c, p1, 0, 50)]  # more than BURST after the last one
        ana_v1 = [_generation(c, p1, 1, 3)]  # ana, the same time, another version
        carol = [_generation(c, p2, 0, 0), _generation(c, p2, 0, 0)]  # one picked by carol, never rated
        _rating(c, ana_first[0], "ana", 1, current=False)
        _rating(c, ana_first[0], "ben", 2)  # ana rated it first: her page
        _rating(c, ana_first[0], "ana", 2)
        for g in ana_first[1:]:
            _rating(c, g, "ana", 1)
        _rating(c, ben[0], "ben", 1)
        for g in [*ana_second, *ana_v1]:
            _rating(c, g, "ana", 5)
        _rating(c, carol[1], "carol", 1)
        _insert(
            c,
            PREFERENCES,
            chosen_generation_id=carol[0],
            rejected_generation_id=carol[1],
            rater="carol",
            created_at=CREATED + timedelta(minutes=1),
        )
    return {
        "ana": ana_first,
        "ben": ben,
        "ana again": ana_second,
        "unrated": unrated,
        "unrated later": unrated_later,
        "ana v1": ana_v1,
        "carol": carol,
    }


def test_upgrade_to_0003_puts_every_generation_on_a_page(empty_url: str) -> None:
    engine = make_engine(empty_url)
    upgrade_schema(engine, "0002")
    expected = _seed_0002(engine)
    engine.dispose()

    with FeedbackStore(empty_url) as store:
        assert store.schema_revision() == head_revision()
        page_of = {name: {store.get_generation(g).page_id for g in ids} for name, ids in expected.items()}
        assert all(len(pages) == 1 for pages in page_of.values())
        # page ids follow the first generation's id
        assert [pages.pop() for pages in page_of.values()] == [1, 2, 3, 4, 5, 6, 7]
        pages = [store.get_page(i) for i in range(1, 8)]
        assert [(p.rater, p.adapter_version) for p in pages] == [
            ("ana", 0),
            ("ben", 0),
            ("ana", 0),
            (None, 0),
            (None, 0),
            ("ana", 1),
            ("carol", 0),
        ]
        assert [p.created_at.replace(tzinfo=None) - CREATED for p in pages] == [
            timedelta(minutes=m) for m in (0, 0, 3, 30, 50, 3, 0)
        ]
        assert [g.id for g in store.page_generations(4)] == expected["unrated"]
        assert {p.prompt_id for p in pages[:6]} == {store.get_generation(expected["ana"][0]).prompt_id}
        # new pages continue after the backfilled ones (on PostgreSQL: the id sequence moved on)
        [new] = store.record_generations(pages[0].prompt_id, 0, [NewGeneration("new")], rater="ana")
        assert new.page_id == 8


def test_downgrade_from_0003_keeps_generations_and_upgrades_again(empty_url: str) -> None:
    engine = make_engine(empty_url)
    upgrade_schema(engine, "0002")
    expected = _seed_0002(engine)
    upgrade_schema(engine)
    downgrade_schema(engine, "0002")
    assert current_revision(engine) == "0002"
    inspector = sa.inspect(engine)
    assert "pages" not in inspector.get_table_names()
    assert "page_id" not in {c["name"] for c in inspector.get_columns("generations")}
    with engine.connect() as connection:
        ids = connection.execute(sa.select(GENERATIONS.c.id).order_by(GENERATIONS.c.id)).scalars().all()
        assert ids == sorted(g for group in expected.values() for g in group)
        assert connection.execute(sa.select(sa.func.count()).select_from(RATINGS)).scalar() == 10
    engine.dispose()
    with FeedbackStore(empty_url) as store:
        assert store.get_page(7).rater == "carol"
        assert store.feedback_since().preferences[0].chosen.page_id == 7


def test_upgrade_to_0004_keeps_ratings_and_preferences_in_force(empty_url: str) -> None:
    engine = make_engine(empty_url)
    upgrade_schema(engine, "0002")
    expected = _seed_0002(engine)
    upgrade_schema(engine, "0003")
    engine.dispose()

    with FeedbackStore(empty_url) as store:
        assert store.schema_revision() == "0006"
        before = store.feedback_since()
        assert len(before.ratings) == 9 and len(before.preferences) == 1  # every current row still in force
        history = store.rating_history(expected["ana"][0])
        assert [(r.rater, r.current, r.submission_id, r.guideline_version) for r in history] == [
            ("ana", False, None, 0), ("ben", True, None, 0), ("ana", True, None, 0)]
        assert store.my_submissions("carol") == [] and store.guidelines() is None
        # carol's old pick is superseded by her first submission of that page, and back after an undo
        carol = expected["carol"]
        page = store.get_generation(carol[0]).page_id
        store.submit_page(page, "carol", {carol[0]: 2}, [carol[1]])
        assert [(p.chosen.id, p.rejected.id) for p in store.feedback_since().preferences] == [(carol[1], carol[0])]
        store.undo_last_submission("carol")
        assert [(p.chosen.id, p.rejected.id) for p in store.feedback_since().preferences] == [(carol[0], carol[1])]


def test_downgrade_from_0004_keeps_ratings_and_the_preferences_in_force(empty_url: str) -> None:
    with FeedbackStore(empty_url) as store:
        prompt = store.add_prompt("p")
        ids = [g.id for g in store.record_generations(prompt, 0, [NewGeneration("a"), NewGeneration("b")], rater="ana")]
        page = store.get_generation(ids[0]).page_id
        store.submit_page(page, "ana", {ids[0]: 4}, [ids[0]])
        store.submit_page(page, "ana", {ids[0]: 2}, [ids[1]])  # the first pick is superseded
        store.write_guidelines("be kind", "ana")
    engine = make_engine(empty_url)
    downgrade_schema(engine, "0003")
    inspector = sa.inspect(engine)
    assert not {"submissions", "ties", "flags", "skips", "guidelines"} & set(inspector.get_table_names())
    with engine.connect() as connection:
        scores = connection.execute(sa.select(RATINGS.c.score).order_by(RATINGS.c.id)).scalars().all()
        pairs = connection.execute(
            sa.select(PREFERENCES.c.chosen_generation_id, PREFERENCES.c.rejected_generation_id)
        ).tuples().all()
    assert scores == [4, 2] and pairs == [(ids[1], ids[0])]
    engine.dispose()
    with FeedbackStore(empty_url) as store:
        assert store.schema_revision() == "0006"
        assert [p.chosen.id for p in store.feedback_since().preferences] == [ids[1]]


def test_upgrade_to_0005_admits_every_prompt_and_keeps_who_judged_others_pages(empty_url: str) -> None:
    engine = make_engine(empty_url)
    upgrade_schema(engine, "0002")
    expected = _seed_0002(engine)
    upgrade_schema(engine, "0004")
    engine.dispose()

    with FeedbackStore(empty_url) as store:
        assert store.schema_revision() == head_revision()
        assert [p.admission for p in store.list_prompts(active_only=False)] == ["admitted", "admitted"]
        assert len(store.list_prompts()) == 2 and store.pending_prompts() == []
        on_anas_page = expected["ana"][0]
        assert store.rate(on_anas_page, "ben", 3).score == 3  # ben rated on ana's page before: a viewer of it
        with pytest.raises(StoreError, match="not shown to 'carol'"):
            store.rate(on_anas_page, "carol", 3)
        assert store.rating_history(on_anas_page, "carol") == []


def test_downgrade_from_0005_keeps_feedback_and_leaves_pending_prompts_out_of_the_pool(empty_url: str) -> None:
    with FeedbackStore(empty_url) as store:
        pending = store.add_prompt("ana's own", added_by="ana")
        admitted = store.add_prompt("in the pool")
        [mine] = store.record_generations(pending, 0, [NewGeneration("a")], rater="ana")
        store.rate(mine.id, "ana", 4)
        store.show_page(mine.page_id, "ben")
    engine = make_engine(empty_url)
    downgrade_schema(engine, "0004")
    assert "page_viewers" not in sa.inspect(engine).get_table_names()
    with engine.connect() as connection:
        active = dict(connection.execute(sa.select(PROMPTS.c.id, PROMPTS.c.active)).tuples().all())
    assert active == {pending: False, admitted: True}  # 0004 has no admission: kept out of the pool
    engine.dispose()
    with FeedbackStore(empty_url) as store:
        assert store.schema_revision() == head_revision()
        assert [(r.rating.rater, r.rating.score) for r in store.feedback_since().ratings] == [("ana", 4)]
        assert [p.id for p in store.list_prompts()] == [admitted]


LEASE = _table("training_lease", sa.column("id"), sa.column("holder"), sa.column("state"),
               sa.column("expires_at", sa.DateTime))


def test_upgrade_to_0006_gives_a_held_lease_a_token_and_fences_by_it(empty_url: str) -> None:
    engine = make_engine(empty_url)
    upgrade_schema(engine, "0005")
    with engine.begin() as connection:  # a worker held the lease when the app was upgraded
        connection.execute(sa.update(LEASE).values(holder="old-worker", state="training",
                                                   expires_at=datetime.now(timezone.utc).replace(tzinfo=None)
                                                   + timedelta(minutes=5)))
    engine.dispose()
    with FeedbackStore(empty_url) as store:
        assert store.schema_revision() == head_revision()
        assert store.worker_status().holder == "old-worker" and store.worker_status().present
        assert store.renew_lease("old-worker", 60, token=0)  # existing rows start at token 0
        assert store.acquire_lease("new-worker", 60) is None
        assert store.acquire_lease("old-worker", 60) == 1


def test_downgrade_from_0006_keeps_the_lease_row(empty_url: str) -> None:
    with FeedbackStore(empty_url) as store:
        assert store.acquire_lease("worker", 60) == 1
    engine = make_engine(empty_url)
    downgrade_schema(engine, "0005")
    assert "token" not in {c["name"] for c in sa.inspect(engine).get_columns("training_lease")}
    assert not {"exported_at", "pruned_at"} & {c["name"] for c in sa.inspect(engine).get_columns("adapter_versions")}
    with engine.connect() as connection:
        assert connection.execute(sa.select(LEASE.c.holder)).scalars().all() == ["worker"]
    engine.dispose()
    with FeedbackStore(empty_url) as store:
        assert store.schema_revision() == head_revision()
        assert store.acquire_lease("worker", 60) == 1
