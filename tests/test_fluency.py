"""The fluency gate (`--max-perplexity-ratio`): the base's perplexity of a version's text against its own."""
from __future__ import annotations

import math

import pytest
import torch

from db.records import Cursor
from ppo_feedback.config import LoraSettings, ModelConfig, RolloutSampling
from ppo_feedback.fluency import ROWS_PER_FORWARD, FluencyGate
from test_adapters import perturb
from test_worker import make_worker, rated_store  # noqa: F401  (a fixture)

PROMPTS = ["a", "b c", "d e f", "g"]


@pytest.fixture()
def trainer(tiny_model_dir):
    from ppo_feedback.modeling import add_lora, load_model
    from ppo_feedback.policy import PolicyWithValueHead
    from ppo_feedback.trainer import PPOConfig, PPOTrainer

    loaded = load_model(ModelConfig(model=str(tiny_model_dir), device="cpu"))
    policy = PolicyWithValueHead(add_lora(loaded.model, LoraSettings()), loaded.tokenizer)
    return PPOTrainer(policy, PPOConfig(batch_size=4, mini_batch_size=4, sampling=RolloutSampling(max_new_tokens=8)))


def test_the_base_reads_exactly_one_against_its_own_samples(trainer):
    gate = FluencyGate(trainer, reference_samples=1)
    assert trainer.rollout_seed() == trainer.config.seed  # the policy's samples are the base's reference ones
    assert gate.ratio(sorted(PROMPTS)) == pytest.approx(1.0, abs=1e-6)


def test_a_trained_policy_reads_its_expected_surprisal_less_the_bases_own_rate_per_prompt(trainer):
    with torch.no_grad():
        perturb(trainer.policy, 3)
    gate = FluencyGate(trainer, reference_samples=3)
    assert 3 * 3 > ROWS_PER_FORWARD  # the references take two forwards
    drawn = []
    real_reference = trainer.reference_rollout
    trainer.reference_rollout = lambda rows: drawn.append(list(rows)) or real_reference(rows)
    prompts = ["g", "a", "g", "b c"]
    ratio = gate.ratio(prompts)
    assert drawn == [["a"] * 3 + ["b c"] * 3 + ["g"] * 3]  # each new prompt 3 times, once

    policy = trainer.policy

    def by_hand(rollout, own):  # (B,) sums of Σ_x q(x)·(−log p_base(x)) over response tokens, (B,) counts
        qr, attn, P, mask = rollout.query_response, rollout.attention_mask, rollout.context_length, \
            rollout.response_mask
        base = torch.log_softmax(policy.response_logits(qr, attn, P, reference=True), -1)
        q = base.exp() if own else torch.softmax(policy.response_logits(qr, attn, P), -1)
        return (-(q * base).sum(-1) * mask).sum(1), mask.sum(1)

    entropy, counts = by_hand(real_reference(drawn[0]), own=True)
    rate = {p: float(entropy[3 * i:3 * i + 3].sum() / counts[3 * i:3 * i + 3].sum())
            for i, p in enumerate(["a", "b c", "g"])}
    trainer.iteration = 0  # the same seed as the gate's own draw
    surprisal, tokens = by_hand(trainer.rollout(prompts), own=False)
    expected = sum(float(s) - rate[p] * float(m) for p, s, m in zip(prompts, surprisal, tokens)) / float(tokens.sum())
    assert ratio == pytest.approx(math.exp(expected), rel=1e-5)
    assert abs(ratio - 1.0) > 1e-3  # the policy's own next tokens now

    gate.ratio(["a", "g"])
    gate.ratio(["a", "d e f"])
    assert drawn[1:] == [["d e f"] * 3]  # the base never changes: only a new prompt is sampled
    with pytest.raises(ValueError):
        FluencyGate(trainer, reference_samples=0)


def test_a_version_past_the_gate_is_not_published_and_the_next_round_waits_for_new_feedback(
        tmp_path, tiny_model_dir, rated_store):
    from ppo_feedback.worker import WorkerConfig

    worker = make_worker(tmp_path, tiny_model_dir, rated_store, max_perplexity_ratio=1.2, fluency_samples=3)
    before = [p.detach().clone() for p in worker.policy.trainable_parameters()]
    measured = []
    worker.gate.ratio = lambda prompts: measured.append(list(prompts)) or 1.25
    assert worker.run_round() is None
    assert len(measured) == 3 and len(measured[0]) == 3 and measured[0] == measured[1] == measured[2]
    failed = rated_store.get_version(1)
    assert failed.status == "failed" and "not fluent" in str(failed.metrics) and "1.25" in str(failed.metrics)
    assert rated_store.serving_version() == 0
    assert all(torch.equal(a, b) for a, b in zip(before, worker.policy.trainable_parameters()))
    _, _, missing = worker.plan_round()
    assert missing.startswith("4 more ratings: the last version trained was not published") and "1.25" in missing

    for rater in ("cat", "dan"):  # 4 new ratings: --min-new-feedback since the refused round
        for generation_id, score in ((1, 4), (2, 1)):
            rated_store.rate(generation_id, rater, score)
    assert worker.plan_round()[2] is None
    worker.gate.ratio = lambda prompts: 1.15
    assert worker.run_round() == 2
    assert rated_store.get_version(2).metrics["objective/text_perplexity_ratio"] == 1.15
    assert worker.plan_round()[2] is not None and "not published" not in worker.plan_round()[2]
    with pytest.raises(ValueError, match="--max-perplexity-ratio"):
        WorkerConfig(max_perplexity_ratio=0.0).validate()
    with pytest.raises(ValueError, match="--fluency-samples"):
        WorkerConfig(fluency_samples=0).validate()


def test_a_version_past_the_gate_is_searched_back_toward_the_version_it_trained_from(tmp_path, tiny_model_dir,
                                                                                     rated_store):
    from ppo_feedback.adapters import AdapterState
    from ppo_feedback.worker import GATE_FRACTIONS

    worker = make_worker(tmp_path, tiny_model_dir, rated_store, max_perplexity_ratio=1.2, fluency_samples=3)
    assert GATE_FRACTIONS == (0.5, 0.25)
    weights, ratios = [], iter([1.4, 1.3, 1.1])  # trained: past; halfway: past; a quarter of the way: within

    def ratio(prompts):
        weights.append(AdapterState.capture(worker.policy))
        return next(ratios)

    worker.gate.ratio = ratio
    assert worker.run_round() == 1
    metrics = rated_store.get_version(1).metrics
    assert metrics["objective/text_perplexity_ratio"] == 1.1 and metrics["objective/gate_fraction"] == 0.25
    trained, halfway, quarter = weights
    worker.trained_from.interpolate(trained, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(halfway._saved.values(), AdapterState.capture(worker.policy)._saved.values()))
    worker.trained_from.interpolate(trained, 0.25)
    assert all(torch.equal(a, b) for a, b in zip(quarter._saved.values(), AdapterState.capture(worker.policy)._saved.values()))
    assert not all(torch.equal(a, b) for a, b in zip(quarter._saved.values(), trained._saved.values()))
    from ppo_feedback.adapters import apply_version

    worker.trained_from.restore()
    apply_version(worker.policy, tmp_path / "adapters", 1)  # the published files hold the quarter-way weights
    published = AdapterState.capture(worker.policy)._saved
    assert all(torch.allclose(published[name], quarter._saved[name]) for name in published if "lora_" in name)


def test_a_refit_from_the_base_past_the_gate_is_searched_back_toward_the_serving_version_not_the_base(
        tmp_path, tiny_model_dir, rated_store):
    from ppo_feedback.adapters import AdapterState
    from test_direct import plain

    worker = make_worker(tmp_path, tiny_model_dir, rated_store, max_perplexity_ratio=1.2, fluency_samples=3,
                         objective=plain("dpo", good_score=0.5, direct_from_base=True))
    plan = worker.prepare(Cursor())
    base = AdapterState.capture(worker.policy)  # version 0: the initial adapter
    worker.train(plan)
    serving = AdapterState.capture(worker.policy)  # as if this refit had been published and loaded
    worker.objective.direct_epochs = 1  # a refit again, from the base, to somewhere else
    stats = worker.train(plan)
    assert stats["direct/from_base"] == 1.0
    trained, measured, ratios = AdapterState.capture(worker.policy), [], iter([1.4, 1.1])

    def ratio(prompts):
        measured.append(AdapterState.capture(worker.policy))
        return next(ratios)

    worker.gate.ratio = ratio
    worker.check_fluency(plan, stats)
    assert stats["objective/gate_fraction"] == 0.5 and stats["objective/text_perplexity_ratio"] == 1.1
    halfway = measured[1]._saved
    for name, value in halfway.items():
        assert torch.equal(value, torch.lerp(serving._saved[name], trained._saved[name], 0.5)), name
    lora_b = [name for name in halfway if "lora_B" in name]
    assert not all(torch.equal(serving._saved[n], trained._saved[n]) for n in lora_b)  # the refit moved elsewhere
    assert not all(torch.allclose(halfway[n], torch.lerp(base._saved[n], trained._saved[n], 0.5)) for n in lora_b)


def test_a_version_whose_ratio_is_not_a_number_is_not_published(tmp_path, tiny_model_dir, rated_store):
    worker = make_worker(tmp_path, tiny_model_dir, rated_store, max_perplexity_ratio=1.2, fluency_samples=3)
    worker.gate.ratio = lambda prompts: math.nan
    assert worker.run_round() is None
    assert rated_store.get_version(1).status == "failed" and rated_store.serving_version() == 0
