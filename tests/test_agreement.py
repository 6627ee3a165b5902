"""Inter-rater agreement of scripted raters on shared pages, checked against figures computed by hand."""
from __future__ import annotations

import pytest

from db import FeedbackStore, NewGeneration
from ppo_feedback.agreement import agreement, krippendorff_alpha


@pytest.fixture
def three_raters(tmp_path):
    """Three pages of two candidates (g, h) that ana asked for; ben and carol get them as overlap pages.

    Ratings of g on pages 1-3: ana 1, 3, 5; ben 1, 5, 5 (disagrees on page 2); carol as ana.
    Bests: page 1 all pick h; page 2 ana and carol tie g and h, ben picks g; page 3 all: none is good.
    """
    store = FeedbackStore(tmp_path / "feedback.db")
    pages = []
    for i in range(3):
        prompt = store.add_prompt(f"prompt {i}")
        g, h = store.record_generations(prompt, 0, [NewGeneration("g"), NewGeneration("h")], rater="ana")
        pages.append((g.page_id, g.id, h.id))
    script = {"ana": ([1, 3, 5], ["h", "tie", "none"]), "ben": ([1, 5, 5], ["h", "g", "none"]),
              "carol": ([1, 3, 5], ["h", "tie", "none"])}
    for rater, (scores, bests) in script.items():
        for (page, g, h), score, best in zip(pages, scores, bests):
            if rater != "ana":
                assert store.offer_overlap_page(rater).id == page  # the same generations, offered to a second rater
            picked = {"h": [h], "g": [g], "tie": [g, h], "none": []}[best]
            store.submit_page(page, rater, {g: score}, picked, tie=best == "tie", none_good=best == "none")
    yield store
    store.close()


def test_two_raters_alpha_equals_the_hand_computed_one():
    # coincidences: o(1,1) = 2, o(3,5) = o(5,3) = 1, o(5,5) = 2; n1 = 2, n3 = 1, n5 = 3, n = 6
    # ordinal δ²: (1,3) 1.5² = 2.25, (1,5) 3.5² = 12.25, (3,5) 2² = 4
    # D_o = (1 + 1)·4 / 6 = 4/3; D_e = 2·(2·1·2.25 + 2·3·12.25 + 1·3·4) / (6·5) = 6; alpha = 1 − (4/3)/6 = 7/9
    alpha, units = krippendorff_alpha({"ana": {1: 1, 2: 3, 3: 5}, "ben": {1: 1, 2: 5, 3: 5}})
    assert units == 3 and alpha == pytest.approx(7 / 9)
    assert krippendorff_alpha({"ana": {1: 4, 2: 2}, "ben": {1: 4, 2: 2}})[0] == pytest.approx(1.0)
    assert krippendorff_alpha({"ana": {1: 3}, "ben": {2: 3}}) == (None, 0)  # nothing rated by both
    assert krippendorff_alpha({"ana": {1: 3, 2: 3}, "ben": {1: 3, 2: 3}}) == (None, 2)  # undefined: no variation


def test_agreement_per_pair_and_overall(three_raters):
    result = agreement(three_raters)
    pairs = {tuple(p["raters"]): p for p in result["pairs"]}
    assert set(pairs) == {("ana", "ben"), ("ana", "carol"), ("ben", "carol")}
    assert pairs["ana", "carol"]["alpha"] == pytest.approx(1.0) and pairs["ana", "carol"]["pick_agreement"] == 1.0
    for pair in (("ana", "ben"), ("ben", "carol")):
        assert pairs[pair]["alpha"] == pytest.approx(7 / 9)
        assert pairs[pair]["pick_agreement"] == pytest.approx(2 / 3) and pairs[pair]["shared_pages"] == 3
    overall = result["overall"]
    # three raters: o(1,1) = 3, o(3,5) = o(5,3) = o(3,3) = 1, o(5,5) = 3; n1 = 3, n3 = 2, n5 = 4, n = 9
    # δ²: (1,3) 2.5² = 6.25, (1,5) 5.5² = 30.25, (3,5) 3² = 9; D_o = 2·9/9 = 2
    # D_e = 2·(3·2·6.25 + 3·4·30.25 + 2·4·9) / (9·8) = 13.125; alpha = 1 − 2/13.125 = 89/105
    assert overall["alpha"] == pytest.approx(89 / 105) and overall["shared_generations"] == 3
    assert overall["pick_agreement"] == pytest.approx(7 / 9) and overall["shared_pages"] == 9


def test_undone_judgements_do_not_count(three_raters):
    three_raters.undo_last_submission("ben")  # ben's page 3: none is good, g rated 5
    pairs = {tuple(p["raters"]): p for p in agreement(three_raters)["pairs"]}
    assert pairs["ana", "ben"]["shared_pages"] == 2 and pairs["ana", "ben"]["pick_agreement"] == pytest.approx(1 / 2)
    assert pairs["ana", "ben"]["shared_generations"] == 2
