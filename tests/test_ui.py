"""The page's logic without a server or a model: users file, uploads, submissions, status, limits, options."""
from __future__ import annotations

import asyncio
import inspect
import json
import os
import shutil
import stat
from types import SimpleNamespace

import pytest

from db import FeedbackStore, NewGeneration
from store_fixtures import migrated_sqlite_template
from ppo_feedback import auth
from ppo_feedback.config import AppConfig, SamplingConfig
from ppo_feedback.page import (KEYBOARD_HEAD, LOCAL_USER, FeedbackApp, Forbidden, builtin_prompts, build_demo,
                             launch_options, parse_prompt_upload, shown_errors)

import gradio as gr
from ppo_feedback.page.cards import ShownPage, derived_order, round_note, shown_from_records
from ppo_feedback.page.controller import page_records


# --------------------------------------------------------------------------------------- users file

def test_passwords_are_hashed_with_pbkdf2_and_verified_in_constant_time():
    encoded = auth.hash_password("correct horse", iterations=1000)
    scheme, iterations, salt, digest = encoded.split("$")
    assert (scheme, iterations) == ("pbkdf2_sha256", "1000") and "correct horse" not in encoded
    assert auth.verify_password("correct horse", encoded)
    assert not auth.verify_password("correct horse!", encoded)
    assert auth.hash_password("correct horse", iterations=1000) != encoded  # fresh salt each time
    assert auth.DEFAULT_ITERATIONS >= 600_000
    assert not auth.verify_password("x", "x") and not auth.verify_password("x", "pbkdf2_sha256$1000$!!$!!")


def test_a_users_file_with_a_clear_text_password_is_refused(tmp_path):
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"users": {"ana": {"password": "hunter2", "admin": True}}}))
    with pytest.raises(auth.AuthFileError, match="not a pbkdf2_sha256 hash"):
        auth.UserDirectory(path)
    path.write_text("{not json")
    with pytest.raises(auth.AuthFileError, match="not valid JSON"):
        auth.read_users_file(path)
    with pytest.raises(auth.AuthFileError, match="cannot read"):
        auth.read_users_file(tmp_path / "missing.json")


def test_logins_admins_and_reloading_the_file(tmp_path):
    path = tmp_path / "users.json"
    auth.write_users_file(path, {"ana": auth.User("ana", auth.hash_password("a-pw", 1000), admin=True)})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    users = auth.UserDirectory(path)
    assert users.check("ana", "a-pw") and not users.check("ana", "b-pw") and not users.check("nobody", "a-pw")
    assert users.is_admin("ana") and not users.is_admin("ben") and not users.is_admin(None)

    auth.write_users_file(path, {"ana": auth.User("ana", auth.hash_password("a-pw", 1000), admin=True),
                                 "ben": auth.User("ben", auth.hash_password("b-pw", 1000))})
    os.utime(path, ns=(1, 10**18))  # a different modification time even on coarse clocks
    assert users.check("ben", "b-pw") and not users.is_admin("ben")
    path.write_text("broken")
    os.utime(path, ns=(1, 2 * 10**18))
    assert users.check("ben", "b-pw") and "not valid JSON" in users.last_error  # last good users stay


def test_the_auth_command_line_adds_lists_and_removes_users(tmp_path, monkeypatch, capsys):
    import io

    path = tmp_path / "users.json"
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    assert auth.main(["add", str(path), "ana", "--admin", "--password-stdin", "--iterations", "1000"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("other\n"))
    assert auth.main(["add", str(path), "ben", "--password-stdin", "--iterations", "1000"]) == 0
    users = auth.read_users_file(path)
    assert users["ana"].admin and not users["ben"].admin
    assert "s3cret" not in path.read_text() and auth.verify_password("s3cret", users["ana"].password_hash)
    assert auth.main(["list", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == ["ana  (admin)", "ben"]
    assert auth.main(["remove", str(path), "ben"]) == 0 and set(auth.read_users_file(path)) == {"ana"}
    assert auth.main(["remove", str(path), "ana"]) == 2  # never the last one


# ------------------------------------------------------------------------------------- host binding

@pytest.mark.parametrize("host, auth_file, insecure, ok", [
    ("127.0.0.1", None, False, True), ("localhost", None, False, True), ("::1", None, False, True),
    ("0.0.0.0", None, False, False), ("192.168.1.5", None, False, False),
    ("0.0.0.0", "users.json", False, True), ("0.0.0.0", None, True, True),
])
def test_binding_beyond_loopback_needs_logins_or_an_explicit_flag(host, auth_file, insecure, ok):
    config = AppConfig(host=host, auth_file=auth_file, insecure_no_auth=insecure)
    if ok:
        config.validate()
    else:
        with pytest.raises(ValueError, match="--insecure-no-auth"):
            config.validate()


# ---------------------------------------------------------------------------------- prompts upload

def test_builtin_prompts_are_many_and_varied():
    prompts = builtin_prompts()
    assert len(prompts) >= 40 and len(set(prompts)) == len(prompts) and all(p.strip() == p for p in prompts)


def test_uploads_are_lines_or_jsonl_with_a_prompt_field():
    assert parse_prompt_upload("First one\n\n  Second, indented\n") == ["First one", "  Second, indented"]
    jsonl = '{"prompt": "Say hi", "id": 1}\n\n{"prompt": "<b>bold</b>"}\n'
    assert parse_prompt_upload(jsonl) == ["Say hi", "<b>bold</b>"]
    assert parse_prompt_upload('{"prompt": "x"}', "prompts.jsonl") == ["x"]
    with pytest.raises(ValueError, match="Line 2 is not valid JSON"):
        parse_prompt_upload('{"prompt": "x"}\n{oops', "p.jsonl")
    with pytest.raises(ValueError, match='Line 1 has no text field "prompt"'):
        parse_prompt_upload('{"text": "x"}')
    with pytest.raises(ValueError, match="no prompts"):
        parse_prompt_upload("\n \n")


# --------------------------------------------------------------------------- the app without a model

@pytest.fixture
def store(tmp_path):
    shutil.copyfile(migrated_sqlite_template(), tmp_path / "feedback.db")
    feedback_store = FeedbackStore(tmp_path / "feedback.db", max_prompt_chars=100)
    yield feedback_store
    feedback_store.close()


@pytest.fixture
def app(store, tmp_path):
    serving = SimpleNamespace(version=0, last_swap_error=None, base_model="tiny",
                              adapters=SimpleNamespace(root=tmp_path / "adapters"))
    feedback_app = FeedbackApp(serving, store, SamplingConfig(max_prompt_chars=100, max_candidates=4))
    yield feedback_app
    feedback_app.close()


def generations(store, n: int, text: str = "A prompt") -> list[int]:
    prompt_id = store.add_prompt(text)
    return [g.id for g in store.record_generations(prompt_id, 0, [NewGeneration(f"answer {i}") for i in range(n)])]


def shown_page(store, n: int, text: str = "A prompt", order: list[int] | None = None) -> ShownPage:
    """Record a page of n candidates and return it as the cards show it (in `order`, default as recorded)."""
    ids = generations(store, n, text)
    records = page_records(store.page_generations(store.get_generation(ids[0]).page_id))
    return shown_from_records(records, order or list(range(n)))


def test_one_submit_stores_ratings_tie_flags_and_comment_as_one_submission(app, store):
    shown = shown_page(store, 3, order=[2, 0, 1])  # card A shows the third candidate, B the first, C the second
    c, a, b = shown.ids
    submission, message = app.submit(shown, [5, None, "2"], ["A", "C"], False,
                                     [(None, ""), ("off-prompt", " talks of cats "), (None, "")], "tied", rater="ana")
    assert message == "Stored 2 ratings, a tie of A and C and 1 flag; undo with u."
    assert dict(submission.scores) == {c: 5, b: 2} and set(submission.best) == {c, b} and submission.tie
    assert [(f.generation_id, f.kind, f.reason) for f in submission.flags] == [(a, "off_prompt", "talks of cats")]
    assert submission.comment == "tied" and store.rating_history(c)[0].comment == "tied"
    pairs = {(p.chosen.id, p.rejected.id) for p in store.feedback_since().preferences}
    assert pairs == {(c, a), (b, a)}  # a tie: both over the other, none between the tied
    again, _ = app.submit(shown, [1, 1, 1], [], False, [(None, "")] * 3, "", rater="ana")
    assert again.id == submission.id and store.submissions() == [again]  # the page's key: stored once


def test_none_is_good_and_the_confirmation_of_a_single_best(app, store):
    shown = shown_page(store, 2)
    _, message = app.submit(shown, [None, None], [], True, [(None, None)] * 2, None, rater="ana")
    assert message == "Stored 0 ratings and none is good; undo with u."
    _, message = app.submit(shown_page(store, 2, "Another"), [4, 3], ["B"], False, [], "", rater="ana")
    assert message == "Stored 2 ratings and B as the best; undo with u."


def test_the_card_order_is_seeded_per_app_and_derived_for_reopened_pages(store):
    serving = SimpleNamespace(version=0, last_swap_error=None, base_model="tiny",
                              adapters=SimpleNamespace(root="adapters"))
    orders = [FeedbackApp(serving, store, SamplingConfig(), shuffle_seed=7).card_order(4) for _ in range(2)]
    assert orders[0] == orders[1] and sorted(orders[0]) == [0, 1, 2, 3]
    app = FeedbackApp(serving, store, SamplingConfig(), shuffle_seed=7)
    assert len({tuple(app.card_order(4)) for _ in range(20)}) > 1  # each page its own order
    shown = shown_page(store, 4)
    assert app.order_of(shown.page_id, 4) == derived_order(7, shown.page_id, 4)  # not shown here: derived
    app.remember_order(shown.page_id, [3, 2, 1, 0])
    reopened, texts, prompt = app.open_page(shown.page_id, revealed=False)
    assert reopened.ids == shown.ids[::-1] and texts == [f"answer {i}" for i in (3, 2, 1, 0)] and prompt == "A prompt"
    assert {tuple(derived_order(7, page, 4)) for page in range(1, 30)} != {tuple(range(4))}


def test_the_generate_button_streams_the_texts_into_shuffled_blind_cards_then_records_one_page(store, tmp_path):
    from ppo_feedback.page import handlers
    from test_ui_support import ScriptedServing

    texts = ["one two three four", "five six seven", "eight nine"]
    serving = ScriptedServing(store, texts, tmp_path / "adapters", chars=5)
    feedback_app = FeedbackApp(serving, store, SamplingConfig(max_prompt_chars=100, max_candidates=4), shuffle_seed=1)
    order = FeedbackApp(serving, store, SamplingConfig(), shuffle_seed=1).card_order(4)
    try:
        updates = list(handlers.generate_handler(feedback_app)("A prompt", 4, None, None))
    finally:
        feedback_app.close()
    max_n = 4
    batch = [*texts, texts[0]]  # the texts in the order the batch decodes them

    def card_texts(update):  # message, state, the columns, then the texts
        return [t.value if isinstance(t, gr.Textbox) else None for t in update[2 + max_n:2 + 2 * max_n]]

    assert order != [0, 1, 2, 3]
    assert [t.visible for t in updates[0][2:2 + max_n]] == [True] * 4 and card_texts(updates[0]) == [""] * 4
    partial = updates[1:-1]
    assert len(partial) == 3  # 18 characters, 5 a step
    assert card_texts(partial[0]) == [batch[i][:5] for i in order]
    assert not any("ids" in u[1] for u in partial)  # no page before it is recorded (gr.skip() there)
    final = updates[-1]
    assert final[0].startswith("4 candidates: rate each") and "v" not in final[0].split(":")[0]
    assert card_texts(final) == [batch[i] for i in order]
    assert [t.label for t in final[2 + max_n:2 + 2 * max_n]] == list("ABCD")  # no version before submitting
    shown = final[1]
    recorded = [g.id for g in store.page_generations(shown["page_id"])]
    assert shown["ids"] == [recorded[i] for i in order] and not shown["revealed"]
    assert store.get_page(shown["page_id"]).rater == LOCAL_USER
    assert store.counts()["generations"] == 4  # nothing recorded before the end


@pytest.mark.parametrize("scores, best, flags, message", [
    ([None, None], [], [], "Rate at least one"),
    ([7, None], [], [], "Scores go from 1 to 5"),
    ([3, None], ["D"], [], "is not there"),
    ([3, None], [], [("rude", "")], "Unknown flag 'rude'"),
    ([3, None], [], [("other", "")], "reason"),
])
def test_a_bad_submission_writes_nothing(app, store, scores, best, flags, message):
    shown = shown_page(store, 2)
    with pytest.raises(ValueError, match=message):
        app.submit(shown, scores, best, False, flags, "", rater="ana")
    assert store.counts()["ratings"] == 0 and store.counts()["preferences"] == 0 and store.submissions() == []
    with pytest.raises(ValueError, match="Generate candidates first"):
        ShownPage.from_state(None)


def test_the_rater_progress_line_counts_today_and_says_when_the_next_round_comes(app, store):
    assert app.rater_progress("ana").startswith("You: 0 ratings today, 0 in total · next training round: ")
    app.submit(shown_page(store, 2), [4, 5], [], False, [], "", rater="ana")
    assert app.rater_progress("ana").startswith("You: 2 ratings today, 2 in total")
    assert round_note("waiting for 12 more ratings") == "after 12 more ratings"
    assert round_note("paused: no worker started here (--no-worker)") == "no worker is running"
    [(label, submission_id)] = app.history("ana")
    assert "A prompt · 2 ratings" in label and app.submission(submission_id, "ana").id == submission_id
    with pytest.raises(ValueError, match="not among your recent ones"):
        app.submission(submission_id, "ben")


def test_limits_are_messages_not_crashes(app):
    with pytest.raises(ValueError, match="101 characters; the limit is 100"):
        app.check_prompt("x" * 101)
    with pytest.raises(ValueError, match="empty"):
        app.check_prompt(" \n")
    with pytest.raises(ValueError, match="Ask for 1 to 4 candidates, not 5"):
        app.check_n(5)
    with pytest.raises(ValueError, match="integer"):
        app.check_n(2.5)
    assert app.check_n(3.0) == 3


def test_who_acts_with_and_without_logins(app, tmp_path):
    request = SimpleNamespace(username=None)
    assert app.rater(request, "") == LOCAL_USER and app.rater(request, " bot-1 ") == "bot-1"
    assert app.is_admin(request)
    app.users = auth.UserDirectory(_users(tmp_path))
    assert app.rater(SimpleNamespace(username="ben"), "mallory") == "ben"
    with pytest.raises(Forbidden):
        app.rater(SimpleNamespace(username=None))
    assert app.is_admin(SimpleNamespace(username="ana")) and not app.is_admin(SimpleNamespace(username="ben"))
    with pytest.raises(Forbidden, match="Only admins can roll back"):
        app.require_admin(SimpleNamespace(username="ben"), "roll back")


def _users(tmp_path):
    path = tmp_path / "users.json"
    auth.write_users_file(path, {"ana": auth.User("ana", auth.hash_password("a", 1000), True),
                                 "ben": auth.User("ben", auth.hash_password("b", 1000))})
    return path


def test_status_and_plots_follow_the_store(app, store):
    ids = generations(store, 2)
    store.rate(ids[0], "ana", 4)
    store.rate(ids[1], "ben", 2)
    store.record_metrics(1, 0, {"objective/scores": 0.5, "objective/kl": 0.1, "loss/value": 1.0})
    store.record_metrics(1, 1, {"objective/scores": 0.7, "objective/kl": 0.3})
    status = app.status(max_age_s=0)
    assert status["versions"] == [{"version": 0, "mean_rating": 3.0, "n_ratings": 2}]
    assert status["worker"] == {"state": "paused: no worker holds the training lease", "present": False,
                                "holder": None}
    store.acquire_lease("worker-1", 60, state="waiting for 3 more ratings")
    assert app.status(max_age_s=0)["worker"]["state"] == "waiting for 3 more ratings"
    ratings, score, kl = app.plots()
    assert ratings["mean rating"].tolist() == [3.0]
    assert score["training step"].tolist() == [1, 2] and score["score"].tolist() == [0.5, 0.7]
    assert kl["KL"].tolist() == [0.1, 0.3]
    store.record_metrics(2, 0, {"objective/kl": 0.2})
    assert app.plots()[2]["training step"].tolist() == [1, 2, 3]  # read incrementally, steps continue


def test_uploaded_prompts_join_the_pool(app, store):
    store.add_prompt("Already here", source="builtin")
    assert app.add_prompts("Already here\nBrand new\n") == "Added 1 new prompt; 1 were already in the pool."
    assert store.list_prompts()[-1].source == "uploaded"


def test_errors_shown_to_users_are_escaped_gradio_errors():
    @shown_errors
    def bad():
        raise ValueError("no <script> here & there")

    with pytest.raises(gr.Error) as caught:
        bad()
    assert caught.value.message == "no &lt;script&gt; here &amp; there"

    @shown_errors
    def streaming():
        yield 1
        raise PermissionError("Only admins can do that.")

    with pytest.raises(gr.Error, match="Only admins"):
        list(streaming())


def test_the_page_builds_with_keyboard_script_and_login(app, tmp_path):
    demo = build_demo(app)
    names = {dep.get("api_name") for dep in demo.config["dependencies"] if dep.get("api_visibility") == "public"}
    assert {"next_prompt", "generate", "rate", "prefer", "status", "export_adapter"} <= names
    options = launch_options(app)
    assert options["head"] == KEYBOARD_HEAD and "auth" not in options
    assert "keydown" in KEYBOARD_HEAD and "#submit-ratings" in KEYBOARD_HEAD
    app.users = auth.UserDirectory(_users(tmp_path))
    login = launch_options(app)["auth"]
    assert inspect.iscoroutinefunction(login)  # Gradio awaits it: a plain function would run on the event loop
    assert asyncio.run(login("ana", "a")) and not asyncio.run(login("ana", "b"))


def test_each_endpoint_of_the_table_is_served_with_its_defaults_and_admin_check(app, tmp_path):
    import inspect

    from ppo_feedback.page.api import ENDPOINTS, Api, endpoint_function

    demo = build_demo(app)
    served = {dep.get("api_name") for dep in demo.config["dependencies"] if dep.get("api_visibility") == "public"}
    assert {e.name for e in ENDPOINTS} <= served
    api = Api(app)
    generate = endpoint_function(api, next(e for e in ENDPOINTS if e.name == "generate"))
    assert inspect.signature(generate).parameters["n"].default == app.sampling.num_candidates
    app.users = auth.UserDirectory(_users(tmp_path))
    for endpoint in (e for e in ENDPOINTS if e.admin_action):
        fn = endpoint_function(api, endpoint)
        assert list(inspect.signature(fn).parameters)[-1] == "request"
        required = [p for p in inspect.signature(fn).parameters.values()
                    if p.default is inspect.Parameter.empty and p.name != "request"]
        with pytest.raises(gr.Error, match=f"Only admins can {endpoint.admin_action}"):
            fn(*[1] * max(1, len(required)), request=SimpleNamespace(username="ben"))
    export_ratings = endpoint_function(api, next(e for e in ENDPOINTS if e.name == "export_ratings"))
    with pytest.raises(gr.Error, match="Unknown export format"):  # an admin gets past the check
        export_ratings("bogus", request=SimpleNamespace(username="ana"))


def test_readme_api_table_lists_the_endpoints_of_the_table():
    import re
    from pathlib import Path

    from ppo_feedback.page.api import ENDPOINTS

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `/(\w+)`( \(admin\))?( \(JSON\))? \|", readme, flags=re.MULTILINE)
    assert [(name, bool(admin), bool(json_route)) for name, admin, json_route in rows] == [
        (e.name, e.admin_action is not None, e.json_route) for e in ENDPOINTS]
