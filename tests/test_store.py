"""FeedbackStore API: prompts, generations, ratings, preferences, lease, versions, bad input."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timezone
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from db import Cursor, FeedbackStore, NewGeneration, StoreError, VersionRecord, sqlite_url_or
from store_fixtures import BACKENDS, fresh_store_url, migrated_sqlite_template, store, store_url  # noqa: F401  (fixtures)

VERBATIM = [
    "'; DROP TABLE ratings; --",
    "<script>alert(1)</script>",
    "Robert'); DELETE FROM prompts WHERE ('1'='1",
    "emoji 🤖🎉 family 👨‍👩‍👧 flag 🇫🇷",
    "  leading and trailing spaces\t\r\n",
    "e\u0301 vs \u00e9, RTL \u202e shalom \u05e9\u05dc\u05d5\u05dd, zero\u200bwidth",
    '%s %(name)s {0} $1 ? :param \\ \\\\ "quoted" `tick`',
    "line1\nline2\r\nline3",
]


def _prompt_with_generations(store: FeedbackStore, text: str = "Tell me a story.", n: int = 2) -> list[int]:
    prompt_id = store.add_prompt(text, source="builtin")
    generations = store.record_generations(prompt_id, 0, [NewGeneration(f"{text} #{i}") for i in range(n)])
    return [g.id for g in generations]


def _record(parent: int, cursor: Cursor = Cursor(), **counts_and_metrics: Any) -> VersionRecord:
    """Return a version record trained from `parent` (no ratings, preferences or metrics unless given)."""
    fields = {"n_ratings": 0, "n_preferences": 0, **counts_and_metrics}
    return VersionRecord(parent, "tiny", cursor, **fields)


class Seeded(NamedTuple):
    store: FeedbackStore
    generations: list[int]
    other: list[int]
    prompt_id: int


def _snapshot(store: FeedbackStore) -> tuple[object, ...]:
    feedback = store.feedback_since()
    return (store.counts(), store.list_prompts(active_only=False), feedback, store.list_versions())


# ---------------------------------------------------------------- prompts


def test_add_prompts_deduplicates_and_keeps_input_order(store: FeedbackStore) -> None:
    ids = store.add_prompts(["alpha", "beta", "alpha"], source="uploaded")
    assert ids[0] == ids[2] != ids[1]
    assert store.add_prompts(["beta", "gamma"])[0] == ids[1]
    assert [p.text for p in store.list_prompts()] == ["alpha", "beta", "gamma"]
    prompt = store.get_prompt(ids[0])
    assert (prompt.source, prompt.active) == ("uploaded", True)
    assert prompt.created_at.tzinfo == timezone.utc


def test_next_prompt_least_rated_first_skipping_own(store: FeedbackStore) -> None:
    busy, quiet, fresh = (_prompt_with_generations(store, t) for t in ("busy", "quiet", "fresh"))
    hidden = store.add_prompt("hidden")
    store.set_prompt_active(hidden, False)
    for rater in ("bob", "carol"):
        store.rate(busy[0], rater, 4)
    store.rate(quiet[0], "bob", 2)

    assert store.next_prompt("alice").text == "fresh"
    store.rate(fresh[1], "alice", 5)
    assert store.next_prompt("alice").text == "quiet"
    store.prefer(quiet[1], quiet[0], "alice")
    assert store.next_prompt("alice").text == "busy"
    store.rate(busy[0], "alice", 1)
    assert store.next_prompt("alice") is None
    assert store.next_prompt("bob").text == "fresh"
    assert [p.text for p in store.list_prompts()] == ["busy", "quiet", "fresh"]


# ------------------------------------------------------------ generations


def test_generations_round_trip(store: FeedbackStore) -> None:
    prompt_id = store.add_prompt("Once upon a time")
    sampling = {"seed": 7, "temperature": 0.7, "top_p": 0.95, "max_new_tokens": 48}
    generation = store.record_generation(prompt_id, 0, " there was", [612, 373], [-1.25, -0.5], sampling)
    again = store.get_generation(generation.id)
    assert again == generation
    assert (again.token_ids, again.logprobs, again.sampling) == ((612, 373), (-1.25, -0.5), sampling)
    assert again.adapter_version == 0


# ------------------------------------------------------------- ratings


def test_rating_again_replaces_score_and_keeps_history(store: FeedbackStore) -> None:
    generation_id = _prompt_with_generations(store)[0]
    first = store.rate(generation_id, "alice", 2, "meh")
    second = store.rate(generation_id, "alice", 5)
    assert store.rate(generation_id, "alice", 5) == second  # a double click adds nothing
    store.rate(generation_id, "bob", 3)

    history = store.rating_history(generation_id, "alice")
    assert [(r.id, r.score, r.comment, r.current) for r in history] == [
        (first.id, 2, "meh", False),
        (second.id, 5, None, True),
    ]
    assert len(store.rating_history(generation_id)) == 3
    counts = store.counts()
    assert (counts["ratings"], counts["rating_revisions"], counts["raters"]) == (2, 3, 2)


def test_preferences(store: FeedbackStore) -> None:
    a, b, c = _prompt_with_generations(store, n=3)
    preference = store.prefer(a, b, "alice")
    assert store.prefer(a, b, "alice") == preference
    best = store.pick_best(c, [a, b, a], "bob")
    assert [(p.chosen_generation_id, p.rejected_generation_id) for p in best] == [(c, a), (c, b)]
    assert store.counts()["preferences"] == 3
    pairs = store.feedback_since().preferences
    assert [(p.chosen.id, p.rejected.id, p.preference.rater) for p in pairs] == [
        (a, b, "alice"),
        (c, a, "bob"),
        (c, b, "bob"),
    ]
    assert pairs[0].prompt_text == "Tell me a story."


# -------------------------------------------------------------- bad input


BAD_INPUT = {
    "score 0": lambda s, g, o, p: s.rate(g[0], "alice", 0),
    "score 6": lambda s, g, o, p: s.rate(g[0], "alice", 6),
    "score 3.5": lambda s, g, o, p: s.rate(g[0], "alice", 3.5),
    "score 4.0": lambda s, g, o, p: s.rate(g[0], "alice", 4.0),
    "score '4'": lambda s, g, o, p: s.rate(g[0], "alice", "4"),
    "score True": lambda s, g, o, p: s.rate(g[0], "alice", True),
    "score None": lambda s, g, o, p: s.rate(g[0], "alice", None),
    "unknown generation": lambda s, g, o, p: s.rate(999_999, "alice", 3),
    "generation id 0": lambda s, g, o, p: s.rate(0, "alice", 3),
    "generation id str": lambda s, g, o, p: s.rate("1", "alice", 3),
    "empty rater": lambda s, g, o, p: s.rate(g[0], "  ", 3),
    "unknown prompt": lambda s, g, o, p: s.record_generation(999_999, 0, "text"),
    "unknown adapter version": lambda s, g, o, p: s.record_generation(p, 7, "text"),
    "token/logprob mismatch": lambda s, g, o, p: s.record_generation(p, 0, "t", [1, 2], [-0.1]),
    "nan logprob": lambda s, g, o, p: s.record_generation(p, 0, "t", [1], [float("nan")]),
    "empty prompt": lambda s, g, o, p: s.add_prompt(""),
    "whitespace prompt": lambda s, g, o, p: s.add_prompt(" \n\t "),
    "prompt over limit": lambda s, g, o, p: s.add_prompt("x" * 4001),
    "one bad prompt in a batch": lambda s, g, o, p: s.add_prompts(["fine", "also fine", ""]),
    "unknown source": lambda s, g, o, p: s.add_prompt("fine", source="web"),
    "add_prompts given one string": lambda s, g, o, p: s.add_prompts("fine"),
    "generation not a NewGeneration": lambda s, g, o, p: s.record_generations(p, 0, [{"text": "t"}]),
    "invalid utf-8 bytes": lambda s, g, o, p: s.add_prompt(b"caf\xe9 \xff"),
    "lone surrogate prompt": lambda s, g, o, p: s.add_prompt("bad \ud800 text"),
    "lone surrogate generation": lambda s, g, o, p: s.record_generation(p, 0, "x\udfff"),
    "lone surrogate comment": lambda s, g, o, p: s.rate(g[0], "alice", 3, "\ud83d"),
    "NUL in prompt": lambda s, g, o, p: s.add_prompt("nul\x00byte"),
    "prompt not text": lambda s, g, o, p: s.add_prompt(42),
    "prefer itself": lambda s, g, o, p: s.prefer(g[0], g[0], "alice"),
    "prefer across prompts": lambda s, g, o, p: s.prefer(g[0], o[0], "alice"),
    "prefer unknown": lambda s, g, o, p: s.prefer(g[0], 999_999, "alice"),
    "best of one": lambda s, g, o, p: s.pick_best(g[0], [], "alice"),
    "best across prompts": lambda s, g, o, p: s.pick_best(g[0], [g[1], o[0]], "alice"),
    "publish over existing": lambda s, g, o, p: s.publish_version(1, _record(0), "a2"),
    "publish from unknown parent": lambda s, g, o, p: s.publish_version(5, _record(4), "a5"),
    "publish without lease": lambda s, g, o, p: s.publish_version(2, _record(1), "a2", holder="worker"),
    "metrics with nan": lambda s, g, o, p: s.publish_version(
        2, _record(1, metrics={"loss": float("inf")}), "a2"
    ),
    "publish a bare dict": lambda s, g, o, p: s.publish_version(2, {"parent": 1}, "a2"),
    "negative rating count": lambda s, g, o, p: s.publish_version(2, _record(1, n_ratings=-1), "a2"),
    "rollback to unknown": lambda s, g, o, p: s.rollback_to(9),
    "negative lease ttl": lambda s, g, o, p: s.acquire_lease("worker", -1),
    "metric not a number": lambda s, g, o, p: s.record_metrics(1, 0, {"reward": "high"}),
}


@pytest.fixture(scope="module", params=BACKENDS)
def seeded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    """One store per backend shared by the bad-input cases (each checks it wrote nothing)."""
    directory = tmp_path_factory.mktemp("bad-input")
    with fresh_store_url(request.param, directory, migrated_sqlite_template()) as url:
        with FeedbackStore(url) as feedback_store:
            generations = _prompt_with_generations(feedback_store, "one", n=2)
            other = _prompt_with_generations(feedback_store, "two", n=1)
            feedback_store.rate(generations[0], "alice", 4, "keep me")
            feedback_store.publish_version(1, _record(0, Cursor(1, 0), n_ratings=1), "adapters/v1")
            prompt_id = feedback_store.get_generation(generations[0]).prompt_id
            yield Seeded(feedback_store, generations, other, prompt_id)


@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
def test_bad_input_raises_store_error_and_writes_nothing(seeded: Seeded, case: str) -> None:
    before = _snapshot(seeded.store)
    with pytest.raises(StoreError) as info:
        BAD_INPUT[case](seeded.store, seeded.generations, seeded.other, seeded.prompt_id)
    assert isinstance(info.value, ValueError)
    assert str(info.value) and "Traceback" not in str(info.value)
    assert _snapshot(seeded.store) == before


# ------------------------------------------------------------ verbatim text


def test_text_stored_verbatim(store: FeedbackStore) -> None:
    prompt_ids = store.add_prompts(VERBATIM, source="rater")
    assert len(set(prompt_ids)) == len(VERBATIM)
    for text, prompt_id in zip(VERBATIM, prompt_ids, strict=True):
        generation = store.record_generation(prompt_id, 0, text)
        store.rate(generation.id, text, 3, text)
        assert store.get_prompt(prompt_id).text.encode() == text.encode()
        assert store.get_generation(generation.id).text.encode() == text.encode()
        [rating] = store.rating_history(generation.id)
        assert (rating.comment.encode(), rating.rater) == (text.encode(), text.strip())
    assert store.add_prompts([VERBATIM[0]]) == prompt_ids[:1]
    assert store.counts()["ratings"] == len(VERBATIM)  # the DROP TABLE did nothing
    assert store.add_prompt(VERBATIM[0].encode()) == prompt_ids[0]  # valid UTF-8 bytes are text


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=200))
def test_any_text_round_trips(store: FeedbackStore, text: str) -> None:
    prompt_id = store.add_prompt("hypothesis prompt")
    generation = store.record_generation(prompt_id, 0, text, sampling={"note": text})
    stored = store.get_generation(generation.id)
    assert (stored.text, stored.sampling["note"]) == (text, text)


# -------------------------------------------------------------- the lease


def test_training_lease(store: FeedbackStore) -> None:
    assert not store.worker_status().present
    assert store.acquire_lease("worker-a", 30)
    assert not store.acquire_lease("worker-b", 30)
    assert store.acquire_lease("worker-a", 30)  # re-acquiring our own lease is fine
    assert store.renew_lease("worker-a", 30, state="training iteration 2 of 4")
    assert not store.renew_lease("worker-b", 30)
    status = store.worker_status()
    assert (status.holder, status.state, status.present) == ("worker-a", "training iteration 2 of 4", True)
    assert not store.release_lease("worker-b")
    assert store.release_lease("worker-a")
    assert not store.worker_status().present
    assert store.acquire_lease("worker-b", 0.05, state="waiting for 3 more ratings")
    time.sleep(0.1)
    assert not store.worker_status().present  # expired: the panel shows the worker as absent
    assert store.acquire_lease("worker-c", 30)
    assert not store.renew_lease("worker-b", 30)
    assert store.worker_status().holder == "worker-c"


# --------------------------------------------------------- adapter versions


def test_versions_publish_rollback_and_fencing(store: FeedbackStore) -> None:
    generation_id = _prompt_with_generations(store)[0]
    rating = store.rate(generation_id, "alice", 5)
    assert (store.next_version_number(), store.serving_version()) == (1, 0)
    assert store.latest_published_version() is None
    assert store.acquire_lease("worker", 60)

    v1 = store.publish_version(
        1, _record(0, Cursor(rating.id, 0), n_ratings=1, metrics={"reward": 0.5}), "adapters/v1", holder="worker"
    )
    assert (v1.status, v1.cursor, v1.metrics) == ("published", Cursor(rating.id, 0), {"reward": 0.5})
    assert (v1.parent, v1.n_ratings, v1.n_preferences, v1.path) == (0, 1, 0, "adapters/v1")
    store.publish_version(2, _record(1, Cursor(rating.id, 0)), "adapters/v2")
    assert store.serving_version() == 2
    assert store.rollback_to(1) == [2]
    assert store.serving_version() == 1
    assert store.get_version(2).status == "rolled_back"
    with pytest.raises(StoreError, match="rolled_back"):
        store.publish_version(3, _record(2), "adapters/v3")
    failed = store.record_failed_version(3, 2, "parent was rolled back", path="adapters/v3")
    assert (failed.status, failed.metrics["reason"]) == ("failed", "parent was rolled back")
    assert store.next_version_number() == 4
    store.publish_version(4, _record(1), "adapters/v4")
    assert store.latest_published_version().version == store.serving_version() == 4
    assert store.rollback_to(0) == [1, 4]
    assert store.serving_version() == 0
    assert [(v.version, v.status) for v in store.list_versions()] == [
        (1, "rolled_back"),
        (2, "rolled_back"),
        (3, "failed"),
        (4, "rolled_back"),
    ]
    store.release_lease("worker")
    with pytest.raises(StoreError, match="lease"):
        store.publish_version(5, _record(0), "adapters/v5", holder="worker")


def test_feedback_cursor_counts_new_feedback_exactly(store: FeedbackStore) -> None:
    a, b, c = _prompt_with_generations(store, n=3)
    for generation_id, score in ((a, 1), (b, 4), (c, 5)):
        store.rate(generation_id, "alice", score)
    store.prefer(c, a, "alice")

    first = store.feedback_since(Cursor(), limit=2)
    assert [r.rating.score for r in first.ratings] == [1, 4]
    assert [(p.chosen.id, p.rejected.id) for p in first.preferences] == [(c, a)]
    rest = store.feedback_since(first.cursor)
    assert ([r.rating.score for r in rest.ratings], rest.preferences) == ([5], ())
    assert rest.cursor.preference_id == first.preferences[0].preference.id

    store.publish_version(1, _record(0, rest.cursor, n_ratings=3, n_preferences=1), "adapters/v1")
    assert store.cursor_of(1) == rest.cursor
    counts = store.count_feedback_since(store.cursor_of(1))
    assert (counts.ratings, counts.preferences) == (0, 0)

    store.rate(a, "alice", 2)  # a changed mind is new feedback; the old rating is not repeated
    new = store.feedback_since(store.cursor_of(1))
    assert [(r.generation.id, r.rating.score) for r in new.ratings] == [(a, 2)]
    assert new.ratings[0].generation.token_ids == ()
    assert store.counts()["ratings_since_serving"] == 1
    # a page still serving version 0 counts from there (3 current ratings, one of them revised)
    assert store.counts(since_version=0)["ratings_since_serving"] == 3
    assert store.counts(since_version=0)["preferences_since_serving"] == 1
    assert store.feedback_since(new.cursor).ratings == ()


def test_metrics_and_version_summary(store: FeedbackStore) -> None:
    prompt_id = store.add_prompt("p")
    base = store.record_generation(prompt_id, 0, "base answer")
    store.publish_version(1, _record(0), "adapters/v1")
    tuned = store.record_generations(prompt_id, 1, [NewGeneration("tuned 1"), NewGeneration("tuned 2")])
    store.rate(base.id, "alice", 2)
    store.rate(base.id, "bob", 3)
    store.rate(tuned[0].id, "alice", 5)
    store.rate(tuned[1].id, "alice", 3)
    store.rate(tuned[1].id, "alice", 4)  # only the current rating counts

    summary = store.version_rating_summary()
    assert [(s.version, s.mean_rating, s.n_ratings) for s in summary] == [(0, 2.5, 2), (1, 4.5, 2)]

    assert store.record_metrics(2, 0, {"reward": 0.25, "kl": 0.01}) == 2
    assert store.record_metrics(2, 1, {"reward": 0.5}) == 1
    points = store.metrics(version=2)
    assert [(p.iteration, p.name, p.value) for p in points] == [
        (0, "reward", 0.25),
        (0, "kl", 0.01),
        (1, "reward", 0.5),
    ]
    assert store.metrics(since_id=points[1].id) == points[2:]
    assert store.metrics(version=1) == []


# ------------------------------------------------------------------ engines


def test_sqlite_url_or(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "feedback.db"
    assert sqlite_url_or(path) == f"sqlite:///{path}"
    assert path.parent.is_dir()
    url = "postgresql+psycopg://u:p@127.0.0.1:5432/db"
    assert sqlite_url_or(url) == url
    sqlite_url_or(f"sqlite:///{tmp_path / 'other' / 'x.db'}")
    assert (tmp_path / "other").is_dir()


def test_sqlite_file_created_with_wal_busy_timeout_and_foreign_keys(tmp_path: Path) -> None:
    path = tmp_path / "data" / "feedback.db"
    with FeedbackStore(path) as feedback_store:
        assert path.exists()
        with feedback_store._engine.connect() as connection:
            pragma = lambda name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()  # noqa: E731
            assert (pragma("journal_mode"), pragma("foreign_keys"), pragma("busy_timeout")) == (
                "wal",
                1,
                30000,
            )
        assert feedback_store.schema_revision() == "0006"
