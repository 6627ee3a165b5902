"""The learners read submissions as stated: undone and superseded rows are ignored, ties give no pair
among the tied, none-is-good pages and flagged candidates are never made likelier."""
from __future__ import annotations

import math

import pytest

from db import FeedbackStore, Flag, NewGeneration
from ppo_feedback.direct import examples
from ppo_feedback.feedback import read_feedback


def _page(store: FeedbackStore, prompt: str, n: int, first_token: int) -> dict[str, int]:
    """Record a page of n candidates whose responses are one token each; return {text: generation id}."""
    prompt_id = store.add_prompt(prompt)
    made = store.record_generations(prompt_id, 0, [NewGeneration(f"{prompt}-{i}", [first_token + i], [-1.0], {"temperature": 1.0})
                                                   for i in range(n)], rater="ana")
    return {g.text[-1]: g.id for g in made} | {"page": made[0].page_id}


@pytest.fixture
def judged(tmp_path):
    """A store where ana judged five pages (see the test names) and the learners' view of it."""
    store = FeedbackStore(tmp_path / "feedback.db")
    tie = _page(store, "tie", 3, 10)       # 5, 3, 1 with the first two tied best
    store.submit_page(tie["page"], "ana", {tie["0"]: 5, tie["1"]: 3, tie["2"]: 1}, [tie["0"], tie["1"]], tie=True)
    bad = _page(store, "bad", 3, 20)       # 4, 2, 1 and none is good
    store.submit_page(bad["page"], "ana", {bad["0"]: 4, bad["1"]: 2, bad["2"]: 1}, none_good=True)
    flag = _page(store, "flag", 2, 30)     # 5 picked as best, then flagged on a second look
    store.submit_page(flag["page"], "ana", {flag["0"]: 5, flag["1"]: 1}, [flag["0"]])
    store.submit_page(flag["page"], "ana", {flag["0"]: 5}, [flag["0"]], flags=[Flag(flag["0"], "offensive")])
    unrated = _page(store, "unrated", 2, 40)  # none is good, nothing rated
    store.submit_page(unrated["page"], "ana", none_good=True)
    undone = _page(store, "undone", 2, 50)  # rated, then undone
    store.submit_page(undone["page"], "ana", {undone["0"]: 5, undone["1"]: 1}, [undone["0"]])
    store.undo_last_submission("ana")
    feedback = read_feedback(store)
    row = {g.id: r for r, g in enumerate(feedback.generations)}
    yield feedback, row, {"tie": tie, "bad": bad, "flag": flag, "unrated": unrated, "undone": undone}
    store.close()


def _ids(feedback, rows):
    return {feedback.generations[r].id for r in rows}


def test_undone_rows_are_not_read_and_superseded_picks_are_gone(judged):
    feedback, row, pages = judged
    assert not {pages["undone"]["0"], pages["undone"]["1"]} & set(row)
    assert feedback.n_ratings == 3 + 3 + 2  # the flag page's first submission rated 2, its second 1: both current
    assert feedback.pairs == [(row[pages["tie"]["0"]], row[pages["tie"]["2"]]),
                              (row[pages["tie"]["1"]], row[pages["tie"]["2"]])]  # the flagged pick is left out


def test_none_is_good_pages_give_undesirable_rows_rated_or_not(judged):
    feedback, row, pages = judged
    expected = {pages["bad"][k] for k in "012"} | {pages["unrated"][k] for k in "01"}
    assert _ids(feedback, feedback.undesirable) == expected
    assert all(math.isnan(float(feedback.scores[row[pages["unrated"][k]]])) for k in "01")
    assert _ids(feedback, feedback.flagged) == {pages["flag"]["0"]}


def test_dpo_has_no_pair_among_the_tied_nor_with_a_blocked_chosen(judged):
    feedback, row, pages = judged
    tie, bad = pages["tie"], pages["bad"]
    ordered = {(feedback.generations[c].id, feedback.generations[r].id) for c, r in feedback.orderings()}
    assert ordered == {(tie["0"], tie["2"]), (tie["1"], tie["2"])}  # not (0, 1); nothing from bad or flag
    found = examples("dpo", feedback)
    chosen = {found.sequences[c][1][0] for c, _ in found.items}
    assert chosen == {10, 11} and len(found) == 2
    assert (bad["0"], bad["1"]) not in ordered


def test_raft_keeps_no_candidate_of_a_none_is_good_page_nor_a_flagged_one(judged):
    feedback, _, _ = judged
    found = examples("raft", feedback)
    assert sorted(found.sequences[i][1][0] for (i,) in found.items) == [10]  # 20 (rated 4 of 4, 2, 1) and 30 not


def test_kto_labels_blocked_candidates_undesirable(judged):
    feedback, _, _ = judged
    found = examples("kto", feedback)
    labels = {found.sequences[own][1][0]: label for (own, _), label in zip(found.items, found.desirable)}
    assert labels[20] is False and labels[21] is False and labels[22] is False  # the none-is-good page
    assert labels[40] is False and labels[41] is False  # unrated, none is good
    assert labels[30] is False  # rated 5, but flagged
    assert labels[10] is True and labels[12] is False
    assert not any(labels.get(t) for t in (50, 51))  # undone


def test_ppo_replays_no_blocked_candidate(judged):
    feedback, row, pages = judged
    scores = feedback.relative_scores()
    assert scores[row[pages["bad"]["0"]]] > 0 and scores[row[pages["flag"]["0"]]] > 0  # rated above their siblings ...
    replayed = {tuple(r) for r in feedback.replay_pool(1.0).responses}
    assert replayed == {(10,)}  # ... but never replayed to be made likelier (11: 3 of 5, 3, 1 is not above)
