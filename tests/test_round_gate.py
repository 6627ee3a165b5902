"""When a training round may start: enough ratings on enough prompts in all, enough new feedback since
the serving version; what the status panel says while it waits."""
from __future__ import annotations

import pytest

from db import FeedbackStore, NewGeneration
from db.records import FeedbackCounts
from ppo_feedback.config import WorkerConfig
from ppo_feedback.worker import missing_feedback


@pytest.mark.parametrize("total, new, waiting_for", [
    (FeedbackCounts(0, 0, 0), FeedbackCounts(0, 0, 0), "16 more ratings"),
    (FeedbackCounts(15, 9, 5), FeedbackCounts(15, 9, 5), "1 more rating"),  # preferences do not count here
    (FeedbackCounts(40, 0, 1), FeedbackCounts(40, 0, 1), "ratings on 2 more prompts"),
    (FeedbackCounts(40, 0, 2), FeedbackCounts(40, 0, 2), "ratings on 1 more prompt"),
    (FeedbackCounts(16, 0, 3), FeedbackCounts(16, 0, 3), None),
    (FeedbackCounts(50, 5, 9), FeedbackCounts(1, 2, 1), "1 more rating"),  # min_new_feedback 4: 3 new so far
    (FeedbackCounts(50, 5, 9), FeedbackCounts(0, 4, 0), None),  # new preferences count as new feedback
])
def test_a_round_waits_for_enough_ratings_on_enough_prompts(total, new, waiting_for):
    assert missing_feedback(WorkerConfig(min_new_feedback=4), total, new) == waiting_for


def test_the_defaults_wait_for_sixteen_ratings_on_three_prompts():
    config = WorkerConfig()
    assert (config.min_ratings, config.min_rated_prompts) == (16, 3)
    assert missing_feedback(config, FeedbackCounts(15, 0, 3), FeedbackCounts(15, 0, 3)) == "1 more rating"


def test_the_gate_can_be_lowered_and_is_validated():
    assert missing_feedback(WorkerConfig(min_new_feedback=4, min_ratings=0, min_rated_prompts=0), FeedbackCounts(0, 0, 0),
                            FeedbackCounts(4, 0, 1)) is None
    with pytest.raises(ValueError, match="--min-ratings"):
        WorkerConfig(min_ratings=-1).validate()


def test_the_store_counts_the_prompts_rated(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    first, second = store.add_prompt("one", source="builtin"), store.add_prompt("two", source="builtin")
    a, b = store.record_generations(first, 0, [NewGeneration("a"), NewGeneration("b")])
    (c,) = store.record_generations(second, 0, [NewGeneration("c")])
    store.rate(a.id, "ann", 4)
    store.rate(b.id, "ann", 2)
    assert store.count_feedback_since() == FeedbackCounts(2, 0, 1)
    store.rate(a.id, "ann", 5)  # a changed rating supersedes: still one current rating of a
    store.prefer(a.id, b.id, "bob")
    assert store.count_feedback_since() == FeedbackCounts(2, 1, 1)
    store.rate(c.id, "bob", 3)
    assert store.count_feedback_since() == FeedbackCounts(3, 1, 2)
    store.close()
