"""The training lease has a fencing token, is judged by the database's clock, and a worker cleans only
staging folders older than its own token; version folders are readable by other users."""
from __future__ import annotations

import os
import stat
from datetime import timedelta

import pytest

from db import Cursor, StoreError, VersionRecord
from db import store as store_module
from store_fixtures import store, store_url  # noqa: F401  (fixtures)
from test_adapters import policy, publish, store_dir  # noqa: F401  (fixtures)
from ppo_feedback.adapters import VersionLifecycle

RECORD = VersionRecord(parent=0, base_model="tiny", cursor=Cursor(), n_ratings=0, n_preferences=0, metrics={})


def test_a_second_worker_under_the_same_id_fences_the_first_off_every_write(store):
    first = store.acquire_lease("worker", 60)
    second = store.acquire_lease("worker", 60)  # the same --worker-id started again (a restart, or by mistake)
    assert first and second and second > first
    assert not store.renew_lease("worker", 60, token=first)  # today: both hold it
    assert not store.begin_round("worker", token=first)
    with pytest.raises(StoreError, match="acquired again"):
        store.record_metrics(1, 1, {"objective/kl": 0.1}, holder="worker", token=first)
    with pytest.raises(StoreError, match="acquired again"):
        store.publish_version(1, RECORD, "v0001", holder="worker", token=first)
    with pytest.raises(StoreError, match="acquired again"):
        store.record_failed_version(1, 0, "diverged", holder="worker", token=first)
    assert store.acquire_lease("worker", 60, token=first) is None  # no taking it back while the other renews
    assert not store.release_lease("worker", token=first)
    # the new holder writes as before
    assert store.renew_lease("worker", 60, token=second) and store.begin_round("worker", token=second)
    assert store.record_metrics(1, 1, {"objective/kl": 0.1}, holder="worker", token=second) == 1
    assert store.publish_version(1, RECORD, "v0001", holder="worker", token=second).version == 1
    assert store.worker_status().present


def test_every_acquisition_increments_the_token(store):
    tokens = [store.acquire_lease("a", 60)]
    assert store.release_lease("a", token=tokens[0])
    tokens.append(store.acquire_lease("b", 60))
    tokens.append(store.acquire_lease("b", 60, token=tokens[1]))  # taking back one's own lease: a new token too
    assert tokens == sorted(set(tokens)) and len(tokens) == 3
    assert store.acquire_lease("a", 60) is None and store.acquire_lease("a", 60, token=tokens[0]) is None


@pytest.mark.postgres
def test_expiry_is_judged_by_the_databases_clock_not_the_machines(store_url, monkeypatch):
    from db import FeedbackStore

    if not store_url.startswith("postgresql"):
        pytest.skip("SQLite's clock is this machine's")
    with FeedbackStore(store_url) as store:
        assert store.acquire_lease("a", 60)
        real = store_module.utcnow
        monkeypatch.setattr(store_module, "utcnow", lambda: real() + timedelta(hours=1))  # a machine an hour ahead
        assert store.acquire_lease("b", 60) is None  # today: b thinks a's lease expired and takes it
        assert store.worker_status().present and store.worker_status().holder == "a"


def test_a_publish_removes_only_staging_folders_of_older_tokens(policy, store, store_dir):
    store_dir.root.mkdir(parents=True)
    older, newer, legacy = (store_dir.root / name for name in (".tmp-t0000000004-x", ".tmp-t0000000006-x",
                                                               ".tmp-abc"))
    for folder in (older, newer, legacy):
        folder.mkdir()
    token = store.acquire_lease("worker", 60)
    for _ in range(4):  # make it token 5
        token = store.acquire_lease("worker", 60)
    assert token == 5
    assert VersionLifecycle(store, store_dir).publish(policy, RECORD, holder="worker", token=token) == 1
    assert newer.is_dir()  # today: a worker that lost its lease deletes the new holder's staging folder
    assert not older.exists() and not legacy.exists()


def test_version_folders_are_readable_by_other_users_whatever_the_umask(policy, store, store_dir):
    previous = os.umask(0o077)
    try:
        version = publish(store_dir, policy, store)
    finally:
        os.umask(previous)
    folder = store_dir.path(version)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755  # today: 0700 (mkdtemp)
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o644}


@pytest.mark.postgres
def test_a_publish_racing_a_rollback_of_its_parent_is_never_served(store_url, monkeypatch):
    import threading
    import time

    from db import FeedbackStore

    if not store_url.startswith("postgresql"):
        pytest.skip("SQLite serialises every writer (BEGIN IMMEDIATE)")
    with FeedbackStore(store_url) as store:
        store.publish_version(1, RECORD, "v0001")
        barrier, real_get, errors = threading.Barrier(2, timeout=10), store_module._get, []

        def slow_get(s, model, key, what):
            row = real_get(s, model, key, what)
            if what == "parent version":  # the publish has read its parent "published": the rollback runs now
                barrier.wait()
                time.sleep(1.0)
            return row

        monkeypatch.setattr(store_module, "_get", slow_get)

        def publish_child():
            try:
                store.publish_version(2, VersionRecord(parent=1, base_model="tiny", cursor=Cursor(), n_ratings=0,
                                                       n_preferences=0, metrics={}), "v0002")
            except StoreError as exc:
                errors.append(exc)

        def roll_back():
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                pass  # the publish waits for the rollback's lock: never reached the barrier
            store.rollback_to(0)

        threads = [threading.Thread(target=publish_child), threading.Thread(target=roll_back)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        monkeypatch.undo()
        versions = {v.version: v for v in store.list_versions()}
        served = store.serving_version()
        # today: v1 rolled back and v2, trained from it, published and served
        assert served == 0, {v: (r.status, r.parent) for v, r in versions.items()}
