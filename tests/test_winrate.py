"""--mix-versions: pages that mix the serving version's candidates with its parent's, and the win rate
of the new version over the old from the raters' picks, with its Wilson interval."""
from __future__ import annotations

import shutil

import pytest

from db import Cursor, FeedbackStore, NewGeneration, VersionRecord
from ppo_feedback.config import SamplingConfig
from ppo_feedback.page import FeedbackApp
from ppo_feedback.winrate import picks_between, serving_win_rate, win_rate
from store_fixtures import migrated_sqlite_template
from test_ui_support import ScriptedServing


@pytest.fixture
def store(tmp_path):
    shutil.copyfile(migrated_sqlite_template(), tmp_path / "feedback.db")
    feedback_store = FeedbackStore(tmp_path / "feedback.db")
    feedback_store.publish_version(1, VersionRecord(parent=0, base_model="tiny", cursor=Cursor(), n_ratings=0,
                                                    n_preferences=0), "v0001")
    yield feedback_store
    feedback_store.close()


def mixed_page(store, versions: list[int], text: str = "A prompt") -> list[int]:
    """Record one page with a candidate of each of `versions`; return their ids."""
    prompt = store.add_prompt(text)
    first = store.record_generations(prompt, versions[0], [NewGeneration("new")], rater="ana")
    ids = [first[0].id]
    for version in versions[1:]:
        ids += [g.id for g in store.record_generations(prompt, version, [NewGeneration(f"v{version}")], rater="ana",
                                                       page_id=first[0].page_id)]
    return ids


def test_the_win_rate_counts_picks_between_versions_with_the_wilson_interval(store):
    # 3 picks of the new one, 1 of the old; a tie across versions, none-is-good and a one-version page count for neither
    for i, picked in enumerate([0, 0, 0, 1]):
        ids = mixed_page(store, [1, 0], f"page {i}")
        store.submit_page(store.get_generation(ids[0]).page_id, "ana", best=[ids[picked]])
    ids = mixed_page(store, [1, 0], "tie")
    store.submit_page(store.get_generation(ids[0]).page_id, "ana", best=ids, tie=True)
    ids = mixed_page(store, [1, 0], "none")
    store.submit_page(store.get_generation(ids[0]).page_id, "ana", none_good=True)
    ids = mixed_page(store, [1, 1], "same version")
    store.submit_page(store.get_generation(ids[0]).page_id, "ana", best=[ids[0]])
    assert picks_between(store, 1, 0) == (3, 4)
    found = serving_win_rate(store, 1)
    # Wilson: centre (p + z²/2n)/(1 + z²/n), half-width z·sqrt(p(1-p)/n + z²/4n²)/(1 + z²/n), z = 1.959964
    z, p, n = 1.959963984540054, 0.75, 4
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    assert (found.new, found.old, found.wins, found.picks, found.rate) == (1, 0, 3, 4, 0.75)
    assert found.low == pytest.approx(centre - half) and found.high == pytest.approx(centre + half)
    assert win_rate(0, 0, 1, 0).rate is None and serving_win_rate(store, 0) is None


def test_a_mixed_page_holds_both_versions_and_progress_shows_the_win_rate(store, tmp_path):
    serving = ScriptedServing(store, ["one", "two", "three"], tmp_path / "adapters")
    serving.version = 1
    app = FeedbackApp(serving, store, SamplingConfig(max_candidates=4), mix_versions=True)
    try:
        assert app.win_rate_line() == "Win rate of v1 over base model: no pick between them yet."
        [records] = list(app.generate_stream("A prompt", 4, "ana"))  # one update: no streaming of a mixed page
        assert sorted(r["version"] for r in records) == [0, 0, 1, 1] and len({r["page_id"] for r in records}) == 1
        new = next(r["generation_id"] for r in records if r["version"] == 1)
        store.submit_page(records[0]["page_id"], "ana", best=[new])
        assert app.win_rate_line().startswith("Win rate of v1 over base model: 1.00 (95% interval 0.21–1.00) on 1 pick")
        assert [r["version"] for r in app.generate("Single", 1, "ana")] == [1]  # one candidate: nothing to mix
        assert FeedbackApp(serving, store, SamplingConfig()).win_rate_line() == ""  # off by default
    finally:
        app.close()


def test_a_judged_page_is_read_once_for_the_win_rate(store, monkeypatch):
    ids = mixed_page(store, [1, 0])
    store.submit_page(store.get_generation(ids[0]).page_id, "ana", best=[ids[1]])
    cache: dict = {}
    assert picks_between(store, 1, 0, cache) == (0, 1)
    monkeypatch.setattr(store, "page_generations", lambda page_id: pytest.fail("read again"))
    assert picks_between(store, 1, 0, cache) == (0, 1)
