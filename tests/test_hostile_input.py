"""Hostile numbers and nesting get clear errors and lose nothing; a rater's /status names no server
details (issue 18)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import gradio as gr
import pytest

from db import Cursor, NewGeneration, StoreError
from ppo_feedback.page import FeedbackApp, parse_prompt_upload
from ppo_feedback.page.api import ENDPOINTS, Api, endpoint_function
from ppo_feedback.page.controller import SWAP_ERROR_FOR_RATERS
from page_fixtures import store  # noqa: F401  (fixture)
from test_ui_support import SAMPLING, ScriptedServing, write_users

HUGE = 2**63


@pytest.fixture
def app(store, tmp_path):
    serving = ScriptedServing(store, ["one", "two"], tmp_path / "adapters")
    app = FeedbackApp(serving, store, SAMPLING, users=write_users(tmp_path / "users.json"))
    yield app
    app.close()


def call(app: FeedbackApp, name: str, *args, user: str = "ana"):
    """Call an endpoint as Gradio would, as `user`."""
    endpoint = next(e for e in ENDPOINTS if e.name == name)
    return endpoint_function(Api(app), endpoint)(*args, request=SimpleNamespace(username=user))


# ------------------------------------------------------------------------------- numbers

STORE_CALLS = {
    "get_version": lambda s: s.get_version(HUGE),
    "rollback_to": lambda s: s.rollback_to(HUGE),
    "cursor_of": lambda s: s.cursor_of(HUGE),
    "metrics of a version": lambda s: s.metrics(version=HUGE),
    "metrics since": lambda s: s.metrics(since_id=HUGE),
    "rating_revisions": lambda s: s.rating_revisions(after_id=HUGE),
    "feedback_since": lambda s: s.feedback_since(Cursor(HUGE, 0)),
    "count_feedback_since": lambda s: s.count_feedback_since(Cursor(0, HUGE)),
    "my_submissions": lambda s: s.my_submissions("ana", HUGE),
    "record_metrics": lambda s: s.record_metrics(HUGE, 0, {"loss": 1.0}),
    "record_metrics iteration": lambda s: s.record_metrics(1, HUGE, {"loss": 1.0}),
    "rate": lambda s: s.rate(HUGE, "ana", 3),
    "record_generations": lambda s: s.record_generations(1, HUGE, [NewGeneration("x")]),
}


@pytest.mark.parametrize("name", STORE_CALLS)
def test_numbers_past_a_database_integer_are_a_clear_store_error(store, name):
    store.add_prompts(["a prompt"])
    before = store.counts()
    with pytest.raises(StoreError, match=str(HUGE)):
        STORE_CALLS[name](store)
    assert store.counts() == before


@pytest.mark.parametrize("name, args", [
    ("rollback", (HUGE,)), ("export_adapter", (float(HUGE),)), ("rate", (HUGE, 3)), ("prefer", (HUGE, [1])),
    ("skip", (HUGE,)), ("submit", (HUGE, {"1": 3})), ("my_submissions", (HUGE,)),
])
def test_numbers_past_a_database_integer_are_a_clear_api_error(app, name, args):
    with pytest.raises(gr.Error) as refused:
        call(app, name, *args)
    assert "922337203685477" in refused.value.message


def test_a_huge_number_or_deep_nesting_in_an_uploaded_jsonl_is_a_clear_error(app, store):
    before = len(store.list_prompts(active_only=False))
    huge = json.dumps({"prompt": "fine"}) + "\n" + '{"prompt": "x", "n": ' + "9" * 5000 + "}"
    with pytest.raises(ValueError, match="Line 2 holds a number of more than 4,300 digits"):
        parse_prompt_upload(huge, "p.jsonl")
    deep = '{"prompt": "x", "n": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(ValueError, match="Line 1 nests arrays or objects too deeply"):
        parse_prompt_upload(deep, "p.jsonl")
    with pytest.raises(ValueError, match="Line 2 holds a number"):
        app.add_prompts(huge, "p.jsonl")
    assert len(store.list_prompts(active_only=False)) == before  # all or nothing


# -------------------------------------------------------------------------------- /status

def test_a_raters_status_names_no_worker_host_nor_server_paths(app, store):
    store.acquire_lease("build-7.internal:4242", 60, state="training")
    app.serving.last_swap_error = "version 3 refused: /srv/ppo/adapters/v0003/adapter_model.safetensors: bad checksum"
    admin = call(app, "status", user="ana")
    assert admin["worker"]["holder"] == "build-7.internal:4242" and "/srv/ppo" in admin["swap_error"]
    rater = call(app, "status", user="ben")
    assert rater["worker"]["holder"] is None and rater["swap_error"] == SWAP_ERROR_FOR_RATERS
    assert "build-7" not in json.dumps(rater) and "/srv" not in json.dumps(rater)
    assert app.status()["worker"]["holder"] == "build-7.internal:4242"  # the shared cache is not changed
    app.serving.last_swap_error = None
    app.forget_status()
    assert call(app, "status", user="ben")["swap_error"] is None
