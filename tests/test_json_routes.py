"""The cheap endpoints as plain JSON routes beside the page (`POST /json/<name>`, issue 18): the same
function as the Gradio endpoint, so the same checks (login session, shown-to, number bounds), and
every refusal a JSON {"error"} with a 4xx code; a database outage a 503 with Retry-After."""
from __future__ import annotations

import json

import httpx
import pytest
from sqlalchemy.exc import OperationalError

from ppo_feedback import auth
from ppo_feedback.auth import write_users_file
from ppo_feedback.page.api import ENDPOINTS
from ppo_feedback.page.inputs import DATABASE_UNAVAILABLE, shown_errors
from ppo_feedback.page.routes import MAX_BODY_BYTES
from page_fixtures import serve, store  # noqa: F401  (fixtures)
from test_ui_support import PASSWORDS, write_users


def post(client, page, name: str, body=None, **kwargs) -> httpx.Response:
    return client.post(f"{page.url}json/{name}", json=body, **kwargs)


def test_a_rating_through_the_json_route_is_stored_with_the_gradio_endpoints_checks(serve, store):
    page = serve()
    records = page.app.generate("Say hello.", 2, "amy")
    gid = records[0]["generation_id"]
    with httpx.Client() as client:
        done = post(client, page, "rate", {"generation_id": gid, "score": 4, "rater": "amy"})
        assert done.status_code == 200 and done.json() == {"ok": True}, done.text
        assert done.headers["server-timing"].startswith("handler;dur=")
        assert post(client, page, "rate", {"generation_id": gid, "score": 4, "rater": "amy"}).json() == {"ok": True}
        refusals = {
            "not shown to bo": ({"generation_id": gid, "score": 5, "rater": "bo"}, "shown"),
            "id of 2**63": ({"generation_id": 2**63, "score": 5, "rater": "amy"}, "Unknown generation id"),
            "score 6": ({"generation_id": gid, "score": 6, "rater": "amy"}, "1 to 5"),
            "score as text": ({"generation_id": gid, "score": "5", "rater": "amy"}, "1 to 5"),
            "unknown argument": ({"generation_id": gid, "score": 5, "sneaky": 1}, "unknown argument"),
            "missing argument": ({"score": 5}, "missing argument"),
            "the request itself": ({"generation_id": gid, "score": 5, "request": {"username": "x"}}, "unknown"),
            "not an object": ([gid, 5], "JSON object"),
        }
        for why, (body, message) in refusals.items():
            refused = post(client, page, "rate", body)
            assert refused.status_code == 400 and message in refused.json()["error"], (why, refused.text)
        hostile = {"a 5,000-digit number": '{"generation_id": ' + "9" * 5000 + ', "score": 5}',
                   "deep nesting": '{"generation_id": ' + "[" * 100_000 + "]" * 100_000 + "}",
                   "not JSON": "{generation_id: 1"}
        for why, body in hostile.items():
            refused = client.post(f"{page.url}json/rate", content=body)
            assert refused.status_code == 400 and refused.json()["error"], (why, refused.text)
        too_big = client.post(f"{page.url}json/rate", content=b" " * (MAX_BODY_BYTES + 1))
        assert too_big.status_code == 413
        assert client.post(f"{page.url}json/rollback", json={"version": 0}).status_code in (404, 405)
    assert [(r.rater, r.score) for r in store.rating_history(gid)] == [("amy", 4)]  # stored once


def test_every_json_route_answers_as_its_gradio_endpoint(serve):
    page = serve()
    records = page.app.generate("Say hello.", 2, "amy")
    with httpx.Client() as client:
        submitted = post(client, page, "submit", {"page_id": records[0]["page_id"], "rater": "amy",
                                                  "scores": {str(records[0]["generation_id"]): 5}, "key": "k1"})
        assert submitted.status_code == 200 and submitted.json()["submission"]["scores"], submitted.text
        mine = post(client, page, "my_submissions", {"limit": 5, "rater": "amy"}).json()
        assert [s["submission_id"] for s in mine] == [submitted.json()["submission"]["submission_id"]]
        assert post(client, page, "my_submissions", {"limit": 10**30, "rater": "amy"}).status_code == 400
        assert post(client, page, "undo", {"rater": "amy"}).json()["undone"]["status"] == "undone"
        assert post(client, page, "status").json()["serving_version"] == 0
        assert post(client, page, "guidelines", None).json()["version"] == 0
        assert set(post(client, page, "next_prompt", {"rater": "amy"}).json()) == {"prompt_id", "text"}
        assert post(client, page, "skip", {"prompt_id": 2**64, "rater": "amy"}).status_code == 400
    assert {e.name for e in ENDPOINTS if e.json_route} == {
        "next_prompt", "rate", "prefer", "submit", "undo", "skip", "my_submissions", "guidelines", "status"}


def test_with_logins_a_json_route_acts_as_the_session_user_and_refuses_everyone_else(serve, store, tmp_path):
    path = tmp_path / "users.json"
    page = serve(users=write_users(path))
    gid = page.app.generate("Say hello.", 1, "ben")[0]["generation_id"]
    with httpx.Client() as anonymous:
        refused = post(anonymous, page, "rate", {"generation_id": gid, "score": 5})
        assert refused.status_code == 401 and "Log in" in refused.json()["error"]
        assert post(anonymous, page, "status").status_code == 401
    with httpx.Client() as ben, httpx.Client() as ana:
        assert ben.post(f"{page.url}login", data={"username": "ben", "password": PASSWORDS["ben"]}).status_code == 200
        assert ana.post(f"{page.url}login", data={"username": "ana", "password": PASSWORDS["ana"]}).status_code == 200
        assert post(ben, page, "rate", {"generation_id": gid, "score": 5, "rater": "ana"}).json() == {"ok": True}
        assert post(ana, page, "rate", {"generation_id": gid, "score": 1}).status_code == 400  # not shown to ana
        assert post(ben, page, "status").json()["worker"]["holder"] is None  # a rater's view
        users = auth.read_users_file(path)
        del users["ben"]
        write_users_file(path, users)
        gone = post(ben, page, "rate", {"generation_id": gid, "score": 4})
        assert gone.status_code == 401
    assert [(r.rater, r.score) for r in store.rating_history(gid)] == [("ben", 5)]


def test_a_database_outage_is_a_503_with_retry_after_and_a_clear_gradio_error(serve, monkeypatch):
    import gradio as gr

    page = serve()
    gid = page.app.generate("Say hello.", 1, "amy")[0]["generation_id"]

    def locked(*_args, **_kwargs):
        raise OperationalError("BEGIN IMMEDIATE", {}, Exception("database is locked"))

    monkeypatch.setattr(page.app.store, "rate", locked)
    with httpx.Client() as client:
        down = post(client, page, "rate", {"generation_id": gid, "score": 5, "rater": "amy"})
    assert down.status_code == 503 and down.json() == {"error": DATABASE_UNAVAILABLE}
    assert int(down.headers["retry-after"]) > 0
    with pytest.raises(gr.Error, match="database is unavailable"):
        shown_errors(locked)()
    with pytest.raises(KeyError):  # anything else stays a server error
        shown_errors(lambda: {}["x"])()
    assert json.loads(json.dumps(DATABASE_UNAVAILABLE))
