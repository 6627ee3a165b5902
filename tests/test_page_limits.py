"""One user cannot starve everyone: the page's queue is bounded, and so are each user's model calls."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from gradio_client import Client

from db import FeedbackStore
from ppo_feedback.page import FeedbackApp, build_demo
from ppo_feedback.page.limits import model_calls_of
from store_fixtures import migrated_sqlite_template
from test_ui_support import PASSWORDS, SAMPLING, ScriptedServing, launch, write_users


@pytest.fixture
def store(tmp_path: Path):
    path = tmp_path / "feedback.db"
    path.write_bytes(migrated_sqlite_template().read_bytes())
    with FeedbackStore(path) as opened:
        yield opened


def test_the_queue_has_the_configured_size(store, tmp_path):
    app = FeedbackApp(ScriptedServing(store, ["x"], tmp_path / "adapters"), store, SAMPLING, queue_size=7)
    assert build_demo(app)._queue.max_size == 7


def test_a_user_with_too_many_generations_in_flight_is_refused_and_others_are_not(store, tmp_path):
    serving = ScriptedServing(store, ["a slow answer " * 8], tmp_path / "adapters", step_s=0.15, chars=8)
    launched = launch(serving, store, users=write_users(tmp_path / "users.json"), generations_per_user=2)
    try:
        ben = Client(launched.url, auth=("ben", PASSWORDS["ben"]), verbose=False)
        ana = Client(launched.url, auth=("ana", PASSWORDS["ana"]), verbose=False)
        jobs = [ben.submit("Ben asks", 1, api_name="/generate") for _ in range(2)]
        deadline = time.monotonic() + 30
        while model_calls_of(launched.demo._queue, "ben") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert model_calls_of(launched.demo._queue, "ben") == 2
        with pytest.raises(Exception, match="You already have 2 generations waiting or running"):
            ben.predict("Ben asks again", 1, api_name="/generate")
        assert ana.predict("Ana asks", 1, api_name="/generate")[0]["text"]  # another user is not held up
        assert all(job.result(timeout=60)[0]["text"] for job in jobs)  # ben's first two were served
        assert ben.predict("Ben asks later", 1, api_name="/generate")[0]["text"]  # and he may ask again
        assert sum(1 for p in store.list_prompts(active_only=False) if p.text == "Ben asks again") == 0  # nothing stored
    finally:
        launched.close()
