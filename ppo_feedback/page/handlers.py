"""The page's event handlers: what happens when the page loads, the status timer ticks, and a rater
or admin presses a button. Each `wire_*` function connects one part of the page (inside its
gr.Blocks) to the controller; the handlers call only `FeedbackApp`, never the store or the model.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from db.records import BASE_VERSION
from db.records import Submission
from .cards import FLAG_CHOICES, LETTERS, ShownPage, reveal_line, shown_from_records, version_label
from .controller import LOCAL_USER, FeedbackApp
from .inputs import md_escape, shown_errors
from .layout import Page

log = logging.getLogger(__name__)

def wire_page(app: FeedbackApp, page: Page, demo: gr.Blocks) -> None:
    """Connect every part of the page to the controller (inside `demo`); returns nothing."""
    wire_status(app, page, demo)
    wire_rating(app, page)
    wire_submissions(app, page)
    wire_compare(app, page)
    wire_operate(app, page)


# ------------------------------------------------------------------------- what the handlers show

def status_outputs(record: dict[str, Any]) -> tuple:
    """Return the four status boxes' values (serving, newest, worker, ratings) of a /status record."""
    counts = record["counts"]
    latest = record["latest_version"]
    newest = "none yet" if latest == BASE_VERSION else (
        f"v{latest}" + ("" if record["latest_status"] == "published" else f" ({record['latest_status']})")
        + training_note(record.get("latest_training")))
    return (version_label(record["serving_version"]), newest, record["worker"]["state"],
            f"{counts['ratings']} / {counts['ratings_since_serving']}")


def training_note(training: dict[str, Any] | None) -> str:
    """Return what the Newest version box adds about how that version was trained ("" when nothing is known):
    the objective, and for a PPO round's reward model whether it ordered held-out pages better than chance."""
    if training is None:
        return ""
    judged, objective = training["reward_model"], training["objective"]
    if judged is None:
        return f" · {objective}"
    if judged["agreement"] is None:
        verdict = f"reward model not judged ({judged['pages']} pages)"
    else:
        verdict = (f"reward model {judged['agreement']:.2f} [{judged['low']:.2f}, {judged['high']:.2f}] on "
                   f"{judged['pages']} pages")
    if objective == "ppo":
        return f" · ppo, {verdict}" + ("" if judged["trusted"] else " (optimised anyway)")
    why = verdict if judged["agreement"] is None else f"{verdict}, no better than chance"
    return f" · {objective} instead of ppo: {why}"


def agreement_outputs(result: dict[str, Any]) -> tuple[str, list[list[Any]]]:
    """Return the Operate tab's agreement line (overall) and table rows (per rater pair) of an /agreement record."""
    def figure(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    overall = result["overall"]
    line = (f"alpha {figure(overall['alpha'])} on {overall['shared_generations']} candidates rated by two or more; "
            f"picks agree on {figure(overall['pick_agreement'])} of {overall['shared_pages']} shared pages")
    rows = [[" & ".join(p["raters"]), figure(p["alpha"]), p["shared_generations"], figure(p["pick_agreement"]),
             p["shared_pages"]] for p in result["pairs"]]
    return line, rows


def version_choices(record: dict[str, Any]) -> list[tuple[str, int]]:
    """Return the Compare tab's version choices: the base model and every version that did not fail."""
    choices = [("0 (base model)", 0)]
    choices += [(f"{v['version']} ({v['status'].replace('_', ' ')})", v["version"])
                for v in record["adapter_versions"] if v["status"] != "failed"]
    return choices


def versions_rows(record: dict[str, Any]) -> list[list[Any]]:
    """Return the versions table's rows: version, status, parent, mean rating, ratings."""
    means = {v["version"]: v for v in record["versions"]}
    rows = [(BASE_VERSION, "base model", "")]
    rows += [(v["version"], v["status"].replace("_", " "), v["parent"]) for v in record["adapter_versions"]]
    return [[version, status, parent,
             means[version]["mean_rating"] if version in means else "",
             means[version]["n_ratings"] if version in means else 0]
            for version, status, parent in rows]


def card_updates(max_n: int, shown: ShownPage | None, texts: list[str] = (),
                 judged: Submission | None = None) -> tuple:
    """Return the updates of RateTab.card_outputs that show `shown` with `texts` (None: clear the cards),
    with the values of `judged` (a submission of that page: scores, best, none is good, flags, comment)."""
    if shown is None:
        return (None, *[gr.Column(visible=False) for _ in range(max_n)],
                *[gr.Textbox(value="", label=LETTERS[i]) for i in range(max_n)], *[gr.Radio(value=None)] * max_n,
                *[gr.Dropdown(value=None)] * max_n, *[gr.Textbox(value="")] * max_n,
                gr.CheckboxGroup(choices=[], value=[]), gr.Checkbox(value=False), gr.Textbox(value=""))
    n = len(shown.ids)
    scores = dict(judged.scores) if judged else {}
    flags = {f.generation_id: f for f in judged.flags} if judged else {}
    shown_kind = {stored: label for label, stored in FLAG_CHOICES}
    return (shown.as_state(), *[gr.Column(visible=i < n) for i in range(max_n)],
            *[gr.Textbox(value=texts[i] if i < n else "", label=card_label(shown, i)) for i in range(max_n)],
            *[gr.Radio(value=scores.get(g)) for g in _padded(shown.ids, max_n)],
            *[gr.Dropdown(value=shown_kind[flags[g].kind] if g in flags else None) for g in _padded(shown.ids, max_n)],
            *[gr.Textbox(value=(flags[g].reason or "") if g in flags else "") for g in _padded(shown.ids, max_n)],
            gr.CheckboxGroup(choices=list(LETTERS[:n]),
                             value=[LETTERS[shown.ids.index(g)] for g in judged.best] if judged else []),
            gr.Checkbox(value=bool(judged and judged.none_good)),
            gr.Textbox(value=(judged.comment or "") if judged else ""))


def _padded(ids: list[int], max_n: int) -> list[int | None]:
    """Return the ids of a page's cards padded with None to max_n cards."""
    return [*ids, *[None] * (max_n - len(ids))]


def card_label(shown: ShownPage, i: int) -> str:
    """Return card i's label: its letter, with the version that wrote it once the page is revealed."""
    if i >= len(shown.ids):
        return LETTERS[i]
    return f"{LETTERS[i]} · {version_label(shown.versions[i])}" if shown.revealed else LETTERS[i]


def reveal_updates(max_n: int, shown: ShownPage) -> tuple:
    """Return the updates of RateTab.card_outputs that reveal which version wrote each card (nothing else changes)."""
    return (shown.as_state(), *[gr.skip()] * max_n, *[gr.Textbox(label=card_label(shown, i)) for i in range(max_n)],
            *[gr.skip()] * (3 * max_n + 3))


def offer_state(offer: dict[str, Any]) -> dict[str, Any] | None:
    """Return what the page keeps about the prompt (or other rater's page) it offered, None when none is left."""
    return offer if offer["text"] is not None else None


def offer_note(offer: dict[str, Any]) -> str:
    """Return what the message line says about the next offer."""
    if offer["text"] is None:
        return "You have rated every prompt in the pool; type your own."
    if offer["page_id"] is not None:
        return "Next: candidates another rater judged too (for agreement): press Generate to see them."
    return "Next prompt loaded: press Generate."


# ---------------------------------------------------------------------------------- status

def wire_status(app: FeedbackApp, page: Page, demo: gr.Blocks) -> None:
    """Fill the page on load (who is signed in, a first prompt, status, tables, plots) and refresh it
    on every timer tick, with a toast when the serving version changes."""
    status = page.status

    @shown_errors
    def on_load(request: gr.Request):
        record = app.status_for(request, max_age_s=0)
        admin = app.is_admin(request)
        if app.auth_enabled:
            name = app.rater(request)
            who_text = f"Signed in as **{md_escape(name)}**" + (" (admin)" if admin else "")
        else:
            who_text = "Running without logins: you rate as the local user."
            name = LOCAL_USER
        offer = app.next_offer(name)
        rows = versions_rows(record)
        guidelines = app.guidelines()["text"]
        return (who_text, gr.Tab(visible=admin), offer["text"] or "", offer_state(offer), guidelines,
                app.rater_progress(name), gr.Dropdown(choices=app.history(name), value=None),
                *status_outputs(record), gr.Dropdown(choices=version_choices(record), value=None), rows, rows,
                record["serving_version"], None, *app.plots(),
                *(agreement_outputs(app.agreement()) if admin else [gr.skip()] * 2),
                guidelines if admin else gr.skip(), app.win_rate_line(), review_rows(app) if admin else gr.skip())

    rate, operate = page.rate, page.operate
    demo.load(on_load, None, [status.who, operate.tab, rate.prompt, rate.offered_page, rate.guidelines, rate.progress,
                              rate.history, *status.boxes, page.compare.version, *page.tables, status.seen_version,
                              status.fingerprint_seen, *page.plots, operate.agreement_overall, operate.agreement,
                              operate.guidelines, page.progress.win_rate, operate.review.table],
              api_visibility="private")

    def on_tick(last_version, last_fingerprint, request: gr.Request):
        try:
            record = app.status_for(request)
        except Exception as exc:  # noqa: BLE001 - a database hiccup must not break the page
            log.warning("status refresh failed: %s", exc)
            why = f": {exc}" if app.is_admin(request) else " (the database did not answer); retrying"
            return (*[gr.skip()] * 4, gr.Textbox(value=f"Status unavailable{why}", visible=True),
                    *[gr.skip()] * 9)
        serving = record["serving_version"]
        if last_version is not None and serving != last_version:
            what = "Rolled back: now serving" if serving < last_version else "New version: now serving"
            gr.Info(f"{what} {version_label(serving)}.", duration=8, title="Model updated")
        error = record["swap_error"]
        banner_update = gr.Textbox(value=error or "", visible=bool(error))
        versions_now = tuple((v["version"], v["status"]) for v in record["adapter_versions"])
        fingerprint = [versions_now, serving, record["counts"]["ratings"], record["counts"]["preferences"],
                       len(app.metric_rows())]
        if fingerprint == last_fingerprint:
            refreshed = [gr.skip()] * 7
        else:
            same_versions = last_fingerprint is not None and last_fingerprint[0] == versions_now
            rows = versions_rows(record)
            refreshed = [*app.plots(), gr.skip() if same_versions else gr.Dropdown(choices=version_choices(record)),
                         rows, rows, app.win_rate_line()]
        return (*status_outputs(record), banner_update, serving, fingerprint, *refreshed)

    page.timer.tick(on_tick, [status.seen_version, status.fingerprint_seen],
                    [*status.boxes, status.banner, status.seen_version, status.fingerprint_seen, *page.plots,
                     page.compare.version, *page.tables, page.progress.win_rate],
                    api_visibility="private", concurrency_limit=None, show_progress="hidden")


# ---------------------------------------------------------------------------------- rating

def wire_rating(app: FeedbackApp, page: Page) -> None:
    """Next prompt, Skip and Generate (the candidates' text streamed into blind cards) on the Rate tab."""
    rate, max_n = page.rate, app.sampling.max_candidates

    def offer_outputs(rater: str, note: str = "") -> tuple:
        offer = app.next_offer(rater)
        return (gr.skip() if offer["text"] is None else offer["text"], offer_state(offer),
                (note + " " + offer_note(offer)).strip(), *card_updates(max_n, None))

    @shown_errors
    def on_next(request: gr.Request):
        return offer_outputs(app.rater(request))

    offer_targets = [rate.prompt, rate.offered_page, rate.message, *rate.card_outputs]
    rate.next_button.click(on_next, None, offer_targets, api_visibility="private")

    @shown_errors
    def on_skip(prompt_text: str, offered: dict | None, request: gr.Request):
        rater = app.rater(request)
        if not offered or offered["text"] != prompt_text:
            raise ValueError("Nothing to skip: the prompt in the box is your own; type another or press Next prompt.")
        app.skip(offered["prompt_id"], rater)
        return offer_outputs(rater, "Skipped: you will not be offered that prompt again.")

    rate.skip_button.click(on_skip, [rate.prompt, rate.offered_page], offer_targets, api_visibility="private")

    generate_event = rate.generate_button.click(
        generate_handler(app), [rate.prompt, rate.n_slider, rate.offered_page], [rate.message, *rate.card_outputs],
        api_visibility="private", concurrency_id="model", concurrency_limit=1)
    generate_event.then(None, None, None, js="() => { if (window.ppoFeedbackFocusCandidate) "
                                              "window.ppoFeedbackFocusCandidate(0); }")


def wire_submissions(app: FeedbackApp, page: Page) -> None:
    """Submit (one unit, then the versions revealed), Undo, and reopening a recent page to change it."""
    rate, max_n = page.rate, app.sampling.max_candidates
    after = [rate.message, rate.progress, rate.history, *page.status.boxes]

    def refreshed(rater: str, message: str) -> tuple:
        return (message, app.rater_progress(rater), gr.Dropdown(choices=app.history(rater), value=None),
                *status_outputs(app.status(max_age_s=0)))

    @shown_errors
    def on_submit(values: dict, request: gr.Request):
        rater = app.rater(request)
        shown = ShownPage.from_state(values[rate.shown])
        if shown.submitted:
            raise ValueError("This page is stored. To change it, undo (u) or open it from your recent ratings.")
        n = len(shown.ids)
        _, confirmed = app.submit(shown, [values[r] for r in rate.radios[:n]], values[rate.best],
                                  values[rate.none_good], [(values[f], values[r]) for f, r in
                                                           zip(rate.flags[:n], rate.reasons[:n])],
                                  values[rate.comment], rater)
        gr.Info(confirmed, duration=4, title="Thank you")
        shown.revealed = shown.submitted = True
        offer = app.next_offer(rater)
        return (*refreshed(rater, f"{confirmed} Written by {reveal_line(shown)}. {offer_note(offer)}"),
                gr.skip() if offer["text"] is None else offer["text"], offer_state(offer),
                *reveal_updates(max_n, shown))

    rate.submit_button.click(on_submit, {rate.shown, rate.best, rate.none_good, rate.comment, *rate.radios,
                                         *rate.flags, *rate.reasons},
                             [*after, rate.prompt, rate.offered_page, *rate.card_outputs], api_visibility="private")

    def reopened(rater: str, submission: Submission, message: str) -> tuple:
        shown, texts, prompt_text = app.open_page(submission.page_id, revealed=True)
        return (*refreshed(rater, message), prompt_text, *card_updates(max_n, shown, texts, submission))

    @shown_errors
    def on_undo(request: gr.Request):
        rater = app.rater(request)
        undone = app.undo_submission(rater)
        return reopened(rater, undone, "Undone: your earlier judgement of this page (if any) counts again. "
                                       "Its page is open: change it and submit, or move on.")

    rate.undo_button.click(on_undo, None, [*after, rate.prompt, *rate.card_outputs], api_visibility="private")

    @shown_errors
    def on_change(submission_id: Any, request: gr.Request):
        rater = app.rater(request)
        if submission_id is None:
            raise ValueError("Choose one of your recent ratings first.")
        return reopened(rater, app.submission(submission_id, rater),
                        "Change your judgement and submit: it replaces the earlier one (which is kept, marked).")

    rate.change_button.click(on_change, [rate.history], [*after, rate.prompt, *rate.card_outputs],
                             api_visibility="private")


def generate_handler(app: FeedbackApp):
    """Return the Generate button's handler: a generator that shows the blind cards (letters only, in an
    order shuffled for the page), streams every candidate's text into them as the tokens come (one batch
    for the page), then the recorded page and the message. When the prompt is the page another rater
    judged that was offered (--overlap), it shows that page's candidates instead of generating."""
    max_n = app.sampling.max_candidates

    @shown_errors
    def on_generate(prompt_text: str, n: float, offered: dict | None, request: gr.Request) -> Iterator[tuple]:
        rater = app.rater(request)
        prompt_text = app.check_prompt(prompt_text)
        if offered and offered.get("page_id") is not None and offered["text"] == prompt_text:
            shown, texts, _ = app.open_page(offered["page_id"], revealed=False)
            yield ("Another rater judged these candidates too: rate them as you would any page.",
                   *card_updates(max_n, shown, texts))
            return
        n = app.check_n(n)
        order = app.card_order(n)
        unchanged = [gr.skip()] * (max_n + 1)  # the state and the columns stay as they are while text streams
        rest = [gr.skip()] * (3 * max_n + 3)
        yield (f"Generating {n} candidate{'s' if n != 1 else ''}…", None,
               *[gr.Column(visible=i < n) for i in range(max_n)],
               *[gr.Textbox(value="", label=f"{LETTERS[i]} · generating…" if i < n else LETTERS[i])
                 for i in range(max_n)], *card_updates(max_n, None)[2 * max_n + 1:])
        for records in app.generate_stream(prompt_text, n, rater):
            if "generation_id" not in records[0]:  # text so far
                yield (gr.skip(), *unchanged, *[gr.Textbox(value=records[order[i]]["text"]) for i in range(n)],
                       *[gr.skip()] * (max_n - n), *rest)
                continue
            shown = shown_from_records(records, order)
            app.remember_order(shown.page_id, order)
            yield (f"{n} candidate{'s' if n != 1 else ''}: rate each 1–5, pick the best (two or more for a tie) "
                   "or say none is good, then submit. The versions are shown after you submit.",
                   *card_updates(max_n, shown, [records[i]["text"] for i in order]))

    return on_generate


# ------------------------------------------------------------------------- compare and operate

def wire_compare(app: FeedbackApp, page: Page) -> None:
    """The Compare button: one prompt and seed through the base model, the serving and a chosen version."""
    compare = page.compare

    @shown_errors
    def on_compare(prompt_text: str, version: Any, seed: Any):
        result = app.compare(prompt_text, version, seed if seed is not None else 0)
        chosen = result.get("chosen")
        return (gr.Textbox(value=result["base"]),
                gr.Textbox(value=result["serving"]["text"],
                           label=f"Serving version ({version_label(result['serving']['version'])})"),
                gr.Textbox(value=chosen["text"] if chosen else "",
                           label=f"Chosen version ({version_label(chosen['version'])})" if chosen
                           else "Chosen version (pick one above)"))

    compare.button.click(on_compare, [compare.prompt, compare.version, compare.seed],
                         [compare.base, compare.serving, compare.chosen], api_visibility="private",
                         concurrency_id="model", concurrency_limit=1)


def wire_operate(app: FeedbackApp, page: Page) -> None:
    """Add prompts and roll back on the Operate tab (its downloads are API endpoints, see api.py)."""
    operate = page.operate

    @shown_errors
    def on_add_prompts(path: str | None, text: str, request: gr.Request):
        app.require_admin(request, "add prompts")
        parts = []
        if path:
            parts.append(app.add_prompts(Path(path).read_text(encoding="utf-8"), os.path.basename(path)))
        if text and text.strip():
            parts.append(app.add_prompts(text))
        if not parts:
            raise ValueError("Choose a file or paste prompts first.")
        return " ".join(parts), None, ""

    operate.add_button.click(on_add_prompts, [operate.upload, operate.pasted],
                             [operate.add_message, operate.upload, operate.pasted], api_visibility="private")

    @shown_errors
    def on_rollback(version: Any, request: gr.Request):
        app.require_admin(request, "roll back")
        result = app.rollback(version)
        rolled = ", ".join(f"v{v}" for v in result["rolled_back"]) or "nothing"
        return f"Rolled back {rolled}; serving {version_label(result['serving_version'])}."

    operate.rollback_button.click(on_rollback, [operate.version], [operate.message], api_visibility="private")

    @shown_errors
    def on_save_guidelines(text: str, request: gr.Request):
        app.require_admin(request, "write guidelines")
        saved = app.write_guidelines(text, app.rater(request))
        return f"Guidelines version {saved['version']} is in force.", saved["text"]

    operate.guidelines_button.click(on_save_guidelines, [operate.guidelines],
                                    [operate.guidelines_message, page.rate.guidelines], api_visibility="private")

    @shown_errors
    def on_agreement(request: gr.Request):
        app.require_admin(request, "see agreement")
        return agreement_outputs(app.agreement())

    operate.agreement_button.click(on_agreement, None, [operate.agreement_overall, operate.agreement],
                                   api_visibility="private")
    wire_prompt_review(app, operate.review)


def review_rows(app: FeedbackApp) -> list[list[Any]]:
    """Return the rows of Operate's list of prompts waiting for review: [id, text, typed by, when]."""
    return [[p["prompt_id"], p["text"], p["added_by"] or "", p["created_at"][:19].replace("T", " ")]
            for p in app.pending_prompts()]


def wire_prompt_review(app: FeedbackApp, review: Any) -> None:
    """Operate's review of raters' typed prompts: refresh the list, admit or reject the prompt whose id is given."""

    @shown_errors
    def on_refresh(request: gr.Request):
        app.require_admin(request, "review prompts")
        return review_rows(app)

    def decide(admit: bool):
        @shown_errors
        def on_decide(prompt_id: Any, request: gr.Request):
            app.require_admin(request, "review prompts")
            if prompt_id is None:
                raise ValueError("Enter the id of a prompt from the list first.")
            result = app.review_prompt(prompt_id, admit, app.rater(request))
            return f"Prompt {result['prompt_id']} {result['admission']}.", review_rows(app)
        return on_decide

    review.refresh_button.click(on_refresh, None, [review.table], api_visibility="private")
    review.admit_button.click(decide(True), [review.prompt_id], [review.message, review.table],
                              api_visibility="private")
    review.reject_button.click(decide(False), [review.prompt_id], [review.message, review.table],
                               api_visibility="private")
