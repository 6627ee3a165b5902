"""Direct rounds (`--objective dpo|raft|kto`): examples from rated pages, and worker rounds that publish them."""
from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from ppo_feedback.config import ObjectiveConfig
from ppo_feedback.direct import WAITING_FOR, Drift, examples
from ppo_feedback.feedback import RatedFeedback
from ppo_feedback.objectives import sequence_logprobs
from test_worker import make_worker, rated_store  # noqa: F401  (a fixture)

NAN = math.nan


def plain(objective: str, **overrides) -> ObjectiveConfig:
    """A direct objective with every drift and cost bound off (one round continues the last, no shrink, no step
    budget, no KL or perplexity stop, no RPO term, beta 0.1, 2 passes) unless `overrides` sets one: each test
    turns on the one mechanism it is about, whatever the app's defaults are."""
    settings = dict(beta=0.1, rpo_alpha=0.0, direct_epochs=2, direct_target_kl=None,
                    direct_max_perplexity_ratio=None, direct_max_steps=None, direct_from_base=False, direct_shrink=1.0)
    return ObjectiveConfig(objective=objective, **{**settings, **overrides})


def feedback(scores, page_ids, pairs=(), prompts=None, empty=()):
    """RatedFeedback of one generation per score; row i's response is [i + 1] ([] for rows in `empty`)."""
    generations = [SimpleNamespace(page_id=p, token_ids=[] if i in empty else [i + 1], logprobs=[])
                   for i, p in enumerate(page_ids)]
    return RatedFeedback(generations=generations, prompts=prompts or [f"prompt {p}" for p in page_ids],
                         scores=torch.tensor(scores, dtype=torch.float64), pairs=list(pairs),
                         n_ratings=len(scores), raters={"ann"})


# ------------------------------------------------------------------------------ the option

def test_objective_option_refuses_unknown_names_and_bad_beta():
    from ppo_feedback.worker import main

    with pytest.raises(ValueError, match="--objective must be one of ppo, dpo, ipo, raft, kto, not 'orpo'"):
        ObjectiveConfig(objective="orpo").validate()
    with pytest.raises(ValueError, match="--beta"):
        ObjectiveConfig(objective="dpo", beta=0.0).validate()
    with pytest.raises(ValueError, match="--direct-target-kl"):
        ObjectiveConfig(objective="dpo", direct_target_kl=0.0).validate()
    with pytest.raises(ValueError, match="--direct-target-kl"):
        ObjectiveConfig(objective="dpo", direct_target_kl=math.inf).validate()
    with pytest.raises(ValueError, match="--rpo-alpha"):
        ObjectiveConfig(objective="dpo", rpo_alpha=-1.0).validate()
    assert main(["--objective", "orpo", "--db", "unused.db"]) == 2  # refused before any model loads
    assert not ObjectiveConfig(objective="ppo").direct and ObjectiveConfig(objective="kto").direct


def test_a_bound_that_is_on_by_default_can_be_turned_off_on_the_command_line():
    import argparse

    from ppo_feedback.config import add_worker_arguments, from_namespace

    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    config = from_namespace(ObjectiveConfig, parser.parse_args(
        ["--direct-max-steps", "none", "--direct-target-kl", "None", "--no-direct-from-base",
         "--direct-max-perplexity-ratio", "none"]))
    assert (config.direct_max_steps, config.direct_target_kl, config.direct_from_base) == (None, None, False)
    assert config.direct_max_perplexity_ratio is None
    assert from_namespace(ObjectiveConfig, parser.parse_args(["--direct-max-steps", "7"])).direct_max_steps == 7
    with pytest.raises(SystemExit):  # not a number, nor none
        parser.parse_args(["--direct-max-steps", "many"])


# ------------------------------------------------------------------------------ examples

def test_dpo_examples_pair_one_pages_candidates_and_picks_win():
    # page 7: rows 0 > 1 > 2 (rated); page 8: rows 3, 4 rated 1.0 and -1.0 but a pick says 4 beats 3
    found = examples("dpo", feedback([1.0, 0.0, -1.0, 1.0, -1.0, NAN], [7, 7, 7, 8, 8, 8], pairs=[(4, 3)]))
    # rows used: 0..4 (row 5 is unrated and unpicked), laid out in row order
    assert [response for _, response in found.sequences] == [[1], [2], [3], [4], [5]]
    assert found.items == [(0, 1), (0, 2), (1, 2), (4, 3)]
    same = examples("ipo", feedback([1.0, 0.0, -1.0, 1.0, -1.0, NAN], [7, 7, 7, 8, 8, 8], pairs=[(4, 3)]))
    assert same.objective == "ipo" and same.items == found.items and same.sequences == found.sequences


def test_dpo_examples_none_without_differently_rated_candidates_on_one_page():
    assert examples("dpo", feedback([1.0, 1.0, 2.0], [1, 1, 2])) is None  # page 1 equal, page 2 alone
    assert "rated above another of its page" in WAITING_FOR["dpo"]


def test_what_is_made_likelier_must_be_good():
    # page 1: 2.0 > 0.4 > -1.0; page 2: 0.6 > 0.2 > -0.5 (no candidate good at 1.0); page 3: a pick of -0.3
    scores, pages = [2.0, 0.4, -1.0, 0.6, 0.2, -0.5, -0.3, 0.1], [1, 1, 1, 2, 2, 2, 3, 3]
    dpo = examples("dpo", feedback(scores, pages, pairs=[(6, 7)]), good=1.0)
    # rating pairs only with the good 2.0 chosen; the pick stands although it is not good
    assert [r for _, r in dpo.sequences] == [[1], [2], [3], [7], [8]] and dpo.items == [(0, 1), (0, 2), (3, 4)]
    raft = examples("raft", feedback(scores, pages), good=1.0)
    assert [r for _, r in raft.sequences] == [[1]]  # page 2's 0.6 is above its page's mean but not good
    kto = examples("kto", feedback(scores, pages), good=1.0)
    # desirable: 2.0 only; undesirable: every score below 0; 0.4, 0.6, 0.2, 0.1 are left out
    assert [r for _, r in kto.sequences[:4]] == [[1], [3], [6], [7]] and kto.desirable == [True, False, False, False]
    assert examples("raft", feedback([0.6, 0.2, -0.8], [1, 1, 1]), good=1.0) is None


def test_raft_keeps_candidates_above_their_page_mean_with_tokens():
    found = examples("raft", feedback([2.0, 0.0, 1.0, 0.5, 0.5, 3.0, -3.0], [1, 1, 1, 2, 2, 3, 3], empty={5}))
    # page 1 mean 1: row 0 only; page 2 equal: none; page 3: row 5 is above but has no tokens
    assert [r for _, r in found.sequences] == [[1]] and found.items == [(0,)]
    assert examples("raft", feedback([0.5, 0.5], [1, 1])) is None


def test_kto_labels_by_the_sign_of_the_normalised_score_and_pairs_other_prompts():
    found = examples("kto", feedback([0.7, -0.2, 0.0, NAN, -1.0, 0.3], [1, 1, 1, 1, 2, 2]))
    # rows 0, 1, 4, 5 (row 2 is exactly at its rater's mean, row 3 unrated); prompts: 1, 1, 2, 2
    assert found.desirable == [True, False, False, True]
    assert found.items == [(0, 4), (1, 5), (2, 6), (3, 7)]
    own, mismatched = found.sequences[:4], found.sequences[4:]
    assert [r for _, r in own] == [[1], [2], [5], [6]]
    for (prompt, _), (other_prompt, response) in zip(own, mismatched):
        assert other_prompt == prompt and (prompt, response) not in own  # another prompt's response
    assert examples("kto", feedback([0.7, -0.2, 0.5], [1, 1, 2], prompts=["a", "a", "b"])) is None  # "a" > half


# ------------------------------------------------------------------------------ rounds

def page_logprobs(worker, rows):
    """Return ((N,) policy, (N,) base) sequence log-probabilities of `rows` of the store's feedback."""
    from ppo_feedback.direct import Examples
    from ppo_feedback.feedback import read_feedback

    fb = read_feedback(worker.store)
    found = Examples("raft", [(fb.prompts[r], list(fb.generations[r].token_ids)) for r in rows], [])
    layout = worker.direct.layout(found)
    with torch.no_grad():
        T = worker.trainer.config.sampling.temperature
        mine = worker.policy(layout.query_response, layout.attention_mask, layout.context_length, T).logprobs
        base = worker.policy.reference(layout.query_response, layout.attention_mask, layout.context_length, T).logprobs
    return sequence_logprobs(mine, layout.response_mask), sequence_logprobs(base, layout.response_mask)


@pytest.mark.parametrize("objective", ["dpo", "ipo", "raft", "kto"])
def test_direct_round_publishes_a_policy_that_prefers_the_better_rated(tmp_path, tiny_model_dir, rated_store,
                                                                      objective):
    from ppo_feedback.feedback import read_feedback

    # rated_store's better candidates are normalised to +0.75 (4 ratings a rater, shrunk to the global mean)
    worker = make_worker(tmp_path, tiny_model_dir, rated_store,
                         objective=plain(objective, good_score=0.5, direct_epochs=4))
    assert worker.run_round() == 1
    version = rated_store.get_version(1)
    assert version.status == "published"
    assert f"loss/{objective}" in version.metrics and "objective/kl" in version.metrics
    assert not any(name.startswith("reward_model/") for name in version.metrics)  # no reward model fitted
    points = {p.name: p for p in rated_store.metrics(1)}
    assert points["objective/kl"].iteration == 1 and math.isfinite(points["objective/scores"].value)
    kl = points["objective/kl"].value  # k1 on 4 fresh samples: an estimate, either sign; 0 only if nothing moved
    assert math.isfinite(kl) and kl != 0.0 and version.metrics["objective/kl"] == kl
    fb = read_feedback(rated_store)
    better = [rows[int(fb.scores[rows].argmax())] for rows in fb.rated_pages().values()]
    worse = [rows[int(fb.scores[rows].argmin())] for rows in fb.rated_pages().values()]
    mine_b, base_b = page_logprobs(worker, better)
    mine_w, base_w = page_logprobs(worker, worse)
    gain = (mine_b - base_b) - (mine_w - base_w)  # (pages,) how much likelier the better one became, relatively
    assert bool((gain > 0).all()), gain  # on every page


def test_the_default_objective_trains_a_direct_round_from_the_base(tmp_path, tiny_model_dir, rated_store):
    defaults = ObjectiveConfig(good_score=0.5)  # rated_store's better candidates sit at +0.75
    assert defaults.direct and defaults.direct_from_base and defaults.direct_max_steps is not None
    assert defaults.direct_max_perplexity_ratio is not None
    worker = make_worker(tmp_path, tiny_model_dir, rated_store, objective=defaults)
    assert worker.run_round() == 1
    metrics = rated_store.get_version(1).metrics
    assert f"loss/{defaults.objective}" in metrics and metrics["direct/from_base"] == 1.0
    assert not any(name.startswith("reward_model/") for name in metrics)


def test_rpo_holds_up_the_chosen_candidates_likelihood_more_than_dpo(tmp_path, tiny_model_dir, rated_store):
    from db.records import Cursor
    from ppo_feedback.feedback import read_feedback

    worker = make_worker(tmp_path, tiny_model_dir, rated_store,
                         objective=plain("dpo", good_score=0.5, direct_epochs=4))
    plan, start = worker.prepare(Cursor()), worker.snapshot()
    fb = read_feedback(rated_store)
    chosen = [rows[int(fb.scores[rows].argmax())] for rows in fb.rated_pages().values()]
    gain, stats = {}, {}
    for alpha in (0.0, 1.0):  # the same round from the same start, without and with the NLL term
        worker.restore(start)
        worker.direct.config = replace(worker.direct.config, rpo_alpha=alpha)
        stats[alpha] = worker.train(plan)
        mine, base = page_logprobs(worker, chosen)
        gain[alpha] = mine - base
    assert "loss/nll" not in stats[0.0] and stats[1.0]["loss/nll"] > 0
    assert stats[1.0]["loss/dpo"] > stats[1.0]["loss/nll"]  # the round's loss holds both terms
    assert bool((gain[1.0] > gain[0.0]).all()), gain  # every chosen candidate became likelier with RPO


def test_direct_round_stops_its_passes_once_fresh_samples_pass_the_target_kl(tmp_path, tiny_model_dir, rated_store):
    from db.records import Cursor
    from ppo_feedback.direct import KL_CHECK_STEPS

    worker = make_worker(tmp_path, tiny_model_dir, rated_store,
                         objective=plain("dpo", good_score=0.5, direct_epochs=8))
    plan, start = worker.prepare(Cursor()), worker.snapshot()
    assert len(plan.examples) <= worker.direct.config.direct_batch_size  # a pass is one step
    full = worker.train(plan)
    trained = [p.detach().clone() for p in worker.policy.trainable_parameters()]
    assert full["direct/passes"] == 8
    worker.restore(start)
    worker.direct.config = replace(worker.direct.config, direct_target_kl=abs(full["objective/kl"]) / 1e6)
    stopped = worker.train(plan)
    assert stopped["direct/passes"] == KL_CHECK_STEPS  # measured after 4 steps (not after every pass), above
    assert stopped["objective/kl"] > worker.direct.config.direct_target_kl
    worker.restore(start)
    measured = []
    real_drift = worker.direct.drift
    worker.direct.drift = lambda prompts: measured.append(real_drift(prompts)) or measured[-1]
    worker.direct.config = replace(worker.direct.config, direct_target_kl=1e9)  # never reached: every pass runs
    assert worker.train(plan)["direct/passes"] == 8 and len(measured) == 2  # after steps 4 and 8
    assert all(torch.equal(a, b) for a, b in zip(trained, worker.policy.trainable_parameters()))  # the same passes


def test_direct_round_measures_the_kl_inside_a_long_pass_and_stops_there(tmp_path, tiny_model_dir, rated_store,
                                                                          monkeypatch):
    from db.records import Cursor
    from ppo_feedback import direct

    monkeypatch.setattr(direct, "KL_CHECK_STEPS", 2)
    worker = make_worker(tmp_path, tiny_model_dir, rated_store,
                         objective=plain("dpo", good_score=0.5, direct_batch_size=1))
    plan, start = worker.prepare(Cursor()), worker.snapshot()
    assert len(plan.examples) > direct.KL_CHECK_STEPS  # one pass is more steps than between two measurements
    measured = []
    real_drift = worker.direct.drift
    worker.direct.drift = lambda prompts: measured.append(real_drift(prompts)) or measured[-1]
    full = worker.train(plan)
    assert full["direct/steps"] == 2 * len(plan.examples) and len(measured) == 1  # no target: once, at the end
    worker.restore(start)
    measured.clear()
    worker.direct.config = replace(worker.direct.config, direct_target_kl=1e-9)
    stopped = worker.train(plan)
    assert stopped["direct/steps"] == direct.KL_CHECK_STEPS and stopped["direct/passes"] == 1 and len(measured) == 1


def test_excess_surprisal_by_hand_on_two_tokens():
    from ppo_feedback.direct import excess_surprisal

    base = torch.tensor([math.log(3.0), 0.0])  # p_base = (0.75, 0.25), entropy 0.5623
    h_base = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    uniform = excess_surprisal(torch.zeros(2), base)  # 0.5·(−log 0.75) + 0.5·(−log 0.25) − H
    assert float(uniform) == pytest.approx(-0.5 * math.log(0.75 * 0.25) - h_base, abs=1e-6)
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert float(uniform) == pytest.approx(kl + math.log(2) - h_base, abs=1e-6)  # KL + H(π) − H(p_base)
    sharp = excess_surprisal(torch.tensor([30.0, -30.0]), base)  # all on the base's likely token: below 0
    assert float(sharp) == pytest.approx(-math.log(0.75) - h_base, abs=1e-6) and float(sharp) < 0
    assert float(excess_surprisal(base + 5.0, base)) == pytest.approx(0.0, abs=1e-6)  # the base itself


def test_expected_surprisal_by_hand_on_two_tokens():
    from ppo_feedback.direct import expected_surprisal

    base = torch.tensor([math.log(3.0), 0.0])  # p_base = (0.75, 0.25)
    assert float(expected_surprisal(torch.zeros(2), base)) == pytest.approx(-0.5 * math.log(0.75 * 0.25), abs=1e-6)
    assert float(expected_surprisal(torch.tensor([-30.0, 30.0]), base)) == pytest.approx(-math.log(0.25), abs=1e-6)
    h_base = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert float(expected_surprisal(base, base)) == pytest.approx(h_base, abs=1e-6)  # the base: its entropy


def test_drift_is_the_kl_and_the_excess_surprisal_of_fresh_samples_by_hand():
    from ppo_feedback.direct import DirectTrainer, excess_surprisal

    fresh = SimpleNamespace(query_response=torch.zeros(2, 5, dtype=torch.long), attention_mask=None,
                            context_length=2, response_mask=torch.tensor([[1.0, 1, 1], [1, 1, 0]]),
                            logprobs=torch.tensor([[-0.5, -1, -1], [-1, -1, -5]]))
    sampled = torch.tensor([[-1.0, -2, -3], [-2, -2, -9]])  # the base's log-probability of each sampled token 0
    base_logits = torch.cat([sampled.unsqueeze(-1), torch.log((1 - sampled.exp()) / 5).unsqueeze(-1).expand(2, 3, 5)],
                            dim=-1)  # the other 5 tokens share the rest
    policy_logits = torch.randn(2, 3, 6)
    policy = SimpleNamespace(
        samples_exactly=True,
        response_logits=lambda qr, attn, P, reference=False: base_logits if reference else policy_logits)
    ppo = SimpleNamespace(policy=policy, config=SimpleNamespace(sampling=SimpleNamespace(temperature=1.0)),
                          team=SimpleNamespace(mean=float), rollout=lambda prompts: fresh)
    drift = DirectTrainer(ppo, plain("dpo")).drift(["a", "b"])  # measured with or without the bound
    assert (drift.kl, drift.length) == (2.75, 2.5)  # KL (3.5 + 2) / 2, the -5 - -9 masked out
    excess = excess_surprisal(policy_logits, base_logits)
    by_hand = (excess[0].sum() + excess[1, :2].sum()) / 5  # the 5 response tokens, not the padding
    assert drift.perplexity_ratio == pytest.approx(math.exp(float(by_hand)), rel=1e-6)


def test_drift_perplexity_ratio_is_one_for_the_base_and_moves_with_training(tmp_path, tiny_model_dir,
                                                                              rated_store):
    from db.records import Cursor

    worker = make_worker(tmp_path, tiny_model_dir, rated_store, objective=plain("dpo", good_score=0.5))
    assert worker.direct.drift(worker.pick_prompts()).perplexity_ratio == pytest.approx(1.0, abs=1e-5)
    stats = worker.train(worker.prepare(Cursor()))
    assert abs(stats["objective/perplexity_ratio"] - 1.0) > 1e-4  # the policy's own next tokens now


def test_direct_round_stops_once_its_text_loses_fluency_and_records_the_ratio(tmp_path, tiny_model_dir,
                                                                               rated_store):
    from db.records import Cursor
    from ppo_feedback.direct import KL_CHECK_STEPS, Drift

    worker = make_worker(tmp_path, tiny_model_dir, rated_store,
                         objective=plain("dpo", good_score=0.5, direct_batch_size=1, direct_epochs=4,
                                         direct_max_perplexity_ratio=1.3))
    plan, start = worker.prepare(Cursor()), worker.snapshot()
    assert 4 * len(plan.examples) > 2 * KL_CHECK_STEPS
    steps, measured = [], []
    real_optimize = worker.trainer.optimize
    worker.trainer.optimize = lambda loss: steps.append(1) or real_optimize(loss)
    worker.direct.drift = lambda prompts: measured.append(len(steps)) or Drift(50.0, 8.0, 1.2)
    fluent = worker.train(plan)  # no KL target: measured every KL_CHECK_STEPS steps; 1.2 is within the bound
    assert fluent["direct/steps"] == 4 * len(plan.examples) and fluent["objective/perplexity_ratio"] == 1.2
    assert measured == list(range(KL_CHECK_STEPS, len(steps), KL_CHECK_STEPS)) + [len(steps)]
    worker.restore(start)
    steps.clear()
    worker.direct.drift = lambda prompts: Drift(0.1, 8.0, 1.31)
    stopped = worker.train(plan)
    assert stopped["direct/steps"] == KL_CHECK_STEPS and stopped["objective/perplexity_ratio"] == 1.31
    real = type(worker.direct).drift(worker.direct, worker.pick_prompts())  # the model's own, end to end
    assert 0 < real.perplexity_ratio < math.inf and real.length > 0
    with pytest.raises(ValueError, match="--direct-max-perplexity-ratio"):
        ObjectiveConfig(objective="dpo", direct_max_perplexity_ratio=math.inf).validate()
    with pytest.raises(ValueError, match="--direct-max-perplexity-ratio"):
        ObjectiveConfig(objective="dpo", direct_max_perplexity_ratio=0.0).validate()


def test_next_kl_check_comes_where_the_kls_growth_reaches_the_target():
    from ppo_feedback.direct import MAX_CHECK_GAP, next_kl_check

    assert MAX_CHECK_GAP == 8
    assert next_kl_check(4, 2.0, 0, 0.0, 8.0) == 12  # 0.5 a step: the target 12 steps on, at most 8
    assert next_kl_check(12, 6.0, 4, 2.0, 8.0) == 16  # still 0.5 a step: 2 nats are 4 steps
    assert next_kl_check(16, 7.9, 12, 6.0, 8.0) == 17  # near the target: the very next step
    assert next_kl_check(8, 1.0, 4, 3.0, 8.0) == 16  # fell by noise, 1/8 a step since the start: the longest gap
    assert next_kl_check(17, 7.85, 16, 7.9, 8.0) == 18  # fell by noise near the target: the round's rate, 1 on
    assert next_kl_check(6, 7.2, 4, 3.2, 8.0) == 7  # speeding up (2 a step since the last): the next step
    assert next_kl_check(4, 8.0, 0, 0.0, 8.0) == 5  # at the target, not above it: one step on


def test_direct_round_measures_the_kl_sparsely_far_from_the_target_and_stops_soon_after_it(
        tmp_path, tiny_model_dir, rated_store):
    from db.records import Cursor

    worker = make_worker(tmp_path, tiny_model_dir, rated_store,
                         objective=plain("dpo", good_score=0.5, direct_batch_size=1, direct_epochs=40,
                                         direct_target_kl=8.0))
    plan = worker.prepare(Cursor())
    steps, measured = [], []
    real_optimize = worker.trainer.optimize
    worker.trainer.optimize = lambda loss: steps.append(1) or real_optimize(loss)
    worker.direct.drift = lambda prompts: measured.append(len(steps)) or Drift(0.5 * len(steps), 8.0, 1.0)  # 0.5 a step
    stats = worker.train(plan)
    assert 40 * len(plan.examples) > 17  # the passes alone would run longer
    assert measured == [4, 12, 16, 17] and stats["direct/steps"] == 17  # every 4 steps: 4, 8, ..., 20 (KL 10)
    assert stats["objective/kl"] == 8.5


def test_direct_round_stops_at_its_step_budget(tmp_path, tiny_model_dir, rated_store):
    from db.records import Cursor

    worker = make_worker(tmp_path, tiny_model_dir, rated_store,
                         objective=plain("dpo", good_score=0.5, direct_batch_size=1,
                                                   direct_max_steps=3))
    plan = worker.prepare(Cursor())
    assert 2 * len(plan.examples) > 3  # two passes would be more steps than the budget
    measured = []
    real_drift = worker.direct.drift
    worker.direct.drift = lambda prompts: measured.append(real_drift(prompts)) or measured[-1]
    stats = worker.train(plan)
    assert stats["direct/steps"] == 3 and len(measured) == 1 and stats["objective/kl"] == measured[0].kl
    with pytest.raises(ValueError, match="--direct-max-steps"):
        ObjectiveConfig(objective="dpo", direct_max_steps=0).validate()


def test_schedule_trains_the_least_trained_items_first(tmp_path, tiny_model_dir, rated_store):
    from ppo_feedback.direct import Examples

    worker = make_worker(tmp_path, tiny_model_dir, rated_store,
                         objective=plain("dpo", direct_batch_size=2, direct_epochs=2))
    trainer = worker.direct
    found = Examples("dpo", [("p", [j]) for j in range(12)], [(2 * i, 2 * i + 1) for i in range(6)])
    fresh = trainer.schedule(found, torch.Generator().manual_seed(0))
    assert [level for level, _ in fresh] == [0, 0, 0, 1, 1, 1]  # a fresh adapter: two shuffled passes
    for level in (0, 1):
        assert sorted(i for lv, batch in fresh if lv == level for i in batch) == list(range(6))
    trainer.seen = {found.key(i): 2 for i in range(4)}  # items 0-3 trained on twice by earlier rounds
    continuing = trainer.schedule(found, torch.Generator().manual_seed(0))
    assert len(continuing) == 6  # the same number of steps
    assert [sorted(batch) for _, batch in continuing[:2]] == [[4, 5], [4, 5]]  # the new items catch up first
    assert sorted(i for _, batch in continuing[2:5] for i in batch) == list(range(6))  # then all, once each
    trainer.seen = {found.key(0): 1}
    assert found.key(0) == (("p", (0,)), ("p", (1,)))
    worker.load_version(0)  # the adapter replaced: what it was trained on is forgotten
    assert trainer.seen == {}


def test_schedule_keeps_each_pages_items_together(tmp_path, tiny_model_dir, rated_store):
    from ppo_feedback.direct import Examples

    worker = make_worker(tmp_path, tiny_model_dir, rated_store,
                         objective=plain("dpo", direct_batch_size=3, direct_epochs=3))
    pages = [7, 3, 7, 9, 3, 7, 9, 1, 3, 7]
    found = Examples("dpo", [("p", [j]) for j in range(20)], [(2 * i, 2 * i + 1) for i in range(10)], pages=pages)
    batches = worker.direct.schedule(found, torch.Generator().manual_seed(0))
    orders = []
    for level in range(3):
        order = [i for lv, batch in batches if lv == level for i in batch]
        assert sorted(order) == list(range(10))  # every item once a pass
        runs = [pages[i] for k, i in enumerate(order) if k == 0 or pages[order[k - 1]] != pages[i]]
        assert len(runs) == len(set(pages))  # each page's items in one run
        orders.append(order)
    assert len({tuple(o) for o in orders}) > 1  # shuffled afresh each pass
    assert sorted(len(batch) for _, batch in batches[:4]) == [2, 2, 3, 3]  # 10 items in 4: no remainder of 1
    unpaged = worker.direct.schedule(replace(found, pages=None), torch.Generator().manual_seed(0))
    first = len(unpaged[0][1])
    assert unpaged[0][1] == torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()[:first]


def test_examples_know_the_page_each_item_was_judged_on():
    page_ids = [4, 4, 4, 8, 8, 8, 9, 9]
    fb = feedback([2.0, 0.0, -1.0, 1.5, NAN, -1.0, 1.0, -1.0], page_ids)
    for objective in ("dpo", "raft", "kto"):
        found = examples(objective, fb)
        rows = [found.sequences[item[0]][1][0] - 1 for item in found.items]  # row i's response is [i + 1]
        assert found.pages == [page_ids[r] for r in rows] and set(found.pages) == {4, 8, 9}, objective


def test_a_minibatch_computes_a_repeated_sequence_once(tmp_path, tiny_model_dir, rated_store):
    from db.records import Cursor

    worker = make_worker(tmp_path, tiny_model_dir, rated_store,
                         objective=plain("dpo", good_score=0.5))
    trainer = worker.direct
    layout = trainer.layout(worker.prepare(Cursor()).examples)
    rows, forwarded = [0, 1, 0, 2, 1], []
    real = trainer.policy.forward
    trainer.policy.forward = lambda qr, *a, **kw: forwarded.append(len(qr)) or real(qr, *a, **kw)
    once = trainer.sequence_logprobs(layout, rows)
    assert forwarded == [3]  # rows 0, 1 and 2, each once
    trainer.policy.forward = real
    separately = torch.stack([trainer.sequence_logprobs(layout, [r])[0] for r in rows])
    assert torch.allclose(once, separately, atol=1e-5)
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    params = [p for p in trainer.policy.trainable_parameters() if p.requires_grad]
    grads_once = torch.autograd.grad((once * weights).sum(), params, allow_unused=True)
    grads_apart = torch.autograd.grad((separately * weights).sum(), params, allow_unused=True)
    for a, b in zip(grads_once, grads_apart):
        if a is not None or b is not None:
            assert torch.allclose(a, b, atol=1e-5)  # a repeated row's gradient accumulates


def test_a_round_counts_only_the_minibatches_it_trained_on(tmp_path, tiny_model_dir, rated_store):
    from db.records import Cursor
    from ppo_feedback.direct import KL_CHECK_STEPS

    worker = make_worker(tmp_path, tiny_model_dir, rated_store,
                         objective=plain("dpo", good_score=0.5, direct_batch_size=1,
                                                   direct_target_kl=1e-9))
    plan, start = worker.prepare(Cursor()), worker.snapshot()
    worker.direct.drift = lambda prompts: Drift(1.0, 8.0, 1.0)  # above the target at the first measurement
    stats = worker.train(plan)
    assert stats["direct/steps"] == KL_CHECK_STEPS and sum(worker.direct.seen.values()) == KL_CHECK_STEPS
    worker.restore(start)  # a discarded round: its counts go too
    assert worker.direct.seen == {}


def test_reference_logprobs_are_computed_once_per_sequence_across_rounds(tmp_path, tiny_model_dir, rated_store):
    from db.records import Cursor

    worker = make_worker(tmp_path, tiny_model_dir, rated_store,
                         objective=plain("dpo", good_score=0.5))
    plan, trainer = worker.prepare(Cursor()), worker.direct
    layout = trainer.layout(plan.examples)
    fresh = trainer.sequence_logprobs(layout, range(len(plan.examples.sequences)), reference=True)
    rows = []
    real = trainer.sequence_logprobs
    trainer.sequence_logprobs = lambda layout, r, **kw: (rows.extend(r) if kw.get("reference") else None) or \
        real(layout, r, **kw)
    worker.train(plan)
    assert sorted(rows) == list(range(len(plan.examples.sequences)))  # the first round: every sequence once
    rows.clear()
    worker.train(plan)  # trains the adapter, so a policy forward would now differ from the reference
    assert rows == []  # the base did not change: nothing recomputed
    cached = trainer.reference_logprobs(plan.examples, layout)
    assert torch.allclose(cached, fresh, atol=1e-5)


def test_direct_from_base_fits_every_round_afresh_from_the_base(tmp_path, tiny_model_dir, rated_store):
    from db.records import Cursor

    trained = {}
    for from_base in (False, True):
        worker = make_worker(tmp_path / str(from_base), tiny_model_dir, rated_store,
                             objective=plain("dpo", good_score=0.5, direct_from_base=from_base))
        plan, iteration = worker.prepare(Cursor()), worker.trainer.iteration
        rounds = []
        for _ in range(2):  # the same round twice, the second starting where the first ended
            worker.trainer.iteration = iteration  # the same shuffle
            worker.train(plan)
            rounds.append([p.detach().clone() for p in worker.policy.trainable_parameters()])
        trained[from_base] = rounds
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b))  # noqa: E731
    assert same(*trained[True])  # from the base each time: the second round is the first again
    assert not same(*trained[False])  # continuing: the second round moved on from the first


def test_from_the_base_a_round_continues_once_its_step_budget_cannot_hold_two_passes(tmp_path, tiny_model_dir,
                                                                                  rated_store):
    from db.records import Cursor
    from ppo_feedback.direct import MIN_REFIT_PASSES

    worker = make_worker(tmp_path, tiny_model_dir, rated_store,
                         objective=plain("dpo", good_score=0.5, direct_from_base=True,
                                                   direct_batch_size=1, direct_epochs=4))
    plan, iteration = worker.prepare(Cursor()), worker.trainer.iteration
    n = len(plan.examples)
    assert n >= 2 and MIN_REFIT_PASSES == 2
    for budget, refit in ((2 * n, True), (2 * n - 1, False)):  # two passes of n one-example minibatches
        worker.objective.direct_max_steps = budget
        rounds, flags = [], []
        for _ in range(2):  # the same round twice, the second starting where the first ended
            worker.trainer.iteration = iteration  # the same shuffle
            flags.append(worker.train(plan)["direct/from_base"])
            rounds.append([p.detach().clone() for p in worker.policy.trainable_parameters()])
        assert flags == [float(refit)] * 2
        assert all(torch.equal(a, b) for a, b in zip(*rounds)) == refit  # a refit repeats itself exactly
    worker.loaded_version = 3  # as if version 3 were loaded: a discarded refit round puts that back
    start = worker.snapshot()
    worker.objective.direct_max_steps = 2 * n
    worker.train(plan)
    assert worker.loaded_version == 0  # the base, loaded for the refit
    worker.restore(start)
    assert worker.loaded_version == 3
    worker.objective.direct_epochs, worker.objective.direct_max_steps = 1, n  # one pass asked: one must fit
    assert worker.direct.refits(n) and not worker.direct.refits(n + 1)
    worker.objective.direct_from_base = False
    assert not worker.direct.refits(1)


def test_a_continuing_round_first_shrinks_the_adapter_toward_the_base(tmp_path, tiny_model_dir, rated_store):
    from db.records import Cursor

    worker = make_worker(tmp_path, tiny_model_dir, rated_store,
                         objective=plain("dpo", good_score=0.5, direct_shrink=0.25))
    plan = worker.prepare(Cursor())
    worker.train(plan)
    after_first = {n: p.detach().clone() for n, p in worker.policy.named_parameters() if "lora" in n}
    at_start = {}
    real_step = worker.direct.step
    worker.direct.step = lambda *a: at_start.update(
        {n: p.detach().clone() for n, p in worker.policy.named_parameters() if "lora" in n}) or real_step(*a)
    worker.train(plan)
    assert any(after_first[n].abs().sum() > 0 for n in after_first if "lora_B" in n)
    for name, value in after_first.items():  # B scaled by the factor, A as it was
        assert torch.allclose(at_start[name], value * (0.25 if "lora_B" in name else 1.0)), name
    with pytest.raises(ValueError, match="--direct-shrink"):
        ObjectiveConfig(objective="dpo", direct_shrink=0.0).validate()


def test_direct_round_with_a_non_finite_loss_is_discarded(tmp_path, tiny_model_dir, rated_store):
    worker = make_worker(tmp_path, tiny_model_dir, rated_store,
                         objective=plain("dpo", good_score=0.5))
    before = [p.detach().clone() for p in worker.policy.trainable_parameters()]
    real_loss = worker.direct.loss
    worker.direct.loss = lambda *a: (real_loss(*a)[0] * math.nan, {})
    assert worker.run_round() is None
    assert rated_store.get_version(1).status == "failed" and "non-finite" in str(rated_store.get_version(1).metrics)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, worker.policy.trainable_parameters()))


def test_direct_round_waits_when_no_page_tells_candidates_apart(tmp_path, tiny_model_dir, tiny_loaded):
    from db import FeedbackStore, NewGeneration
    from ppo_feedback.generation import generate
    from test_worker import PROMPTS

    store = FeedbackStore(tmp_path / "feedback.db")
    for pid, text in zip(store.add_prompts(PROMPTS), PROMPTS):
        candidates = generate(tiny_loaded.model, tiny_loaded.tokenizer, text, n=2, max_new_tokens=8, seed=pid)
        for g in store.record_generations(pid, 0, [NewGeneration(c.text, c.token_ids, c.logprobs, {})
                                                   for c in candidates]):
            store.rate(g.id, "ann", 3)  # every page's candidates rated alike: no pair, nothing above a mean
    for objective in ("dpo", "raft"):
        worker = make_worker(tmp_path, tiny_model_dir, store, objective=plain(objective))
        assert worker.run_round() is None
        assert store.worker_status().state == f"waiting for {WAITING_FOR[objective]}"
        store.release_lease(worker.holder)
    assert store.list_versions() == []
    store.close()


def test_direct_round_waits_for_new_examples_not_only_new_ratings(tmp_path, tiny_model_dir, rated_store):
    from db import NewGeneration

    def page(prompt_id, scores, rater="ann"):
        gens = rated_store.record_generations(prompt_id, 1, [NewGeneration(f"text {k}", [k + 5], [-1.0], {})
                                                           for k in range(len(scores))])
        for g, score in zip(gens, scores):
            rated_store.rate(g.id, rater, score)

    worker = make_worker(tmp_path, tiny_model_dir, rated_store,
                         objective=plain("dpo", good_score=0.5), min_new_feedback=4)
    assert worker.run_round() == 1
    prompt_id = rated_store.list_prompts()[0].id
    page(prompt_id, [4, 4])
    page(prompt_id, [2, 2], rater="bob")  # 4 new ratings, each page rated alike: no new pair
    assert worker.run_round() is None
    assert worker.store.worker_status().state == f"waiting for new examples: v1 was trained on all the feedback " \
                                                 f"gives ({WAITING_FOR['dpo']})"
    page(prompt_id, [5, 1, 1, 1])  # a new pair
    assert worker.run_round() == 2


@pytest.mark.slow  # a real worker process
def test_worker_process_trains_raft_from_the_command_line(tmp_path, tiny_model_dir, rated_store):
    from test_worker import start, wait_for, worker_cmd

    proc = start(worker_cmd(tmp_path, tiny_model_dir, "--min-new-feedback", "8", "--objective", "raft",
                            "--good-score", "0.5"), tmp_path / "worker.log")
    try:
        wait_for(lambda: rated_store.serving_version() >= 1, 240, proc, "version 1")
        metrics = rated_store.get_version(1).metrics
        assert "loss/raft" in metrics and "objective/kl" in metrics and "reward_model/n_examples" not in metrics
    finally:
        proc.terminate()
        proc.wait(30)
