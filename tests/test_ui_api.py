"""The named API through gradio_client against the launched page on the tiny model: every endpoint and its errors."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from gradio_client import Client

from test_ui_support import page_store, PASSWORDS, SAMPLING, launch, load_serving, publish_version, write_users

ITEM_KEYS = {"generation_id", "prompt_id", "page_id", "text", "version"}


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory):
    """One store, one serving model and two launched pages on them: with logins and without."""
    root = tmp_path_factory.mktemp("ui_api")
    store = page_store(root / "feedback.db", [f"Pool prompt number {i}" for i in range(5)])
    serving = load_serving(tiny_model_dir, store, root / "adapters")
    with_auth = launch(serving, store, users=write_users(root / "users.json"))
    without_auth = launch(serving, store, worker_note="no worker started here (--no-worker)")
    yield {"store": store, "serving": serving, "root": root, "model": tiny_model_dir,
           "auth_url": with_auth.url, "open_url": without_auth.url, "app": with_auth.app}
    with_auth.close()
    without_auth.close()
    serving.stop()
    store.close()


@pytest.fixture(scope="module")
def ana(env):
    return Client(env["auth_url"], auth=("ana", PASSWORDS["ana"]), verbose=False)


@pytest.fixture(scope="module")
def ben(env):
    return Client(env["auth_url"], auth=("ben", PASSWORDS["ben"]), verbose=False)


@pytest.fixture(scope="module")
def local(env):
    return Client(env["open_url"], verbose=False)


def test_the_page_with_logins_refuses_strangers(env):
    with pytest.raises(Exception):
        Client(env["auth_url"], verbose=False)
    with pytest.raises(Exception):
        Client(env["auth_url"], auth=("ben", "wrong"), verbose=False)


def test_endpoints_are_named_in_the_api(ben):
    named = ben.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/next_prompt", "/generate", "/generate_stream", "/rate", "/prefer", "/status",
            "/export_adapter"} <= set(named)


def test_next_prompt_gives_the_least_rated_prompt_the_rater_has_not_rated(ben, env):
    first = ben.predict(api_name="/next_prompt")
    assert set(first) == {"prompt_id", "text"} and env["store"].get_prompt(first["prompt_id"]).text == first["text"]
    generated = ben.predict(first["text"], 2, api_name="/generate")
    assert {g["prompt_id"] for g in generated} == {first["prompt_id"]}  # the pool prompt, not a copy
    ben.predict(generated[0]["generation_id"], 3, api_name="/rate")
    after = ben.predict(api_name="/next_prompt")
    assert after["prompt_id"] != first["prompt_id"]


def test_generate_records_candidates_with_their_version(ben, env):
    result = ben.predict("Tell me about the sea", 3, api_name="/generate")
    assert len(result) == 3 and all(set(item) == ITEM_KEYS for item in result)
    assert {item["version"] for item in result} == {env["serving"].version}
    stored = env["store"].get_generation(result[0]["generation_id"])
    assert stored.text == result[0]["text"] and stored.adapter_version == result[0]["version"]
    assert env["store"].get_prompt(stored.prompt_id).source == "rater"


def test_generate_stream_gives_the_texts_so_far_then_the_recorded_page(ben, env):
    job = ben.submit("Tell me a story", 3, api_name="/generate_stream")
    updates = list(job)  # gradio_client yields each streamed output
    *partial, final = updates
    assert partial and all(len(u) == 3 and all(set(c) == {"text", "version"} for c in u) for u in partial)
    assert len(final) == 3 and all(set(item) == ITEM_KEYS for item in final)
    assert job.outputs()[-1] == final
    for row, item in enumerate(final):
        assert env["store"].get_generation(item["generation_id"]).text == item["text"]
        assert all(item["text"].startswith(u[row]["text"]) for u in partial)
    with pytest.raises(Exception, match="Ask for 1 to 4"):
        ben.submit("Hello", 0, api_name="/generate_stream").result()


def test_a_streaming_client_that_cancels_frees_the_model(ben, env, monkeypatch):
    """Gradio closes the endpoint's generator when its client cancels (or its page closes), which releases the
    weights the page held; nothing is recorded."""
    import threading
    import time

    import ppo_feedback.serving as serving_module

    closed = threading.Event()
    real = serving_module.stream_candidates

    def slow(*args, **kwargs):
        steps = real(*args, **kwargs)
        try:
            while True:
                try:
                    texts = next(steps)
                except StopIteration as stop:
                    return stop.value
                time.sleep(0.5)
                yield texts
        finally:
            closed.set()

    monkeypatch.setattr(serving_module, "stream_candidates", slow)
    before = env["store"].counts()["generations"]
    job = ben.submit("Cancel me halfway", 2, api_name="/generate_stream")
    deadline = time.monotonic() + 60
    while not job.outputs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.outputs() and not closed.is_set()
    job.cancel()
    assert closed.wait(10)
    monkeypatch.undo()
    done = []
    thread = threading.Thread(target=lambda: done.append(env["serving"].generate("After the cancel", 1, rater="t")))
    thread.start()
    thread.join(30)
    assert done and env["store"].counts()["generations"] == before + 1  # the weights were free again


@pytest.mark.parametrize("prompt, n, message", [
    ("   ", 2, "empty"),
    ("x" * (SAMPLING.max_prompt_chars + 1), 2, "limit is 200"),
    ("Hello", 0, "Ask for 1 to 4"),
    ("Hello", SAMPLING.max_candidates + 1, "Ask for 1 to 4"),
])
def test_generate_limits_are_clear_errors(ben, prompt, n, message):
    with pytest.raises(Exception, match=message):
        ben.predict(prompt, n, api_name="/generate")


def test_rate_stores_the_logged_in_rater_and_refuses_bad_input(ben, env):
    gid = ben.predict("Rate this one", 1, api_name="/generate")[0]["generation_id"]
    assert ben.predict(gid, 4, "nice <b>", "mallory", api_name="/rate") == {"ok": True}
    (rating,) = env["store"].rating_history(gid)
    assert (rating.rater, rating.score, rating.comment) == ("ben", 4, "nice <b>")  # `rater` ignored under auth
    with pytest.raises(Exception, match="Unknown generation id 999999"):
        ben.predict(999999, 3, api_name="/rate")
    for score in (0, 6):
        with pytest.raises(Exception, match="1 to 5"):
            ben.predict(gid, score, api_name="/rate")
    assert len(env["store"].rating_history(gid)) == 1


def test_prefer_stores_best_over_others_and_refuses_bad_input(ben, env):
    ids = [g["generation_id"] for g in ben.predict("Prefer among these", 3, api_name="/generate")]
    assert ben.predict(ids[1], [ids[0], ids[2]], api_name="/prefer") == {"ok": True}
    pairs = {(p.chosen.id, p.rejected.id) for p in env["store"].feedback_since().preferences if p.preference.rater == "ben"}
    assert {(ids[1], ids[0]), (ids[1], ids[2])} <= pairs
    other = ben.predict("A different prompt", 1, api_name="/generate")[0]["generation_id"]
    with pytest.raises(Exception, match="Unknown generation id 999999"):
        ben.predict(ids[0], [999999], api_name="/prefer")
    with pytest.raises(Exception, match="same prompt"):
        ben.predict(ids[0], [other], api_name="/prefer")
    with pytest.raises(Exception, match="itself"):
        ben.predict(ids[0], [ids[0]], api_name="/prefer")


def test_status_reports_versions_worker_and_counts(ben, env):
    gid = ben.predict("Status check prompt", 1, api_name="/generate")[0]["generation_id"]
    ben.predict(gid, 5, api_name="/rate")
    status = ben.predict(api_name="/status")
    assert set(status) >= {"serving_version", "latest_version", "worker", "counts", "versions"}
    assert status["serving_version"] == env["serving"].version
    assert status["worker"]["present"] is False and status["worker"]["state"].startswith("paused")
    counts = env["store"].counts()
    assert status["counts"]["ratings"] == counts["ratings"] and status["counts"]["generations"] >= 1
    assert all(set(v) == {"version", "mean_rating", "n_ratings"} for v in status["versions"])
    assert any(v["n_ratings"] >= 1 for v in status["versions"])


@pytest.mark.parametrize("endpoint, args", [("/export_adapter", (1,)), ("/export_ratings", ("ratings",)),
                                            ("/rollback", (0,))])
def test_admin_endpoints_refuse_non_admins(ben, endpoint, args):
    with pytest.raises(Exception, match="Only admins"):
        ben.predict(*args, api_name=endpoint)


def test_admin_downloads_an_adapter_zip_and_rolls_back(ana, env):
    store, serving = env["store"], env["serving"]
    cached = env["app"].status(max_age_s=60)["serving_version"]
    first = publish_version(env["model"], store, env["root"] / "adapters", seed=1)
    second = publish_version(env["model"], store, env["root"] / "adapters", seed=2)
    assert serving.poll_once() == second != cached
    assert env["app"].status(max_age_s=60)["serving_version"] == second  # a swap outdates the cached status

    path = ana.predict(first, api_name="/export_adapter")
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
    folder = f"ppo-feedback-v{first:04d}"
    assert {f"{folder}/adapter_config.json", f"{folder}/adapter_model.safetensors"} <= names  # a PEFT folder
    with pytest.raises(Exception, match="99 does not exist|Unknown adapter version id 99"):
        ana.predict(99, api_name="/export_adapter")
    with pytest.raises(Exception, match="base model"):
        ana.predict(0, api_name="/export_adapter")

    assert ana.predict(api_name="/status")["serving_version"] == second
    result = ana.predict(first, api_name="/rollback")
    assert result == {"ok": True, "rolled_back": [second], "serving_version": first}
    status = ana.predict(api_name="/status")
    assert (status["serving_version"], status["latest_version"], status["latest_status"]) == \
        (first, second, "rolled_back")
    generated = ana.predict("After the rollback", 1, api_name="/generate")
    assert generated[0]["version"] == first


def test_admin_exports_ratings_as_jsonl(ana):
    gid = ana.predict("Export me", 1, api_name="/generate")[0]["generation_id"]
    ana.predict(gid, 2, "meh", api_name="/rate")
    rows = [json.loads(line) for line in Path(ana.predict("ratings", api_name="/export_ratings")).read_text().splitlines()]
    assert any(r["generation_id"] == gid and r["rater"] == "ana" and r["score"] == 2 for r in rows)
    with pytest.raises(Exception):
        ana.predict("nonsense", api_name="/export_ratings")


def test_without_logins_a_script_can_act_as_several_raters(local, env):
    ids = [g["generation_id"] for g in local.predict("Several raters", 2, "script-a", api_name="/generate")]
    local.predict(ids[0], 5, "", "script-a", api_name="/rate")
    with pytest.raises(Exception, match="not shown to 'script-b'"):  # each judges only what it was shown
        local.predict(ids[0], 1, "", "script-b", api_name="/rate")
    [other] = [g["generation_id"] for g in local.predict("Several raters", 1, "script-b", api_name="/generate")]
    local.predict(other, 1, "", "script-b", api_name="/rate")
    local.predict(ids[1], [ids[0]], "script-a", api_name="/prefer")
    raters = {r.rater for gid in [*ids, other] for r in env["store"].rating_history(gid)}
    assert raters == {"script-a", "script-b"}
    assert local.predict(rater="script-a", api_name="/next_prompt")["prompt_id"] is not None
    status = local.predict(api_name="/status")
    assert status["worker"]["state"] == "paused: no worker started here (--no-worker)"
    assert Path(local.predict("unpaired", api_name="/export_ratings")).read_text()  # the local user is the admin


def test_compare_uses_one_seed_for_every_version(env):
    app = env["app"]
    first = app.compare("Compare this", None, seed=7)
    again = app.compare("Compare this", None, seed=7)
    assert first == again and first["serving"]["version"] == env["serving"].version
    base_only = env["serving"].generate_with_version("Compare this", 0, 7)[0].text
    assert first["base"] == base_only
    with pytest.raises(ValueError, match="empty"):
        app.compare(" ", None, seed=1)


# ------------------------------------------------------------------------ submissions (issue 17)

def _fresh_page(client, prompt: str, n: int = 3) -> tuple[int, list[int]]:
    """Generate a page through the API; return (page id, its generation ids)."""
    records = client.predict(prompt, n, api_name="/generate")
    return records[0]["page_id"], [r["generation_id"] for r in records]


def test_submit_is_one_unit_with_a_retry_safe_key_and_undo_restores(ben, env):
    store = env["store"]
    page, (a, b, c) = _fresh_page(ben, "Submit me as one unit")
    result = ben.predict(page, {str(a): 5, str(b): 2}, [a], False, False,
                         [{"generation_id": c, "kind": "broken", "reason": "cut off"}], "A wins", "key-1",
                         api_name="/submit")
    record = result["submission"]
    assert result["ok"] and result["message"] == "Saved 2 ratings, a best pick, 1 flag."
    assert (record["scores"], record["best"], record["status"]) == ({str(a): 5, str(b): 2}, [a], "current")
    assert record["flags"] == [{"generation_id": c, "kind": "broken", "reason": "cut off"}]
    again = ben.predict(page, {str(a): 5, str(b): 2}, [a], key="key-1", api_name="/submit")
    assert again["submission"]["submission_id"] == record["submission_id"]  # a retry stores nothing new
    assert len(store.rating_history(a)) == 1
    tie = ben.predict(page, {str(a): 4}, [a, b], True, api_name="/submit")["submission"]
    assert tie["tie"] and [s["status"] for s in ben.predict(2, api_name="/my_submissions")] == ["current", "superseded"]
    undone = ben.predict(api_name="/undo")["undone"]
    assert (undone["submission_id"], undone["status"]) == (tie["submission_id"], "undone")
    assert [(r.score, r.current) for r in store.rating_history(a)] == [(5, True), (4, False)]  # nothing deleted
    assert ben.predict(1, api_name="/my_submissions")[0]["status"] == "undone"


@pytest.mark.parametrize("arguments, message", [
    (lambda page, ids, other: (999999, {str(ids[0]): 3}), "Unknown page id 999999"),
    (lambda page, ids, other: (page, {str(other): 3}), "is not on page"),
    (lambda page, ids, other: (page, {str(ids[0]): 3}, [ids[0]], True), "A tie needs two or more"),
    (lambda page, ids, other: (page, {str(ids[0]): 10**30}), "whole number from 1 to 5"),
    (lambda page, ids, other: (page, {str(10**30): 3}), "Unknown generation id"),
    (lambda page, ids, other: (10**30, {str(ids[0]): 3}), "Unknown page id"),
    (lambda page, ids, other: (page, {str(ids[0]): "5"}), "whole number"),
    (lambda page, ids, other: (page, {str(ids[0]): 2.5}), "whole number"),
    (lambda page, ids, other: (page, [5]), "scores must be an object"),
    (lambda page, ids, other: (page, {}, [ids[0]], False, True), "none is good has no best"),
    (lambda page, ids, other: (page, {}, [], False, False, [{"generation_id": ids[0], "kind": "rude"}]),
     "Unknown flag"),
    (lambda page, ids, other: (page, {}, [], False, False, ["broken"]), "flags must be a list"),
    (lambda page, ids, other: (page, {}), "Nothing to submit"),
])
def test_submit_refuses_bad_input_clearly_and_stores_nothing(ben, env, arguments, message):
    page, ids = _fresh_page(ben, "Refuse bad submissions")
    _, (other, *_) = _fresh_page(ben, "Another page", 1)
    before = (env["store"].counts()["rating_revisions"], len(env["store"].my_submissions("ben", 100)))
    with pytest.raises(Exception, match=message):
        ben.predict(*arguments(page, ids, other), api_name="/submit")
    assert (env["store"].counts()["rating_revisions"], len(env["store"].my_submissions("ben", 100))) == before


def test_undo_with_nothing_to_undo_and_skip(local, env):
    with pytest.raises(Exception, match="Nothing to undo"):
        local.predict("nobody-yet", api_name="/undo")
    offered = local.predict(rater="skipper", api_name="/next_prompt")
    assert local.predict(offered["prompt_id"], "skipper", api_name="/skip") == {"ok": True, "new": True}
    assert local.predict(offered["prompt_id"], "skipper", api_name="/skip") == {"ok": True, "new": False}
    assert local.predict(rater="skipper", api_name="/next_prompt")["prompt_id"] != offered["prompt_id"]
    with pytest.raises(Exception, match="whole number"):
        local.predict("seven", "skipper", api_name="/skip")


def test_guidelines_are_read_by_anyone_and_written_by_admins(ana, ben, env):
    with pytest.raises(Exception, match="Only admins can write guidelines"):
        ben.predict("Rate everything 5.", api_name="/write_guidelines")
    written = ana.predict("Prefer honest answers.\nThen short ones.", api_name="/write_guidelines")
    assert ben.predict(api_name="/guidelines") == written
    assert (written["text"], written["author"]) == ("Prefer honest answers.\nThen short ones.", "ana")
    page, (a, *_) = _fresh_page(ben, "Rated under guidelines", 2)
    record = ben.predict(page, {str(a): 4}, api_name="/submit")["submission"]
    assert record["guideline_version"] == written["version"] >= 1
    assert env["store"].rating_history(a)[0].guideline_version == written["version"]


def test_a_second_rater_is_offered_the_same_generations_and_agreement_is_for_admins(ana, ben, env):
    app = env["app"]
    page, (a, b) = _fresh_page(ana, "Judge me twice", 2)
    ana.predict(page, {str(a): 5, str(b): 1}, [a], api_name="/submit")
    assert ben.predict(api_name="/overlap_page")["page_id"] is None  # --overlap 0: never
    app.overlap = 1.0
    try:
        offered = ben.predict(api_name="/overlap_page")
    finally:
        app.overlap = 0.0
    assert offered["page_id"] is not None
    shared = env["store"].page_to_overlap("ben")
    assert offered["page_id"] == shared.id
    ids = [c["generation_id"] for c in offered["candidates"]]
    ben.predict(offered["page_id"], {str(ids[0]): 4}, api_name="/submit")
    with pytest.raises(Exception, match="Only admins can see agreement"):
        ben.predict("", api_name="/agreement")
    result = ana.predict("ben", api_name="/agreement")
    assert set(result) == {"overall", "pairs"} and all("ben" in p["raters"] for p in result["pairs"])
    assert any(p["shared_generations"] >= 1 for p in result["pairs"])


def test_a_rater_cannot_judge_candidates_shown_to_another_rater(ana, ben, env):
    store = env["store"]
    page, (a, b) = _fresh_page(ana, "Only ana saw these", 2)
    before = (store.rating_history(a), store.feedback_since().preferences, store.submissions())
    for args, endpoint in (((a, 1), "/rate"), ((b, [a]), "/prefer"), ((page, {str(a): 1}, [b]), "/submit")):
        with pytest.raises(Exception, match=f"Page {page} was not shown to 'ben'"):
            ben.predict(*args, api_name=endpoint)
    assert (store.rating_history(a), store.feedback_since().preferences, store.submissions()) == before


def test_a_raters_typed_prompt_waits_for_an_admins_review(ana, ben, env):
    store = env["store"]
    [mine] = ben.predict("Ben's own pitch", 1, api_name="/generate")
    pending = store.get_prompt(mine["prompt_id"])
    assert (pending.admission, pending.added_by) == ("pending", "ben")
    assert pending.id not in {p.id for p in store.list_prompts()}  # not sampled for training
    ben.predict(mine["generation_id"], 4, api_name="/rate")  # ben's rating of it counts as feedback
    assert any(r.rating.generation_id == mine["generation_id"] for r in store.feedback_since().ratings)
    with pytest.raises(Exception, match="Only admins can review prompts"):
        ben.predict(api_name="/pending_prompts")
    with pytest.raises(Exception, match="Only admins can review prompts"):
        ben.predict(pending.id, True, api_name="/review_prompt")
    assert [p["added_by"] for p in ana.predict(api_name="/pending_prompts") if p["prompt_id"] == pending.id] == ["ben"]
    assert ana.predict(pending.id, True, api_name="/review_prompt")["admission"] == "admitted"
    assert pending.id in {p.id for p in store.list_prompts()}
    [typed] = ana.predict("Ana the admin typed this", 1, api_name="/generate")
    assert store.get_prompt(typed["prompt_id"]).admission == "admitted"  # an admin's prompt needs no review
