"""Concurrency and durability: parallel writers from separate connections, a killed writer."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from db import FeedbackStore, NewGeneration
from store_fixtures import sqlite_path, store, store_url  # noqa: F401  (fixtures)

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
THREADS = 8
RATINGS_PER_THREAD = 250


def _generations(store: FeedbackStore, n: int) -> list[int]:
    prompt_id = store.add_prompt("Write a haiku about databases.")
    return [
        g.id for g in store.record_generations(prompt_id, 0, [NewGeneration(f"haiku {i}") for i in range(n)])
    ]


def _in_threads(url: str, work: Callable[[FeedbackStore, int], T]) -> list[T]:
    """Run work(store, thread_index) in THREADS threads, each with its own store (own
    connections), started together; return the results and fail on any exception."""
    stores = [FeedbackStore(url) for _ in range(THREADS)]
    barrier = threading.Barrier(THREADS)
    results: list[T | None] = [None] * THREADS
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait()
            results[index] = work(stores[index], index)
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for feedback_store in stores:
        feedback_store.close()
    assert errors == [], errors[:3]
    return results  # type: ignore[return-value]


def test_parallel_raters_lose_and_duplicate_nothing(store: FeedbackStore, store_url: str) -> None:
    generations = _generations(store, RATINGS_PER_THREAD)

    def rate_all(feedback_store: FeedbackStore, index: int) -> list[int]:
        return [feedback_store.rate(g, f"rater-{index}", 1 + (g + index) % 5).id for g in generations]

    ids = [i for thread_ids in _in_threads(store_url, rate_all) for i in thread_ids]
    assert len(ids) == len(set(ids)) == THREADS * RATINGS_PER_THREAD
    counts = store.counts()
    assert (counts["ratings"], counts["rating_revisions"]) == (2000, 2000)
    assert sorted(r.rating.id for r in store.feedback_since().ratings) == sorted(ids)


def test_one_rater_rating_one_generation_from_many_connections(store: FeedbackStore, store_url: str) -> None:
    [generation] = _generations(store, 1)

    def rerate(feedback_store: FeedbackStore, index: int) -> None:
        for attempt in range(20):
            feedback_store.rate(generation, "alice", 1 + (index + attempt) % 5)

    _in_threads(store_url, rerate)
    history = store.rating_history(generation, "alice")
    assert [r.current for r in history].count(True) == 1
    assert history[-1].current
    assert 1 < len(history) <= THREADS * 20


def test_exactly_one_worker_gets_the_lease(store: FeedbackStore, store_url: str) -> None:
    won = _in_threads(store_url, lambda s, index: s.acquire_lease(f"worker-{index}", 60))
    assert won.count(True) == 1
    assert store.worker_status().holder == f"worker-{won.index(True)}"


CHILD = """
import sys
from db import FeedbackStore
store = FeedbackStore(sys.argv[1])
for generation_id in range(int(sys.argv[2]), int(sys.argv[3]) + 1):
    rating = store.rate(generation_id, "doomed", 1 + generation_id % 5)
    print(rating.id, flush=True)
"""


def test_sigkill_mid_burst_keeps_every_returned_rating(store: FeedbackStore, store_url: str) -> None:
    generations = _generations(store, 3000)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, store_url, str(generations[0]), str(generations[-1])],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert child.stdout is not None
    returned = []
    for line in child.stdout:
        returned.append(int(line))
        if len(returned) == 150:
            os.kill(child.pid, signal.SIGKILL)
            break
    returned += [int(line) for line in child.stdout]  # lines printed before it died
    assert child.wait(timeout=30) == -signal.SIGKILL
    assert 150 <= len(returned) < len(generations), "the child must die mid-burst"

    stored = {r.rating.id for r in store.feedback_since().ratings}
    assert set(returned) <= stored
    assert len(stored) - len(returned) in (0, 1)  # at most the call that had not returned yet
    path = sqlite_path(store_url)
    if path is not None:
        with sqlite3.connect(path) as connection:
            assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_the_same_submission_sent_at_once_from_every_thread_is_stored_once(store: FeedbackStore,
                                                                          store_url: str) -> None:
    ids = _generations(store, 3)
    page = store.get_generation(ids[0]).page_id

    def submit(feedback_store: FeedbackStore, index: int) -> int:
        return feedback_store.submit_page(page, "ana", {ids[0]: 5, ids[1]: 2}, [ids[0]], client_key="one-page").id

    assert len(set(_in_threads(store_url, submit))) == 1  # every retry got the one stored submission
    assert len(store.rating_history(ids[0])) == 1 and len(store.my_submissions("ana")) == 1
    assert len(store.feedback_since().preferences) == 2
