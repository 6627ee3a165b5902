"""Submissions: one page's judgement as a unit, idempotent keys, change, undo and its window, skip,
ties, none-is-good, flags, guidelines, and pages offered to a second rater."""

from __future__ import annotations

from datetime import timedelta

import pytest

from db import Flag, FeedbackStore, NewGeneration, StoreError
from db.store import UNDO_GRACE, utcnow
from store_fixtures import store, store_url  # noqa: F401  (fixtures)


def _page(store: FeedbackStore, text: str = "Tell me a story.", n: int = 3, rater: str = "ana") -> tuple[int, list[int]]:
    """Record a page of `n` candidates of a new prompt asked for by `rater`; return (page id, generation ids)."""
    prompt = store.add_prompt(text)
    generations = store.record_generations(prompt, 0, [NewGeneration(f"{text} #{i}") for i in range(n)], rater=rater)
    return generations[0].page_id, [g.id for g in generations]


def _state(store: FeedbackStore) -> tuple:
    """Return what learners and exports read: current ratings and current preferences, as plain tuples."""
    feedback = store.feedback_since()
    return (sorted((r.rating.generation_id, r.rating.rater, r.rating.score) for r in feedback.ratings),
            sorted((p.chosen.id, p.rejected.id, p.preference.rater) for p in feedback.preferences))


def test_a_submission_stores_ratings_pick_flags_and_comment_as_one_unit(store):
    page, (a, b, c) = _page(store)
    guideline = store.write_guidelines("Prefer short, kind answers.", "admin")
    done = store.submit_page(page, "ana", {a: 5, b: 2}, [a], flags=[Flag(c, "other", "made up a name")],
                             comment="A is best")
    assert (done.status, done.scores, done.best, done.tie, done.none_good) == ("current", ((a, 5), (b, 2)), (a,),
                                                                                False, False)
    assert done.flags == (Flag(c, "other", "made up a name"),) and done.comment == "A is best"
    assert done.guideline_version == guideline.version == 1
    assert [r.guideline_version for r in store.rating_history(a)] == [1]
    assert [r.submission_id for r in store.rating_history(a)] == [done.id]
    assert _state(store) == ([(a, "ana", 5), (b, "ana", 2)], [(a, b, "ana"), (a, c, "ana")])
    [judgement] = store.judgements()
    assert (judgement.flagged, judgement.tied, judgement.none_good) == ((c,), (), False)


@pytest.mark.parametrize("bad", [
    lambda a, b: {"scores": {a: 4}, "flags": [Flag(999, "broken")]},  # not on the page (found in the transaction)
    lambda a, b: {"scores": {a: 4}, "flags": [Flag(b, "rude")]},     # an unknown kind
    lambda a, b: {"scores": {a: 4}, "flags": [Flag(b, "other")]},    # "other" without a reason
    lambda a, b: {"best": [a], "none_good": True},                   # a best on a page where none is good
    lambda a, b: {"best": [a], "tie": True},                         # a tie of one
    lambda a, b: {"best": [a, b]},                                   # two bests without a tie
    lambda a, b: {"best": [a, a], "tie": True},                      # a candidate named twice
    lambda a, b: {"scores": {a: 6}},
    lambda a, b: {"scores": {a: 10**30}},
    lambda a, b: {"scores": {2**70: 3}},
    lambda a, b: {"scores": {a: "5"}},
    lambda a, b: {"scores": [5]},
    lambda a, b: {"best": a},
    lambda a, b: {"best": [a, b], "tie": "yes"},
    lambda a, b: {"scores": {a: 4}, "client_key": " "},
    lambda a, b: {},                                                 # nothing at all
])
def test_bad_input_is_refused_and_stores_nothing(store, bad):
    page, (a, b, _) = _page(store)
    with pytest.raises(StoreError):
        store.submit_page(page, "ana", **bad(a, b))
    assert _state(store) == ([], []) and store.my_submissions("ana") == [] and store.judgements() == []


def test_generations_of_another_page_and_unknown_pages_are_refused(store):
    page, ids = _page(store)
    other, other_ids = _page(store, "Another prompt")
    with pytest.raises(StoreError, match=f"Generation {other_ids[0]} is not on page {page}"):
        store.submit_page(page, "ana", {ids[0]: 3, other_ids[0]: 4})
    with pytest.raises(StoreError, match="Unknown page id 999"):
        store.submit_page(999, "ana", {ids[0]: 3})
    assert _state(store) == ([], [])


def test_the_same_client_key_twice_stores_one_submission(store):
    page, (a, b, _) = _page(store)
    first = store.submit_page(page, "ana", {a: 4}, [a], client_key="page-1-try")
    again = store.submit_page(page, "ana", {a: 4}, [a], client_key="page-1-try")
    assert again == first
    assert len(store.rating_history(a)) == 1 and len(store.my_submissions("ana")) == 1
    other, (x, *_) = _page(store, "Other")
    with pytest.raises(StoreError, match="already used for page"):
        store.submit_page(other, "ana", {x: 4}, client_key="page-1-try")
    store.show_page(page, "ben")
    assert store.submit_page(page, "ben", {a: 2}, client_key="page-1-try").rater == "ben"  # keys are per rater


def test_submitting_a_page_again_supersedes_and_keeps_history(store):
    page, (a, b, c) = _page(store)
    first = store.submit_page(page, "ana", {a: 5, b: 1}, [a], flags=[Flag(b, "broken")])
    second = store.submit_page(page, "ana", {a: 2}, [b, c], tie=True)
    assert [s.status for s in store.my_submissions("ana")] == ["current", "superseded"]
    assert [(r.score, r.current) for r in store.rating_history(a)] == [(5, False), (2, True)]
    # b's rating was not given again: it stays; the pick, flags of the first are no longer in force
    assert _state(store) == ([(a, "ana", 2), (b, "ana", 1)], [(b, a, "ana"), (c, a, "ana")])
    [judgement] = store.judgements()
    assert (judgement.submission_id, judgement.tied, judgement.flagged) == (second.id, (b, c), ())
    assert first.id != second.id


def test_undo_restores_the_previous_state_and_deletes_nothing(store):
    page, (a, b, c) = _page(store)
    store.rate(a, "ana", 3)  # a rating given alone, before any submission
    before = _state(store)
    first = store.submit_page(page, "ana", {a: 5, b: 1}, [a])
    after_first = _state(store)
    store.submit_page(page, "ana", {a: 1}, none_good=True, flags=[Flag(c, "offensive")])
    assert store.undo_last_submission("ana").status == "undone"
    assert _state(store) == after_first
    assert [j.submission_id for j in store.judgements()] == []
    assert store.my_submissions("ana")[1].status == "current" and store.my_submissions("ana")[1].id == first.id
    assert store.undo_last_submission("ana").id == first.id
    assert _state(store) == before
    assert [(r.score, r.current) for r in store.rating_history(a)] == [(3, True), (5, False), (1, False)]
    with pytest.raises(StoreError, match="Nothing to undo"):
        store.undo_last_submission("ana")
    # the same pick can be given again after an undo (one current row per pair and rater)
    store.submit_page(page, "ana", {a: 5}, [a])
    assert _state(store)[1] == [(a, b, "ana"), (a, c, "ana")]


def test_undo_window_closes_when_a_round_starts_but_never_within_the_grace(store):
    page, (a, *_) = _page(store)
    done = store.submit_page(page, "ana", {a: 4})
    late = done.created_at + UNDO_GRACE + timedelta(seconds=1)
    assert store.acquire_lease("worker", 60)
    assert store.begin_round("worker")  # a round starts right after the submission
    with pytest.raises(StoreError, match="can no longer be undone"):
        store.undo_last_submission("ana", now=late)
    assert store.my_submissions("ana")[0].status == "current"
    assert store.undo_last_submission("ana", now=done.created_at + UNDO_GRACE / 2).status == "undone"
    # without a round after it, a submission can be undone long after
    again = store.submit_page(page, "ana", {a: 2})
    assert store.undo_last_submission("ana", now=again.created_at + timedelta(hours=5)).status == "undone"
    assert not store.begin_round("someone else")


def test_skip_is_recorded_and_never_offered_again(store):
    first, second = store.add_prompts(["first", "second"])
    assert store.next_prompt("ana").id == first
    assert store.skip_prompt(first, "ana") is True
    assert store.skip_prompt(first, "ana") is False
    assert store.next_prompt("ana").id == second
    assert store.next_prompt("ben").id == first  # only for the rater who skipped
    with pytest.raises(StoreError, match="Unknown prompt id"):
        store.skip_prompt(999, "ana")


def test_a_none_is_good_submission_without_ratings_counts_as_judged(store):
    page, ids = _page(store, "only prompt")
    store.submit_page(page, "ana", none_good=True)
    assert store.next_prompt("ana") is None
    [judgement] = store.judgements()
    assert judgement.none_good and [g.id for g in judgement.generations] == ids


def test_guidelines_are_versioned(store):
    assert store.guidelines() is None
    one = store.write_guidelines("Rate honesty first.", "ana")
    assert store.write_guidelines("Rate honesty first.", "ben") == one  # unchanged text: no new version
    two = store.write_guidelines("Rate honesty first.\nThen brevity.", "ana")
    assert (one.version, two.version) == (1, 2) and store.guidelines() == two and store.guidelines(1) == one
    page, (a, *_) = _page(store)
    assert store.rate(a, "ana", 4).guideline_version == 2
    with pytest.raises(StoreError, match="limit"):
        store.write_guidelines("x" * 20_001, "ana")


def test_page_to_overlap_offers_another_raters_page_once(store):
    page, (a, b, _) = _page(store, rater="ana")
    assert store.page_to_overlap("ben") is None  # nobody judged it yet
    store.submit_page(page, "ana", {a: 4, b: 2})
    assert store.page_to_overlap("ana") is None  # never one's own
    assert store.page_to_overlap("ben").id == page
    assert store.offer_overlap_page("ben").id == page  # shown to ben: ben may judge it
    store.submit_page(page, "ben", {a: 5, b: 1})
    assert store.page_to_overlap("ben") is None
    assert store.page_to_overlap("carol").id == page
    store.skip_prompt(store.get_page(page).prompt_id, "carol")
    assert store.page_to_overlap("carol") is None


def test_the_submissions_in_force_and_the_stamp_follow_undo(store):
    page, (a, *_) = _page(store)
    stamp = store.judgement_stamp()
    done = store.submit_page(page, "ana", {a: 4})
    assert store.judgement_stamp() != stamp and [s.id for s in store.submissions()] == [done.id]
    stamp = store.judgement_stamp()
    store.undo_last_submission("ana", now=utcnow())
    assert store.judgement_stamp() != stamp and store.submissions() == []


def test_a_failure_in_the_middle_of_a_submission_stores_nothing(store, monkeypatch):
    import db.store as store_module

    page, (a, b, _) = _page(store)
    store.submit_page(page, "ana", {a: 3}, [a])
    before = (_state(store), store.my_submissions("ana"))
    real, calls = store_module._add_rating, []

    def fails_on_the_second(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(store_module, "_add_rating", fails_on_the_second)
    with pytest.raises(RuntimeError, match="disk full"):
        store.submit_page(page, "ana", {a: 5, b: 1}, [b])
    assert len(calls) == 2 and (_state(store), store.my_submissions("ana")) == before


def test_rater_counts_follow_submissions_undo_and_the_day(store):
    page, (a, b, c) = _page(store)
    start = utcnow()
    assert store.rater_counts("ana", start) == {"total": 0, "since": 0}
    store.rate(a, "ana", 2)  # before the submission: counts in total, and since `start`
    store.submit_page(page, "ana", {a: 4, b: 5})  # a's rating is superseded, not added
    store.show_page(page, "ben")
    store.submit_page(page, "ben", {c: 1})
    assert store.rater_counts("ana", start) == {"total": 2, "since": 2}
    assert store.rater_counts("ana", utcnow() + timedelta(seconds=1)) == {"total": 2, "since": 0}
    store.undo_last_submission("ana")  # back to the single rating given before
    assert store.rater_counts("ana", start) == {"total": 1, "since": 1}
    assert store.rater_counts("ben", start)["total"] == 1
    with pytest.raises(StoreError, match="timezone-aware"):
        store.rater_counts("ana", start.replace(tzinfo=None))
