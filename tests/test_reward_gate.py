"""The reward model is judged before PPO optimises it (#15): page-ordering agreement on held-out pages
with a bootstrap interval (`rewards.judge_on_pages`), and what a round does when it is not trusted."""
from __future__ import annotations

import math

import pytest
import torch

from ppo_feedback.config import ObjectiveConfig, RewardConfig
from ppo_feedback.objectives import page_pairs
from ppo_feedback.rewards import MIN_JUDGED_PAGES, FitReport, PageAgreement, RewardModel, judge_on_pages
from tests.test_worker import make_worker, rated_store  # noqa: F401  (fixture)

NO_PAIRS = torch.zeros(0, 2, dtype=torch.long)


def pages_of(n_pages: int, per_page: int, features: int, signal: float, seed: int = 0):
    """Return (x, z, page ids, orderings): scores follow feature 0 by `signal`, plus noise of std 0.5."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_pages * per_page, features, generator=g, dtype=torch.float64)
    z = signal * x[:, 0] + 0.5 * torch.randn(len(x), generator=g, dtype=torch.float64)
    pages = [100 + i // per_page for i in range(len(x))]
    return x, z, pages, page_pairs(z, pages)


def test_a_reward_model_that_learns_the_raters_taste_is_trusted():
    x, z, pages, orderings = pages_of(30, 4, 20, signal=1.0)
    judged = judge_on_pages(x, z, NO_PAIRS, orderings, pages, RewardConfig(), l2=1.0)
    assert judged.pages == 30 and judged.pairs == len(orderings)
    assert judged.low <= judged.agreement <= judged.high
    assert judged.low > 0.6 and judged.trusted
    assert "trusted" in judged.summary() and "30 held-out pages" in judged.summary()


def test_a_reward_model_fitted_to_noise_is_not_trusted():
    x, z, pages, orderings = pages_of(30, 4, 20, signal=0.0)
    judged = judge_on_pages(x, z, NO_PAIRS, orderings, pages, RewardConfig(), l2=1.0)
    assert judged.low < 0.5 < judged.high and not judged.trusted
    assert "no better than chance" in judged.summary()


def test_ties_count_half_and_a_coin_toss_is_not_trusted():
    # every candidate of a page has the same features: every prediction ties, agreement exactly 1/2
    x, z, pages, orderings = pages_of(12, 3, 5, signal=1.0)
    x = x[[3 * (i // 3) for i in range(len(x))]]
    judged = judge_on_pages(x, z, NO_PAIRS, orderings, pages, RewardConfig(), l2=1.0)
    assert judged.agreement == pytest.approx(0.5) and judged.low == pytest.approx(0.5)
    assert not judged.trusted  # the interval must lie above chance, not touch it


def test_held_out_pages_are_never_fitted_on():
    # the taste is a page's own: on each page the candidate with the largest feature k is best, k = page % 5.
    # A head fitted on all pages would learn every k; one fitted without the page still orders it only if
    # other pages share its k. Give one page a k no other page has: its orderings must be judged at chance.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(44, 6, generator=g, dtype=torch.float64)
    pages = [i // 4 for i in range(44)]
    k = [5 if p == 10 else p % 5 for p in pages]
    z = torch.stack([x[i, k[i]] for i in range(44)])
    orderings = page_pairs(z, pages)
    judged = judge_on_pages(x, z, NO_PAIRS, orderings, pages, RewardConfig(), l2=0.1)
    alone = judge_on_pages(x, z, NO_PAIRS, [o for o in orderings if pages[o[0]] != 10], pages, RewardConfig(), l2=0.1)
    assert judged.agreement < alone.agreement  # page 10 pulls the agreement down: it was held out when predicted


def test_too_few_pages_are_not_judged():
    x, z, pages, orderings = pages_of(MIN_JUDGED_PAGES - 1, 4, 5, signal=1.0)
    judged = judge_on_pages(x, z, NO_PAIRS, orderings, pages, RewardConfig(), l2=1.0)
    assert judged == PageAgreement(pages=MIN_JUDGED_PAGES - 1, pairs=len(orderings))
    assert not judged.trusted and "not judged" in judged.summary()


def test_preferences_order_pages_too():
    # no ratings at all: only picks (chosen, rejected), one page each; the chosen has the larger feature 0
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    z = torch.full((40,), math.nan, dtype=torch.float64)
    pairs = [(i, i + 1) if x[i, 0] > x[i + 1, 0] else (i + 1, i) for i in range(0, 40, 2)]
    pages = [i // 2 for i in range(40)]
    judged = judge_on_pages(x, z, torch.tensor(pairs), pairs, pages, RewardConfig(), l2=0.1)
    assert judged.pages == 20 and judged.pairs == 20 and judged.trusted


def test_the_judgement_travels_with_a_saved_reward_model(tmp_path):
    model = RewardModel(4)
    model.report = FitReport(n_examples=3, n_scores=3, n_preferences=0, train_loss=0.1,
                             agreement=PageAgreement(pages=12, pairs=30, agreement=0.7, low=0.6, high=0.8))
    model.save(tmp_path)
    loaded = RewardModel.load(tmp_path)
    assert loaded.report.agreement == model.report.agreement and loaded.report.trusted


# ------------------------------------------------------------------------------ the worker's round

def untrusted(tmp_path, tiny_model_dir, store, fallback):
    """A worker whose reward model is judged on 4 pages (rated_store): too few, so it is not trusted.
    (rated_store's better candidates are normalised to +0.75: good at --good-score 0.5.)"""
    return make_worker(tmp_path, tiny_model_dir, store,
                       objective=ObjectiveConfig(objective="ppo", reward_model_fallback=fallback, good_score=0.5))


def test_an_untrusted_reward_model_is_not_optimised_the_round_trains_the_fallback(tmp_path, tiny_model_dir,
                                                                                rated_store):
    worker = untrusted(tmp_path, tiny_model_dir, rated_store, "raft")
    states = []
    worker.set_state = states.append
    version = worker.run_round()
    assert version == 1
    metrics = rated_store.get_version(1).metrics
    assert metrics["reward_model/trusted"] == 0.0 and metrics["reward_model/judged_pages"] == 4
    assert "reward_model/page_agreement" not in metrics  # not judged: no agreement to report
    assert "loss/raft" in metrics and metrics["direct/examples"] > 0 and "loss/policy" not in metrics
    assert any("training raft" in s and "instead of PPO" in s and "not judged" in s for s in states), states


def test_an_untrusted_reward_model_with_fallback_wait_publishes_nothing_until_new_feedback(tmp_path,
                                                                                        tiny_model_dir,
                                                                                        rated_store):
    worker = untrusted(tmp_path, tiny_model_dir, rated_store, "wait")
    before = [p.detach().clone() for p in worker.policy.trainable_parameters()]
    assert worker.run_round() is None
    assert rated_store.list_versions() == []
    assert all(torch.equal(a, b) for a, b in zip(before, worker.policy.trainable_parameters()))
    _, _, missing = worker.plan_round()
    assert missing.startswith("more feedback: the reward model not judged"), missing
    from ppo_feedback.feedback import read_feedback

    rated_store.rate(read_feedback(rated_store).generations[0].id, "cat", 4)
    assert worker.plan_round()[2] is None  # new feedback: the next round fits and judges again


def test_a_trusted_reward_model_is_optimised_by_ppo(tmp_path, tiny_model_dir, rated_store, monkeypatch):
    from ppo_feedback import worker as worker_module

    real_fit = worker_module.fit_reward_model

    def judged_fit(*args, **kwargs):
        model, report = real_fit(*args, **kwargs)
        report.agreement = PageAgreement(pages=12, pairs=30, agreement=0.8, low=0.7, high=0.9)
        return model, report

    monkeypatch.setattr(worker_module, "fit_reward_model", judged_fit)
    worker = untrusted(tmp_path, tiny_model_dir, rated_store, "raft")
    assert worker.run_round() == 1
    metrics = rated_store.get_version(1).metrics
    assert metrics["reward_model/trusted"] == 1.0 and metrics["reward_model/page_agreement"] == pytest.approx(0.8)
    assert metrics["reward_model/page_agreement_low"] == pytest.approx(0.7)
    assert "loss/policy" in metrics and "loss/raft" not in metrics


def test_the_status_panel_says_how_the_newest_version_was_trained():
    from ppo_feedback.page.controller import training_summary
    from ppo_feedback.page.handlers import training_note

    fallback = training_summary({"loss/raft": 1.2, "objective/scores": 0.1, "reward_model/trusted": 0.0,
                                 "reward_model/page_agreement": 0.52, "reward_model/page_agreement_low": 0.41,
                                 "reward_model/page_agreement_high": 0.63, "reward_model/judged_pages": 14.0})
    assert fallback == {"objective": "raft", "reward_model": {"agreement": 0.52, "low": 0.41, "high": 0.63,
                                                              "pages": 14, "trusted": False}}
    assert training_note(fallback) == " · raft instead of ppo: reward model 0.52 [0.41, 0.63] on 14 pages, " \
                                      "no better than chance"
    ppo = training_summary({"loss/policy": 0.1, "objective/scores": 0.3, "reward_model/trusted": 1.0,
                            "reward_model/page_agreement": 0.7, "reward_model/page_agreement_low": 0.6,
                            "reward_model/page_agreement_high": 0.8, "reward_model/judged_pages": 20.0})
    assert training_note(ppo) == " · ppo, reward model 0.70 [0.60, 0.80] on 20 pages"
    assert training_note(training_summary({"loss/dpo": 0.6, "objective/scores": 0.2})) == " · dpo"
    assert training_summary({}) is None and training_note(None) == ""
