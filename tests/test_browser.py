"""The page in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright.

Skipped locally when Chromium or the playwright package is missing; under CI (CI=true) that is a
failure instead, since `.ci/run` installs both. Screenshots go to test-artifacts/.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from db import Cursor, VersionRecord
from test_ui_support import page_store, PASSWORDS, SAMPLING, ScriptedServing, launch, load_serving, publish_version, write_users

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("PPO_FEEDBACK_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
TIMEOUT_MS = 60_000


def _missing_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright)"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def browser():
    reason = _missing_browser()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"browser tests must run in CI: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory, browser):
    """The page on the tiny model, without logins, polling for new versions every half second."""
    root = tmp_path_factory.mktemp("browser")
    store = page_store(root / "feedback.db", ["Write a short poem about the sea.", "Name three colours."])
    serving = load_serving(tiny_model_dir, store, root / "adapters")
    serving.start_polling(0.5)
    launched = launch(serving, store)
    yield {"url": launched.url, "store": store, "serving": serving, "root": root, "model": tiny_model_dir}
    launched.close()
    serving.stop()
    store.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def leave(page) -> None:
    """Navigate away before the test's server closes, so the page fetches nothing from a closed server."""
    page.goto("about:blank")


def text_of(page, selector: str) -> str:
    return page.locator(f"{selector} textarea, {selector} input[type=text]").first.input_value()


def wait_for_value(page, selector: str, predicate_js: str) -> None:
    """Wait until the text box under `selector` has a value for which `predicate_js` (on v) is true."""
    page.wait_for_function(
        f"""() => {{ const el = document.querySelector('{selector} textarea, {selector} input[type=text]');
                     if (!el) return false; const v = el.value; return {predicate_js}; }}""")


def shoot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def card_label(page, i: int) -> str:
    """Return the label of candidate card i as shown."""
    return page.locator(f"#candidate-{i} label span").first.text_content().strip()


def test_rate_with_the_keyboard_and_see_the_counts_change(live, page):
    page.goto(live["url"])
    wait_for_value(page, "#prompt", "v === 'Write a short poem about the sea.'")  # the pool's next prompt
    wait_for_value(page, "#status-ratings", "v.startsWith('0 /')")
    wait_for_value(page, "#rater-progress", "v.startsWith('You: 0 ratings today, 0 in total · next training round')")
    page.click("#generate")
    wait_for_value(page, "#rate-message", "v.startsWith('3 candidates: rate each')")
    assert [card_label(page, i) for i in range(3)] == ["A", "B", "C"]  # blind: no version before submitting
    page.wait_for_function("() => document.activeElement && document.activeElement.id === 'candidate-0'")

    for key in "425":  # rates A, moves to B, rates B, ...
        page.keyboard.press(key)
    page.locator("#candidate-1").click(position={"x": 8, "y": 8})  # pick a candidate with the mouse, 'b' = best
    page.keyboard.press("b")
    checked = [page.locator(f"#rating-{i} input:checked").get_attribute("value") for i in range(3)]
    assert checked == ["4", "2", "5"]
    assert [page.locator("#best-candidate label").nth(i).locator("input").is_checked() for i in range(3)] == \
        [False, True, False]
    shoot(page, "rate-page.png")

    page.keyboard.press("Enter")  # submits
    wait_for_value(page, "#status-ratings", "v.startsWith('3 /')")
    wait_for_value(page, "#rate-message", "v.startsWith('Stored 3 ratings and B as the best; undo with u.')")
    wait_for_value(page, "#rater-progress", "v.startsWith('You: 3 ratings today, 3 in total')")  # the counter moved
    assert "Written by A: base model · B: base model · C: base model." in text_of(page, "#rate-message")
    page.wait_for_function("() => document.querySelector('#candidate-0 label span')?.textContent.trim()"
                           " === 'A · base model'")  # revealed after submitting
    assert text_of(page, "#prompt") == "Name three colours."  # the next prompt is offered
    ratings = {r.rating.generation_id: r.rating.score for r in live["store"].feedback_since().ratings}
    assert sorted(ratings.values()) == [2, 4, 5] and {r.rating.rater for r in live["store"].feedback_since().ratings} == {"local"}
    assert len(live["store"].feedback_since().preferences) == 2
    shoot(page, "rate-page-submitted.png")


def scripted_page(tmp_path, prompts: list[str], texts: list[str], **options):
    """Serve the page on ScriptedServing (fixed texts, no model) over a new store; return (launched, store)."""
    store = page_store(tmp_path / "feedback.db", prompts)
    sampling = SAMPLING.__class__(**{**SAMPLING.__dict__, "num_candidates": len(texts)})
    return launch(ScriptedServing(store, texts, tmp_path / "adapters"), store, sampling, **options), store


def card_texts(page, n: int) -> list[str]:
    return [text_of(page, f"#candidate-text-{i}") for i in range(n)]


def generate(page, n: int) -> list[str]:
    """Press Generate, wait for the page to be recorded; return the cards' texts in card order."""
    page.click("#generate")
    wait_for_value(page, "#rate-message", f"v.startsWith('{n} candidates: rate each')")
    return card_texts(page, n)


TEXTS = ["first answer", "second answer", "third answer"]


def test_cards_are_blind_shuffled_per_page_and_a_tie_and_a_flag_are_stored_as_such(page, tmp_path):
    launched, store = scripted_page(tmp_path, ["One prompt", "Another prompt"], TEXTS, shuffle_seed=3)
    try:
        page.goto(launched.url)
        wait_for_value(page, "#prompt", "v === 'One prompt'")
        first = generate(page, 3)
        assert sorted(first) == sorted(TEXTS) and [card_label(page, i) for i in range(3)] == ["A", "B", "C"]
        page.locator("#candidate-0").click(position={"x": 8, "y": 8})
        page.keyboard.press("4")  # A: 4, on to B
        page.keyboard.press("b")  # B best ...
        page.locator("#candidate-2").click(position={"x": 8, "y": 8})
        page.keyboard.press("t")  # ... tied with C
        page.keyboard.press("f")  # C flagged: broken
        page.get_by_role("option", name="broken").click()
        page.locator("#candidate-2").click(position={"x": 8, "y": 8})
        page.keyboard.press("Enter")
        wait_for_value(page, "#rate-message", "v.startsWith('Stored 1 rating, a tie of B and C and 1 flag; undo')")
        page.keyboard.press("Enter")  # again: the page is stored once, and the rater is told how to change it
        page.get_by_text("This page is stored. To change it, undo (u)").first.wait_for()
        [submission] = store.submissions(current_only=False)
        by_text = {g.text: g.id for g in store.page_generations(submission.page_id)}
        assert submission.tie and set(submission.best) == {by_text[first[1]], by_text[first[2]]}
        assert [(f.generation_id, f.kind) for f in submission.flags] == [(by_text[first[2]], "broken")]
        assert dict(submission.scores) == {by_text[first[0]]: 4}
        assert store.feedback_since().preferences and all(  # a tie: no preference between the tied
            {p.chosen.id, p.rejected.id} != {by_text[first[1]], by_text[first[2]]} for p in store.feedback_since().preferences)
        wait_for_value(page, "#prompt", "v === 'Another prompt'")
        second = generate(page, 3)
        assert second != first  # the seeded shuffle orders this page differently
        assert first != TEXTS or second != TEXTS  # and not simply as decoded
    finally:
        leave(page)
        launched.close()
        store.close()


def test_undo_restores_the_previous_state_and_the_store_keeps_history_and_skip_is_not_reoffered(page, tmp_path):
    launched, store = scripted_page(tmp_path, ["First prompt", "Second prompt", "Third prompt"], TEXTS[:2],
                                    shuffle_seed=5)
    try:
        page.goto(launched.url)
        wait_for_value(page, "#prompt", "v === 'First prompt'")
        page.keyboard.press("s")  # skip: never offered again
        wait_for_value(page, "#prompt", "v === 'Second prompt'")
        wait_for_value(page, "#rate-message", "v.startsWith('Skipped')")
        generate(page, 2)
        page.locator("#candidate-0").click(position={"x": 8, "y": 8})
        page.keyboard.press("5")
        page.keyboard.press("2")
        page.keyboard.press("Enter")
        wait_for_value(page, "#rater-progress", "v.startsWith('You: 2 ratings today')")
        wait_for_value(page, "#prompt", "v === 'Third prompt'")
        before = store.counts()["ratings"]
        page.locator("#kbd-help").click()  # focus outside any text box
        page.keyboard.press("u")
        wait_for_value(page, "#rate-message", "v.startsWith('Undone')")
        wait_for_value(page, "#rater-progress", "v.startsWith('You: 0 ratings today')")
        assert before == 2 and store.counts()["ratings"] == 0
        [undone] = store.submissions(current_only=False)
        assert undone.status == "undone" and len(undone.scores) == 2  # kept, marked
        assert text_of(page, "#prompt") == "Second prompt"  # its page is open again, with what I had given
        assert [page.locator(f"#rating-{i} input:checked").get_attribute("value") for i in range(2)] == ["5", "2"]
        page.locator("#candidate-1").click(position={"x": 8, "y": 8})
        page.keyboard.press("4")
        page.keyboard.press("Enter")
        wait_for_value(page, "#rate-message", "v.startsWith('Stored 2 ratings')")
        assert sorted(s.status for s in store.submissions(current_only=False)) == ["current", "undone"]
        assert sorted(r.rating.score for r in store.feedback_since().ratings) == [4, 5]
        page.locator("#history input").click()  # change it again from my history
        page.get_by_role("option").first.click()
        page.click("#change-rating")
        wait_for_value(page, "#rate-message", "v.startsWith('Change your judgement')")
        page.locator("#candidate-0").click(position={"x": 8, "y": 8})
        page.keyboard.press("1")
        page.keyboard.press("Enter")
        wait_for_value(page, "#rate-message", "v.startsWith('Stored 2 ratings')")
        assert sorted(s.status for s in store.submissions(current_only=False)) == ["current", "superseded", "undone"]
        assert store.next_prompt("local").text == "Third prompt"  # the skipped one never comes back
        page.click("#next-prompt")
        wait_for_value(page, "#prompt", "v === 'Third prompt'")
        page.keyboard.press("s")
        wait_for_value(page, "#rate-message", "v.includes('You have rated every prompt in the pool')")
    finally:
        leave(page)
        launched.close()
        store.close()


def test_mixed_pages_are_blind_and_progress_shows_the_win_rate(page, tmp_path):
    """--mix-versions: a page of v1's and the base model's candidates looks like any other until submitted;
    the pick then moves the win rate of v1 over the base model in Progress."""
    launched, store = scripted_page(tmp_path, ["One prompt"], TEXTS[:2], mix_versions=True, shuffle_seed=2)
    store.publish_version(1, VersionRecord(parent=0, base_model="tiny", cursor=Cursor(), n_ratings=0,
                                           n_preferences=0), "v0001")
    launched.app.serving.version = 1
    try:
        page.goto(launched.url)
        wait_for_value(page, "#prompt", "v === 'One prompt'")
        generate(page, 2)
        assert [card_label(page, i) for i in range(2)] == ["A", "B"]
        page.locator("#candidate-0").click(position={"x": 8, "y": 8})
        page.keyboard.press("b")
        page.keyboard.press("Enter")
        wait_for_value(page, "#rate-message", "v.startsWith('Stored 0 ratings and A as the best')")
        labels = [card_label(page, i) for i in range(2)]
        assert sorted(labels) == ["A · base model", "B · v1"] or sorted(labels) == ["A · v1", "B · base model"]
        won = "1.00" if labels[0] == "A · v1" else "0.00"
        page.get_by_role("tab", name="Progress").click()
        wait_for_value(page, "#win-rate", f"v.startsWith('Win rate of v1 over base model: {won} (95% interval')")
    finally:
        leave(page)
        launched.close()
        store.close()


def login(browser, url: str, name: str):
    """Open the page in a new browser context signed in as `name`; return (context, page)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.fill("input[data-testid=textbox]", name)
    page.fill("input[type=password]", PASSWORDS[name])
    page.get_by_role("button", name="Login").click()
    page.locator("#who").get_by_text(f"Signed in as {name}").wait_for()
    return context, page


def rate_by_text(page, scores: dict[str, int]) -> None:
    """Rate each card by its text (`scores`: {text: 1..5}) and submit."""
    for i, text in enumerate(card_texts(page, len(scores))):
        page.locator(f"#rating-{i} label").filter(has_text=str(scores[text])).first.click()
    page.click("#submit-ratings")
    wait_for_value(page, "#rate-message", "v.startsWith('Stored')")


def test_guidelines_overlap_and_agreement_for_two_raters(browser, tmp_path):
    """ana (admin) writes guidelines and rates a page; with --overlap 1 ben gets the same candidates; ana's
    Operate tab shows the agreement computed by hand (test_agreement: 7/9)."""
    launched, store = scripted_page(tmp_path, ["Only prompt"], TEXTS, users=write_users(tmp_path / "users.json"),
                                    overlap=1.0, shuffle_seed=11)
    try:
        ana_context, ana = login(browser, launched.url, "ana")
        ana.get_by_role("tab", name="Operate").click()
        ana.fill("#operate-guidelines textarea", "Prefer short, kind answers.")
        ana.click("#save-guidelines")
        wait_for_value(ana, "#guidelines-message", "v === 'Guidelines version 1 is in force.'")
        ana.get_by_role("tab", name="Rate", exact=True).click()
        generate(ana, 3)
        rate_by_text(ana, {"first answer": 1, "second answer": 3, "third answer": 5})

        ben_context, ben = login(browser, launched.url, "ben")
        ben.locator("#guidelines-box").get_by_text("Rating guidelines").click()
        wait_for_value(ben, "#guidelines", "v === 'Prefer short, kind answers.'")
        assert ben.locator("#guidelines textarea").is_disabled() and ben.get_by_role("tab", name="Operate").count() == 0
        wait_for_value(ben, "#prompt", "v === 'Only prompt'")  # ana's page, offered to a second rater
        ben.click("#generate")
        wait_for_value(ben, "#rate-message", "v.startsWith('Another rater judged these candidates')")
        rate_by_text(ben, {"first answer": 1, "second answer": 5, "third answer": 5})
        assert {g.page_id for g in store.page_generations(store.submissions()[0].page_id)} == \
            {s.page_id for s in store.submissions()}  # the same generations, not only the same prompt
        assert all(s.guideline_version == 1 for s in store.submissions())
        shoot(ben, "rate-page-second-rater.png")

        ana.get_by_role("tab", name="Operate").click()
        ana.click("#refresh-agreement")
        wait_for_value(ana, "#agreement-overall", "v.startsWith('alpha 0.778 on 3 candidates')")
        ana.wait_for_function("() => document.querySelector('#agreement-pairs')?.innerText.includes('ana & ben')")
        shoot(ana, "operate-agreement.png")
        ben_context.close()
        ana_context.close()
    finally:
        launched.close()
        store.close()


def test_a_new_version_is_announced_and_plotted_without_reloading(live, page):
    page.goto(live["url"])
    wait_for_value(page, "#status-serving", "v.length > 0")
    before = live["serving"].version
    version = publish_version(live["model"], live["store"], live["root"] / "adapters", seed=3)
    wait_for_value(page, "#status-serving", f"v === 'v{version}'")
    page.get_by_text(f"New version: now serving v{version}.").first.wait_for()
    assert version > before
    for generation in live["serving"].generate("Rate the new version", 2, rater="tester", seed=1):
        assert generation.adapter_version == version
        live["store"].rate(generation.id, "tester", 5)
    page.get_by_role("tab", name="Progress").click()
    page.locator("#progress-versions").get_by_text("published").wait_for()
    page.locator("#plot-score canvas, #plot-score svg").first.wait_for()
    page.locator("#plot-ratings").get_by_text("v1", exact=True).wait_for()  # the new version's mean rating
    page.wait_for_timeout(500)
    shoot(page, "progress.png")


def test_prompts_and_generations_render_as_text(page, browser, tmp_path):
    """Script and event-handler markup in a pool prompt and in model output is shown literally, never run."""
    prompt = "<script>window.__pwned = 'prompt'</script><img src=x onerror=\"window.__pwned='prompt-img'\">"
    outputs = ["<script>window.__pwned = 'gen'</script>", "<img src=x onerror=\"window.__pwned='gen-img'\"> **bold**"]
    store = page_store(tmp_path / "feedback.db", [prompt])
    launched = launch(ScriptedServing(store, outputs, tmp_path / "adapters"), store,
                      SAMPLING.__class__(**{**SAMPLING.__dict__, "num_candidates": 2}))
    try:
        page.goto(launched.url)
        wait_for_value(page, "#prompt", f"v === {prompt!r}")
        page.click("#generate")
        page.wait_for_function(f"() => Array.from(document.querySelectorAll('textarea')).filter(t => t.value === "
                               f"{outputs[0]!r} || t.value === {outputs[1]!r}).length >= 2")  # shuffled cards
        assert sorted([text_of(page, "#candidate-0"), text_of(page, "#candidate-1")]) == sorted(outputs)
        page.get_by_role("tab", name="Compare").click()
        page.fill("#compare-prompt textarea", prompt)
        page.click("#compare-button")
        page.wait_for_function(f"() => Array.from(document.querySelectorAll('textarea'))"
                               f".filter(t => t.value === {outputs[0]!r}).length >= 3")
        page.wait_for_timeout(500)
        assert page.evaluate("window.__pwned") is None
        assert page.locator("img[src=x]").count() == 0 and page.locator("b:text('model')").count() == 0
        shoot(page, "injection.png")

        page.get_by_role("tab", name="Rate", exact=True).click()  # limits are messages on the page, not crashes
        page.fill("#prompt textarea", "x" * (SAMPLING.max_prompt_chars + 1))
        page.click("#generate")
        page.get_by_text(f"The prompt has {SAMPLING.max_prompt_chars + 1} characters; the limit is "
                         f"{SAMPLING.max_prompt_chars}.").first.wait_for()
    finally:
        leave(page)
        launched.close()
        store.close()


def test_the_cards_show_the_text_as_it_is_generated(page, tmp_path):
    """A page's candidates stream into their cards: partial text is on the page before the final message."""
    texts = ["The sea is wide and the sea is deep, and it sings me to sleep.",
             "Waves roll in, waves roll out, that is what the tide is about."]
    store = page_store(tmp_path / "feedback.db", ["Write a short poem about the sea."])
    serving = ScriptedServing(store, texts, tmp_path / "adapters", step_s=0.4, chars=6)
    launched = launch(serving, store, SAMPLING.__class__(**{**SAMPLING.__dict__, "num_candidates": 2}))
    try:
        page.goto(launched.url)
        wait_for_value(page, "#prompt", "v.length > 0")
        page.click("#generate")
        # some text in card A while the message still says the page is being generated
        page.wait_for_function("""() => {
            const value = s => document.querySelector(`${s} textarea, ${s} input[type=text]`)?.value ?? '';
            return value('#candidate-text-0').length > 0 && value('#rate-message').startsWith('Generating');
        }""")
        partial = text_of(page, "#candidate-text-0")
        shown = next(t for t in texts if t.startswith(partial))  # whichever the page's shuffle put in card A
        assert len(partial) < len(shown)
        shoot(page, "streaming.png")
        wait_for_value(page, "#rate-message", "v.startsWith('2 candidates: rate each')")
        final = [text_of(page, f"#candidate-text-{i}") for i in range(2)]
        assert final[0] == shown and sorted(final) == sorted(texts)  # no card changed its candidate at the end
        assert card_label(page, 0) == "A"
    finally:
        leave(page)
        launched.close()
        store.close()


def test_only_admins_see_the_operate_tab(live, browser):
    users = write_users(live["root"] / "users.json")
    launched = launch(live["serving"], live["store"], users=users)
    try:
        for name, admin in (("ben", False), ("ana", True)):
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(launched.url)
            page.fill("input[data-testid=textbox]", name)
            page.fill("input[type=password]", PASSWORDS[name])
            page.get_by_role("button", name="Login").click()
            page.locator("#who").get_by_text(f"Signed in as {name}").wait_for()
            page.get_by_role("tab", name="Compare").wait_for()
            page.wait_for_timeout(500)
            assert page.get_by_role("tab", name="Operate").count() == (1 if admin else 0)
            if admin:
                page.get_by_role("tab", name="Operate").click()
                page.fill("#operate-paste textarea",
                          "An uploaded prompt\nAnother uploaded prompt")
                page.get_by_role("button", name="Add prompts").click()
                page.wait_for_function("() => Array.from(document.querySelectorAll('textarea'))"
                                       ".some(t => t.value.startsWith('Added 2 new prompts'))")
                shoot(page, "operate.png")
            context.close()
    finally:
        launched.close()
