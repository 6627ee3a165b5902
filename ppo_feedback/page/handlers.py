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
from .controller import LETTERS, LOCAL_USER, FeedbackApp, version_label
from .inputs import md_escape, shown_errors
from .layout import Page

log = logging.getLogger(__name__)

def wire_page(app: FeedbackApp, page: Page, demo: gr.Blocks) -> None:
    """Connect every part of the page to the controller (inside `demo`); returns nothing."""
    wire_status(app, page, demo)
    wire_rating(app, page)
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


def empty_cards(max_n: int) -> tuple:
    """Return the updates that clear the candidate cards (see RateTab.card_outputs)."""
    return ([], *[gr.Column(visible=False) for _ in range(max_n)], *[gr.Textbox(value="") for _ in range(max_n)],
            *[gr.Radio(value=None) for _ in range(max_n)], gr.Radio(choices=[], value=None))


# ---------------------------------------------------------------------------------- status

def wire_status(app: FeedbackApp, page: Page, demo: gr.Blocks) -> None:
    """Fill the page on load (who is signed in, a first prompt, status, tables, plots) and refresh it
    on every timer tick, with a toast when the serving version changes."""
    status = page.status

    @shown_errors
    def on_load(request: gr.Request):
        record = app.status(max_age_s=0)
        admin = app.is_admin(request)
        if app.auth_enabled:
            name = app.rater(request)
            who_text = f"Signed in as **{md_escape(name)}**" + (" (admin)" if admin else "")
        else:
            who_text = "Running without logins: you rate as the local user."
            name = LOCAL_USER
        pool = app.next_prompt(name)
        rows = versions_rows(record)
        return (who_text, gr.Tab(visible=admin), pool["text"] or "", *status_outputs(record),
                gr.Dropdown(choices=version_choices(record), value=None), rows, rows,
                record["serving_version"], None, *app.plots())

    demo.load(on_load, None, [status.who, page.operate.tab, page.rate.prompt, *status.boxes, page.compare.version,
                              *page.tables, status.seen_version, status.fingerprint_seen, *page.plots],
              api_visibility="private")

    def on_tick(last_version, last_fingerprint):
        try:
            record = app.status()
        except Exception as exc:  # noqa: BLE001 - a database hiccup must not break the page
            log.warning("status refresh failed: %s", exc)
            return (*[gr.skip()] * 4, gr.Textbox(value=f"Status unavailable: {exc}", visible=True),
                    *[gr.skip()] * 8)
        serving = record["serving_version"]
        if last_version is not None and serving != last_version:
            what = "Rolled back: now serving" if serving < last_version else "New version: now serving"
            gr.Info(f"{what} {version_label(serving)}.", duration=8, title="Model updated")
        error = record["swap_error"]
        banner_update = gr.Textbox(value=error or "", visible=bool(error))
        versions_now = tuple((v["version"], v["status"]) for v in record["adapter_versions"])
        fingerprint = [versions_now, serving, record["counts"]["ratings"], len(app.metric_rows())]
        if fingerprint == last_fingerprint:
            refreshed = [gr.skip()] * 6
        else:
            same_versions = last_fingerprint is not None and last_fingerprint[0] == versions_now
            rows = versions_rows(record)
            refreshed = [*app.plots(), gr.skip() if same_versions else gr.Dropdown(choices=version_choices(record)),
                         rows, rows]
        return (*status_outputs(record), banner_update, serving, fingerprint, *refreshed)

    page.timer.tick(on_tick, [status.seen_version, status.fingerprint_seen],
                    [*status.boxes, status.banner, status.seen_version, status.fingerprint_seen, *page.plots,
                     page.compare.version, *page.tables],
                    api_visibility="private", concurrency_limit=None, show_progress="hidden")


# ---------------------------------------------------------------------------------- rating

def wire_rating(app: FeedbackApp, page: Page) -> None:
    """Next prompt, Generate (the candidates' text streamed into their cards) and Submit on the Rate tab."""
    rate, max_n = page.rate, app.sampling.max_candidates

    @shown_errors
    def on_next(request: gr.Request):
        pool = app.next_prompt(app.rater(request))
        text = pool["text"]
        note = "" if text is not None else "You have rated every prompt in the pool; type your own."
        return (gr.skip() if text is None else text, note, *empty_cards(max_n))

    rate.next_button.click(on_next, None, [rate.prompt, rate.message, *rate.card_outputs], api_visibility="private")

    generate_event = rate.generate_button.click(
        generate_handler(app), [rate.prompt, rate.n_slider], [rate.message, *rate.card_outputs],
        api_visibility="private", concurrency_id="model", concurrency_limit=1)
    generate_event.then(None, None, None, js="() => { if (window.ppoFeedbackFocusCandidate) "
                                              "window.ppoFeedbackFocusCandidate(0); }")

    @shown_errors
    def on_submit(values: dict, request: gr.Request):
        rater = app.rater(request)
        ids = values[rate.generation_ids]
        scores = [values[r] for r in rate.radios[:len(ids)]]
        best_letter = values[rate.best]
        best_index = LETTERS.index(best_letter) if best_letter else None
        confirmation = app.submit(ids, scores, best_index, values[rate.comment], rater)
        gr.Info(confirmation, duration=4, title="Thank you")
        pool = app.next_prompt(rater)
        record = app.status(max_age_s=0)
        offer = (" Next prompt loaded: press Generate." if pool["text"] is not None
                 else " You have rated every prompt in the pool; type your own.")
        return (confirmation + offer, pool["text"] if pool["text"] is not None else "", gr.Textbox(value=""),
                *status_outputs(record), *empty_cards(max_n))

    rate.submit_button.click(on_submit, {rate.generation_ids, rate.best, rate.comment, *rate.radios},
                             [rate.message, rate.prompt, rate.comment, *page.status.boxes, *rate.card_outputs],
                             api_visibility="private")


def generate_handler(app: FeedbackApp):
    """Return the Generate button's handler: a generator that shows the cards, streams every candidate's
    text into them as the tokens come (one batch for the page), then the recorded page and the message."""
    max_n = app.sampling.max_candidates

    def texts(records: list[dict[str, Any]], labelled: bool) -> list:
        updates = [gr.Textbox(value=r["text"], label=f"{LETTERS[i]} · {version_label(r['version'])}") if labelled
                   else gr.Textbox(value=r["text"]) for i, r in enumerate(records)]
        return updates + [gr.skip()] * (max_n - len(records))

    @shown_errors
    def on_generate(prompt_text: str, n: float, request: gr.Request) -> Iterator[tuple]:
        rater = app.rater(request)
        prompt_text = app.check_prompt(prompt_text)
        n = app.check_n(n)
        yield (f"Generating {n} candidate{'s' if n != 1 else ''}…", [],
               *[gr.Column(visible=i < n) for i in range(max_n)],
               *[gr.Textbox(value="", label=f"{LETTERS[i]} · generating…" if i < n else LETTERS[i])
                 for i in range(max_n)],
               *[gr.Radio(value=None) for _ in range(max_n)], gr.Radio(choices=list(LETTERS[:n]), value=None))
        unchanged = [gr.skip()] * (2 * max_n + 1)  # columns, ratings and the best pick stay as they are
        for records in app.generate_stream(prompt_text, n, rater):
            if "generation_id" not in records[0]:  # text so far
                yield (gr.skip(), gr.skip(), *unchanged[:max_n], *texts(records, False), *unchanged[max_n:])
                continue
            versions = sorted({r["version"] for r in records})
            yield (f"{n} candidate{'s' if n != 1 else ''} from {', '.join(map(version_label, versions))}: "
                   "rate each 1–5, pick the best if you like, then submit.", [r["generation_id"] for r in records],
                   *unchanged[:max_n], *texts(records, True), *unchanged[max_n:])

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
