"""What one rater can do to everyone: a rater's own typed prompt stays out of the pool until an admin
admits it, and nobody judges candidates that were not shown to them."""

from __future__ import annotations

import pytest

from db import Flag, FeedbackStore, NewGeneration, StoreError
from store_fixtures import store, store_url  # noqa: F401  (fixtures)


def _page(store: FeedbackStore, prompt: int, rater: str, n: int = 2) -> tuple[int, list[int]]:
    made = store.record_generations(prompt, 0, [NewGeneration(f"{rater} #{i}") for i in range(n)], rater=rater)
    return made[0].page_id, [g.id for g in made]


def _stored(store: FeedbackStore) -> tuple:
    feedback = store.feedback_since()
    return ([(r.rating.generation_id, r.rating.rater) for r in feedback.ratings],
            [(p.chosen.id, p.preference.rater) for p in feedback.preferences], store.submissions())


def test_a_raters_typed_prompt_reaches_nobody_else_until_an_admin_admits_it(store):
    pool = store.add_prompt("From the prompts file", source="builtin")
    typed = store.add_prompt("Buy my product", added_by="mallory")  # fewest ratings: served first today
    assert store.get_prompt(typed).admission == "pending"
    assert store.next_prompt("ana").id == pool  # never another rater's pending prompt
    assert [p.id for p in store.list_prompts()] == [pool]  # what training samples
    store.skip_prompt(pool, "mallory")
    assert store.next_prompt("mallory").id == typed  # its author may still be offered it
    page, ids = _page(store, typed, "mallory")
    store.submit_page(page, "mallory", {ids[0]: 5, ids[1]: 1}, [ids[0]])
    assert store.page_to_overlap("ana") is None and store.offer_overlap_page("ana") is None  # nor as an overlap page
    assert len(store.feedback_since().ratings) == 2  # the author's ratings still count as feedback
    assert [p.id for p in store.pending_prompts()] == [typed]

    store.review_prompt(typed, True, "admin")
    assert [p.id for p in store.list_prompts()] == [pool, typed] and store.pending_prompts() == []
    assert store.offer_overlap_page("ana").id == page
    store.skip_prompt(pool, "ana")
    assert store.next_prompt("ana").id == typed  # admitted: offered to everyone
    store.review_prompt(typed, False, "admin")
    assert [p.id for p in store.list_prompts()] == [pool] and store.next_prompt("ana") is None
    assert len(store.feedback_since().ratings) == 2  # rejecting loses no rating


def test_admin_typed_and_uploaded_prompts_are_admitted(store):
    assert store.get_prompt(store.add_prompt("Admin typed", added_by="boss", admitted=True)).admission == "admitted"
    typed = store.add_prompt("Same text", added_by="mallory")
    assert store.add_prompts(["Same text"], source="uploaded") == [typed]  # an admin's upload admits it
    assert store.get_prompt(typed).admission == "admitted"
    rejected = store.add_prompt("Rejected", added_by="mallory")
    store.review_prompt(rejected, False, "boss")
    store.add_prompts(["Rejected"], source="builtin")  # re-adding the prompts file at start-up does not undo it
    assert store.get_prompt(rejected).admission == "rejected"
    with pytest.raises(StoreError, match="Unknown prompt id"):
        store.review_prompt(999, True, "boss")


def test_a_rater_cannot_judge_candidates_shown_to_someone_else(store):
    prompt = store.add_prompt("Shared prompt")
    page, (a, b) = _page(store, prompt, "ana")
    before = _stored(store)
    for attempt in (
        lambda: store.rate(a, "ben", 1),
        lambda: store.prefer(b, a, "ben"),
        lambda: store.pick_best(b, [a], "ben"),
        lambda: store.submit_page(page, "ben", {a: 1}),
        lambda: store.submit_page(page, "ben", best=[b]),
        lambda: store.submit_page(page, "ben", none_good=True),
        lambda: store.submit_page(page, "ben", flags=[Flag(a, "offensive")]),
    ):
        with pytest.raises(StoreError, match="Page .* was not shown to 'ben'"):
            attempt()
    assert _stored(store) == before  # nothing stored
    store.rate(a, "ana", 4)  # the rater who asked may
    with pytest.raises(StoreError, match="Unknown generation id 999"):
        store.rate(999, "ben", 1)


def test_a_page_offered_to_a_second_rater_may_be_judged_by_both(store):
    prompt = store.add_prompt("Overlap prompt")
    page, (a, b) = _page(store, prompt, "ana")
    store.submit_page(page, "ana", {a: 4, b: 2}, [a])
    assert store.offer_overlap_page("ben").id == page
    store.submit_page(page, "ben", {a: 3, b: 5}, [b])
    store.rate(a, "ben", 2)
    assert store.show_page(page, "ben") is False and store.show_page(page, "ana") is False
    with pytest.raises(StoreError, match="not shown to 'carol'"):
        store.rate(a, "carol", 2)
