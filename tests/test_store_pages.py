"""Pages in the store: one request of one rater, its candidates side by side, on every backend."""

from __future__ import annotations

import re
from datetime import timezone

import pytest

from db import Cursor, FeedbackStore, NewGeneration, StoreError, VersionRecord
from store_fixtures import store, store_url  # noqa: F401  (fixtures)


def _texts(*texts: str) -> list[NewGeneration]:
    return [NewGeneration(t) for t in texts]


def test_each_call_is_one_page_of_the_rater_who_asked(store: FeedbackStore) -> None:
    prompt_id = store.add_prompt("Write a haiku")
    ana = store.record_generations(prompt_id, 0, _texts("a1", "a2", "a3"), rater="  ana ")
    ben = store.record_generations(prompt_id, 0, _texts("b1", "b2"), rater="ben")
    again = store.record_generations(prompt_id, 0, _texts("a4"), rater="ana")
    script = store.record_generations(prompt_id, 0, _texts("s1"))

    pages = [{g.page_id for g in call} for call in (ana, ben, again, script)]
    assert [len(p) for p in pages] == [1, 1, 1, 1]  # every candidate of a call on the call's page
    ids = [p.pop() for p in pages]
    assert len(set(ids)) == 4 and ids == sorted(ids)  # same prompt, same version: still four pages
    shown = [store.get_page(i) for i in ids]
    assert [(p.prompt_id, p.rater, p.adapter_version) for p in shown] == [
        (prompt_id, "ana", 0),
        (prompt_id, "ben", 0),
        (prompt_id, "ana", 0),
        (prompt_id, None, 0),  # no person asked (a script)
    ]
    assert shown[0].created_at == ana[0].created_at and shown[0].created_at.tzinfo == timezone.utc
    assert [g.text for g in store.page_generations(ids[0])] == ["a1", "a2", "a3"]
    assert store.get_generation(ben[1].id).page_id == ids[1]
    assert store.record_generations(prompt_id, 0, []) == []  # nothing to show: no page
    assert store.counts()["generations"] == 7


def test_a_page_filled_in_over_several_calls(store: FeedbackStore) -> None:
    prompt_id = store.add_prompt("Tell a joke")
    store.publish_version(1, VersionRecord(0, "tiny", Cursor(), 0, 0), "adapters/v1")
    [first] = store.record_generations(prompt_id, 0, _texts("first"), rater="ana")
    rest = store.record_generations(
        prompt_id, 1, _texts("second", "third"), rater="ana", page_id=first.page_id
    )
    single = store.record_generation(prompt_id, 1, "fourth", rater="ana", page_id=first.page_id)

    assert {g.page_id for g in [*rest, single]} == {first.page_id}
    on_page = store.page_generations(first.page_id)
    # a swap between the calls: each candidate keeps its version, the page the one serving first
    assert [(g.text, g.adapter_version) for g in on_page] == [
        ("first", 0),
        ("second", 1),
        ("third", 1),
        ("fourth", 1),
    ]
    assert store.get_page(first.page_id).adapter_version == 0


def test_feedback_carries_the_page_of_each_generation(store: FeedbackStore) -> None:
    prompt_id = store.add_prompt("Describe the sea")
    ana = store.record_generations(prompt_id, 0, _texts("calm", "grey"), rater="ana")
    ben = store.record_generations(prompt_id, 0, _texts("wild"), rater="ben")
    store.rate(ana[0].id, "ana", 5)
    store.rate(ben[0].id, "ben", 2)
    store.show_page(ana[0].page_id, "ben")  # shown to ben too (an --overlap page)
    store.rate(ana[1].id, "ben", 3)  # so ben may rate it; it stays on ana's page
    store.pick_best(ana[0].id, [ana[1].id], "ana")

    feedback = store.feedback_since()
    assert [(r.generation.id, r.generation.page_id) for r in feedback.ratings] == [
        (ana[0].id, ana[0].page_id),
        (ben[0].id, ben[0].page_id),
        (ana[1].id, ana[0].page_id),
    ]
    [pair] = feedback.preferences
    assert (pair.chosen.page_id, pair.rejected.page_id) == (ana[0].page_id, ana[0].page_id)
    assert ana[0].page_id != ben[0].page_id


BAD_PAGES = {
    "unknown page": (lambda s, p, o, page: s.record_generation(p, 0, "t", rater="ana", page_id=999_999),
                     "Unknown page id 999999."),
    "page id 0": (lambda s, p, o, page: s.record_generation(p, 0, "t", rater="ana", page_id=0),
                  "The page id must be at least 1, not 0."),
    "page id text": (lambda s, p, o, page: s.record_generation(p, 0, "t", rater="ana", page_id="1"),
                     "The page id must be an integer, not '1'."),
    "page of another rater": (lambda s, p, o, page: s.record_generation(p, 0, "t", rater="ben", page_id=page),
                              "was asked for by 'ana', not by 'ben'."),
    "page without its rater": (lambda s, p, o, page: s.record_generation(p, 0, "t", page_id=page),
                               "was asked for by 'ana', not by None."),
    "page of another prompt": (lambda s, p, o, page: s.record_generation(o, 0, "t", rater="ana", page_id=page),
                               "shows prompt"),
    "blank rater": (lambda s, p, o, page: s.record_generation(p, 0, "t", rater="  "),
                    "The rater is empty."),
    "rater not text": (lambda s, p, o, page: s.record_generation(p, 0, "t", rater=7),
                       "The rater must be text"),
    "get unknown page": (lambda s, p, o, page: s.get_page(999_999), "Unknown page id 999999."),
    "generations of unknown page": (lambda s, p, o, page: s.page_generations(999_999), "Unknown page id"),
}


@pytest.mark.parametrize("case", BAD_PAGES, ids=list(BAD_PAGES))
def test_bad_pages_are_refused_and_write_nothing(store: FeedbackStore, case: str) -> None:
    prompt_id, other = store.add_prompt("one"), store.add_prompt("two")
    [shown] = store.record_generations(prompt_id, 0, _texts("shown"), rater="ana")
    before = (store.counts(), store.page_generations(shown.page_id))
    call, message = BAD_PAGES[case]
    with pytest.raises(StoreError, match=re.escape(message)):
        call(store, prompt_id, other, shown.page_id)
    assert (store.counts(), store.page_generations(shown.page_id)) == before
