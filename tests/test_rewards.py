"""Rewards from people: per-rater normalisation, the reward model's fit, calibration, files, features, store."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from db import Cursor, FeedbackStore, NewGeneration, VersionRecord
from ppo_feedback.config import LoraSettings, ModelConfig, RolloutSampling
from ppo_feedback.features import RewardFeatures, response_features
from ppo_feedback.feedback import normalize_ratings, read_feedback
from ppo_feedback.generation import first_eos_mask, generate, sample
from ppo_feedback.modeling import add_lora, load_model
from ppo_feedback.policy import PolicyWithValueHead
from ppo_feedback.rewards import DEFAULT_L2, L2_GRID, FitReport, RewardConfig, RewardModel, fit_reward_model
from ppo_feedback.trainer import PPOConfig, PPOTrainer

PROMPTS = ["The weather today is", "I love this pizza", "Once upon a time there was a little robot",
           "Machine learning"]


# ------------------------------------------------------------------------------ normalisation

def test_normalisation_matches_the_rule_worked_by_hand():
    # k = 1. Global mean 3, variance 8/3. Rater a: n=1, m=5, v=0 -> mu=(5+3)/2=4, var=(0+8/3)/2=4/3.
    # Rater b: n=2, m=2, v=1 -> mu=(4+3)/3=7/3, var=(2+8/3)/3=14/9.
    z = normalize_ratings([("a", 5), ("b", 1), ("b", 3)], prior_weight=1.0)
    expected = [1 / math.sqrt(4 / 3), (1 - 7 / 3) / math.sqrt(14 / 9), (3 - 7 / 3) / math.sqrt(14 / 9)]
    assert z == pytest.approx(expected, abs=1e-12)


def test_new_rater_with_one_rating_is_close_to_the_global_z_score():
    rng = random.Random(0)
    ratings = [(f"old{i % 3}", rng.randint(1, 5)) for i in range(300)] + [("new", 5)]
    scores = [s for _, s in ratings]
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    z_new = normalize_ratings(ratings)[-1]
    # k=5: mu = (5 + 5 mean)/6, sigma = std sqrt(5/6)  ->  z = sqrt(5/6) * global z
    assert z_new == pytest.approx(math.sqrt(5 / 6) * (5 - mean) / std, rel=1e-9)
    assert 0 < z_new < 2.5  # not the unbounded z of a one-rating z-score


scores_of_a_rater = st.lists(st.integers(1, 5), min_size=2, max_size=12).filter(lambda s: len(set(s)) > 1)


@settings(max_examples=60, deadline=None)
@given(a=scores_of_a_rater, b=st.lists(st.integers(1, 5), min_size=1, max_size=12),
       bias=st.floats(-3, 3), scale=st.floats(0.2, 4))
def test_without_shrinkage_a_raters_bias_and_scale_do_not_matter(a, b, bias, scale):
    ratings = [("a", s) for s in a] + [("b", s) for s in b]
    shifted = [("a", bias + scale * s) for s in a] + [("b", s) for s in b]
    before, after = normalize_ratings(ratings, 0.0), normalize_ratings(shifted, 0.0)
    assert after[:len(a)] == pytest.approx(before[:len(a)], abs=1e-9)


def test_with_shrinkage_a_bias_is_removed_once_the_rater_has_enough_ratings():
    rng = random.Random(1)

    def change_in_z(n: int) -> float:
        a = [rng.randint(1, 4) for _ in range(n)]
        others = [("b", rng.randint(1, 5)) for _ in range(50)]
        before = normalize_ratings([("a", s) for s in a] + others)[:n]
        after = normalize_ratings([("a", s + 1.0) for s in a] + others)[:n]
        return max(abs(x - y) for x, y in zip(before, after))

    assert change_in_z(200) < 0.05  # bound k|c|/((n+k) sigma_r) ~ 0.02..0.04
    assert change_in_z(3) > 0.3  # with 3 ratings the prior still holds most of the mean


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["ann", "bob", "cy"]), st.integers(1, 5)), min_size=1, max_size=20),
       st.randoms(use_true_random=False), st.floats(0, 10))
def test_order_of_ratings_does_not_matter(ratings, rnd, k):
    order = list(range(len(ratings)))
    rnd.shuffle(order)
    z = normalize_ratings(ratings, k)
    z_shuffled = normalize_ratings([ratings[i] for i in order], k)
    assert z_shuffled == pytest.approx([z[i] for i in order], abs=1e-9)
    assert all(math.isfinite(v) for v in z)


def test_identical_ratings_carry_no_deviation():
    assert normalize_ratings([("a", 3)] * 4 + [("b", 3)] * 2) == [0.0] * 6  # nobody spreads: all 0
    mixed = [("a", 4)] * 6 + [("b", 1), ("b", 5), ("b", 3)]
    assert normalize_ratings(mixed, 0.0)[:6] == [0.0] * 6  # own deviation 0, on the global scale
    # with the prior, a constant rater's z fades as their ratings pile up (and never divides by 0)
    few = normalize_ratings([("a", 5)] * 3 + [("b", 1), ("b", 3)])[0]
    many = normalize_ratings([("a", 5)] * 300 + [("b", 1), ("b", 3)])[0]
    assert math.isfinite(few) and 0 < many < few / 3


def test_a_strict_and_a_lenient_rater_with_one_taste_agree():
    taste = [1, 2, 2, 3, 4] * 20
    ratings = [("strict", s) for s in taste] + [("lenient", s + 1) for s in taste]
    exact = normalize_ratings(ratings, 0.0)
    assert exact[:100] == pytest.approx(exact[100:], abs=1e-9)
    assert exact[2] != exact[100 + 3]  # a strict 3 is not a lenient 3 (their taste's 2 and 3)
    z = normalize_ratings(ratings)  # k=5, n=100: each mean is pulled towards the other by 5/105 of 1
    assert z[:100] == pytest.approx(z[100:], abs=0.06)
    assert max(abs(x - y) for x, y in zip(z[:100], z[100:])) > 1e-3  # the prior does act


# ------------------------------------------------------------------------------ fitting on a synthetic taste

H = 64
RATER_BIAS, RATER_SPREAD = (-0.8, 0.0, 0.5, 0.9), (0.9, 1.2, 1.0, 0.7)


class Taste:
    """A hidden linear direction in an anisotropic feature space, rated by four raters with their own bias."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        self.scales = torch.logspace(0, -1, H, dtype=torch.float64)
        self.offset = 3 * torch.randn(H, generator=self.g, dtype=torch.float64)  # hidden states are not centred
        self.u = torch.randn(H, generator=self.g, dtype=torch.float64) * self.scales

    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return features (n, H) and their true quality (n,), quality with unit spread."""
        x = torch.randn(n, H, generator=self.g, dtype=torch.float64) * self.scales + self.offset
        return x, (x - self.offset) @ self.u / (self.u * self.scales).norm()

    def feedback(self, quality: torch.Tensor, per_prompt: int = 4):
        """Return ratings 1..5 (one per row, raters in turn) and best-of-N preferences per prompt group."""
        noise = lambda *shape: torch.randn(*shape, generator=self.g, dtype=torch.float64)  # noqa: E731
        ratings = []
        for i, q in enumerate(quality):
            r = i % 4
            score = (3 + RATER_BIAS[r] + RATER_SPREAD[r] * q + 0.2 * noise(())).round().clamp(1, 5)
            ratings.append((f"rater{r}", float(score)))
        pairs = []
        for start in range(0, len(quality), per_prompt):
            rows = list(range(start, start + per_prompt))
            best = rows[int((quality[rows] + 0.3 * noise(per_prompt)).argmax())]
            pairs += [(best, r) for r in rows if r != best]
        groups = [i // per_prompt for i in range(len(quality))]
        return ratings, pairs, groups

    def fitted(self, n: int):
        """Return features (n, H), their quality, and a RewardModel fitted to their feedback with its FitReport."""
        x, quality = self.draw(n)
        ratings, pairs, groups = self.feedback(quality)
        model = RewardModel(H)
        report = model.fit(x, normalize_ratings(ratings), pairs, groups=groups)
        return x, quality, model, report


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def test_fit_recovers_a_hidden_taste_from_ratings_and_preferences():
    # Seed 0, 100 prompts x 4 responses, 64-dim features. Measured: held-out corr 0.91 (ceiling set by
    # 1..5 rounding ~0.92), pref acc 0.94, corr with the true taste on fresh samples 0.985.
    taste = Taste(0)
    x, quality, model, report = taste.fitted(400)
    assert (report.n_examples, report.n_scores, report.n_preferences) == (400, 400, 300)
    assert report.n_held_out_scores > 50 and report.n_held_out_preferences > 40
    assert report.held_out_score_correlation > 0.8
    assert report.held_out_preference_accuracy > 0.8
    fresh, fresh_quality = taste.draw(500)
    assert pearson(model.score_hidden(fresh.float()), fresh_quality) > 0.9
    assert math.isfinite(report.train_loss) and report.seconds < 10


def test_bradley_terry_alone_learns_the_ordering():
    # Seed 0, preferences only (300 best-of-4 pairs, 0.3 noise on the picker). Measured: held-out
    # accuracy 0.81, corr with the true taste on fresh samples 0.91.
    taste = Taste(0)
    x, quality = taste.draw(400)
    _, pairs, groups = taste.feedback(quality)
    model = RewardModel(H)
    report = model.fit(x, None, pairs, groups=groups)
    assert report.n_scores == 0 and report.held_out_score_correlation is None
    assert report.held_out_preference_accuracy > 0.75
    fresh, fresh_quality = taste.draw(500)
    assert pearson(model.score_hidden(fresh.float()), fresh_quality) > 0.8


def test_fit_with_too_little_data_reports_no_held_out_numbers():
    taste = Taste(1)
    x, quality = taste.draw(8)
    ratings, pairs, groups = taste.feedback(quality)
    report = RewardModel(H).fit(x, normalize_ratings(ratings), pairs, groups=groups)
    assert report.held_out_score_correlation is None and report.held_out_preference_accuracy is None
    assert "n/a" in report.summary()
    with pytest.raises(ValueError):
        RewardModel(H).fit(x, None, [])
    with pytest.raises(ValueError):
        RewardModel(H).fit(x, None, [(0, 8)])


def few_noisy_examples(seed: int, prompts: int = 30, per_prompt: int = 3, width: int = 256, factors: int = 8):
    """Return (x, z, groups) of prompts x per_prompt rated rows, and (x, quality) of 500 fresh rows.

    Features as hidden states look: a few latent factors mixed into many correlated dimensions plus
    noise; the taste is linear in the factors and the scores carry as much noise as signal. 90
    examples for 256 features: without regularisation the head fits the noise.
    """
    g = torch.Generator().manual_seed(seed)
    mix, taste = torch.randn(factors, width, generator=g), torch.randn(factors, generator=g)

    def draw(n):
        latent = torch.randn(n, factors, generator=g)
        quality = latent @ taste
        return latent @ mix + 0.5 * torch.randn(n, width, generator=g), (quality - quality.mean()) / quality.std()

    x, quality = draw(prompts * per_prompt)
    z = quality + torch.randn(len(quality), generator=g)
    return (x, z, [i // per_prompt for i in range(len(z))]), draw(500)


@pytest.mark.parametrize("seed", range(4))
def test_chosen_regularisation_generalises_better_than_a_weak_one(seed):
    # Measured (seeds 0-3): fresh-sample correlation 0.93-0.99 with the cross-validated l2 (1 or 10),
    # 0.75-0.85 with l2 = 0.01.
    (x, z, groups), (fresh, fresh_quality) = few_noisy_examples(seed)
    chosen, weak = RewardModel(x.shape[1]), RewardModel(x.shape[1])
    report = chosen.fit(x, z, [], groups=groups)
    weak_report = weak.fit(x, z, [], groups=groups, config=RewardConfig(reward_l2=0.01))
    assert report.l2_choice == "cross-validated" and report.l2 in L2_GRID
    assert (weak_report.l2, weak_report.l2_choice) == (0.01, "set")
    assert f"l2 {report.l2:g} (cross-validated)" in report.summary()
    assert pearson(chosen.raw_score(fresh), fresh_quality) > pearson(weak.raw_score(fresh), fresh_quality) + 0.05
    assert pearson(chosen.raw_score(fresh), fresh_quality) > 0.9


def test_the_l2_choice_is_deterministic_and_ignores_the_held_out_prompts():
    (x, z, groups), _ = few_noisy_examples(0)
    first, again = RewardModel(x.shape[1]), RewardModel(x.shape[1])
    report = first.fit(x, z, [], groups=groups)
    assert again.fit(x, z, [], groups=groups).l2 == report.l2 and torch.equal(first.weight, again.weight)
    held = {g for g in set(groups) if (g * 0.6180339887498949) % 1.0 < 0.2}
    assert held and report.n_held_out_scores == 3 * len(held)
    z_held_changed = z.clone()
    z_held_changed[[i for i, g in enumerate(groups) if g in held]] *= -5  # wild held-out scores
    other = RewardModel(x.shape[1]).fit(x, z_held_changed, [], groups=groups)
    assert other.l2 == report.l2  # chosen on the training prompts only
    set_report = RewardModel(x.shape[1]).fit(x, z, [], groups=groups, config=RewardConfig(reward_l2=report.l2))
    assert set_report.held_out_score_correlation == pytest.approx(report.held_out_score_correlation)


def test_with_few_prompts_the_default_l2_is_used():
    (x, z, groups), _ = few_noisy_examples(1, prompts=6)
    report = RewardModel(x.shape[1]).fit(x, z, [], groups=groups)
    assert (report.l2, report.l2_choice) == (DEFAULT_L2, "default") and DEFAULT_L2 == 10.0
    assert "l2 10 (default)" in report.summary()


def test_calibration_gives_mean_zero_std_one_on_reference_samples():
    taste = Taste(2)
    x, quality, model, _ = taste.fitted(200)
    reference = taste.draw(300)[0] + 0.5  # a different distribution from the rated one
    raw = model.raw_score(reference.float())
    assert abs(float(raw.mean())) > 0.1  # so calibration has something to do
    model.calibrate(reference.float())
    scores = model.score_hidden(reference.float())
    assert float(scores.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(scores.std()) == pytest.approx(1.0, abs=1e-4)
    clamped = raw.clamp(model.raw_min, model.raw_max)  # to the range of the fitted outputs
    assert pearson(scores, clamped) == pytest.approx(1.0, abs=1e-6)  # an increasing affine: same ranking
    assert not scores.requires_grad


def test_save_and_load_round_trip_scores_identically(tmp_path):
    taste = Taste(3)
    x, quality, model, _ = taste.fitted(120)
    model.calibrate(taste.draw(50)[0].float())
    model.save(tmp_path / "rm")
    loaded = RewardModel.load(tmp_path / "rm")
    probe = taste.draw(40)[0].float()
    assert torch.equal(loaded.score_hidden(probe), model.score_hidden(probe))
    assert isinstance(loaded.report, FitReport) and loaded.report == model.report
    assert loaded.n_reference == 50
    assert sorted(p.name for p in (tmp_path / "rm").iterdir()) == ["reward_model.json", "reward_model.safetensors"]
    RewardModel(H + 1).save(tmp_path / "other")
    (tmp_path / "rm" / "reward_model.safetensors").write_bytes(
        (tmp_path / "other" / "reward_model.safetensors").read_bytes())
    with pytest.raises(ValueError):  # tensors of another width than the JSON says
        RewardModel.load(tmp_path / "rm")


def test_rewards_do_not_grow_beyond_what_was_rated():
    """A linear head extrapolates without limit; the reward stops at the best output on fitted data."""
    taste = Taste(4)
    x, quality, model, _ = taste.fitted(160)
    model.calibrate(taste.draw(100)[0].float())
    fitted = model.score_hidden(x.float())
    direction = model.weight / model.feature_std  # raises the raw head output fastest
    far = x[:5].float() + 100 * direction  # (5, H): far past anything rated
    assert (model.raw_score(far) > 10 * model.raw_max).all()  # the bare head keeps growing
    assert torch.allclose(model.score_hidden(far), fitted.max().expand(5))
    assert torch.allclose(model.score_hidden(x[:5].float() - 100 * direction), fitted.min().expand(5))
    assert torch.equal(model.score_hidden(x.float()), fitted)  # inside the range: untouched


def test_a_reward_model_of_the_old_feature_format_is_refused(tmp_path):
    model = RewardModel(H)
    model.save(tmp_path / "rm")
    meta = json.loads((tmp_path / "rm" / "reward_model.json").read_text())
    meta["format"] = 1
    (tmp_path / "rm" / "reward_model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="fit a new one"):
        RewardModel.load(tmp_path / "rm")


def test_response_features_are_contextual_mean_and_token_bag():
    torch.manual_seed(0)
    B, R, W = 3, 5, 4
    hidden, embeddings = torch.randn(B, R + 1, W), torch.randn(B, R, W)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float32)
    features = response_features(hidden, embeddings, mask)
    assert features.shape == (B, 3 * W)
    assert torch.allclose(features[0], torch.cat([hidden[0, 1:].mean(0), embeddings[0].mean(0),
                                                  embeddings[0].max(0).values]))
    assert torch.allclose(features[1], torch.cat([hidden[1, 1:3].mean(0), embeddings[1, :2].mean(0),
                                                  embeddings[1, :2].max(0).values]))
    assert torch.equal(features[2], torch.zeros(3 * W))  # an empty response
    padded = embeddings.clone()
    padded[1, 2:] = 100.0  # whatever sits past the response's end is not seen
    assert torch.equal(response_features(hidden, padded, mask), features)
    one_word = embeddings.clone()
    one_word[0, 2] = 5.0  # one token among five changes the max block by its full size, not a fifth
    assert torch.allclose(response_features(hidden, one_word, mask)[0, 2 * W:], torch.full((W,), 5.0))


# ------------------------------------------------------------------------------ features of the base model

@pytest.fixture(scope="module")
def policy(tiny_model_dir, tmp_path_factory):
    loaded = load_model(ModelConfig(model=str(tiny_model_dir), device="cpu",
                                    cache_dir=str(tmp_path_factory.mktemp("c"))))
    peft_model = add_lora(loaded.model, LoraSettings(lora_r=4, lora_alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():  # a non-identity adapter: features must come from the adapter-off model
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return PolicyWithValueHead(peft_model, loaded.tokenizer)


def test_featurize_gives_the_trainers_features(policy):
    reward_features = RewardFeatures(policy)
    eos = policy.tokenizer.eos_token_id
    rollout = sample(policy.peft_model, policy.tokenizer, PROMPTS, max_new_tokens=10, seed=5)
    qr = rollout.query_response.clone()
    qr[1, rollout.context_length + 3] = eos  # row 1 stops early; tokens after its EOS are padding
    response_mask = first_eos_mask(qr[:, rollout.context_length:], eos)
    assert response_mask[1].sum() == 4 and response_mask.sum() > 4 * 4
    ref = policy.reference(qr, rollout.attention_mask, rollout.context_length)
    responses = qr[:, rollout.context_length:]
    trainer_features = reward_features.of_hidden(ref.hidden, responses, response_mask)  # what PPO's rewards see

    full_rows = qr[:, rollout.context_length:].tolist()  # with the tokens after EOS
    valid_rows = [row[:int(n)] for row, n in zip(full_rows, response_mask.sum(1))]
    cases = [(PROMPTS, full_rows, 16, trainer_features),  # one batch, post-EOS tokens dropped by featurize
             (PROMPTS, valid_rows, 3, trainer_features),  # other batches, other padding
             (PROMPTS[::-1], valid_rows[::-1], 1, trainer_features.flip(0))]  # one at a time, reversed
    for prompts, rows, batch_size, expected in cases:
        features = reward_features.of_responses(prompts, rows, batch_size=batch_size)
        assert features.shape == (len(PROMPTS), reward_features.size) == (len(PROMPTS), 3 * policy.trunk.config.hidden_size)
        assert torch.allclose(features, expected, atol=1e-4)

    with torch.no_grad():  # and not the adapter-on policy's
        on = reward_features.of_hidden(policy(qr, rollout.attention_mask, rollout.context_length).hidden, responses,
                                    response_mask)
    assert not torch.allclose(on, trainer_features, atol=1e-3)


def test_trainer_scores_rollouts_with_the_reward_model(policy):
    torch.manual_seed(0)
    trainer = PPOTrainer(policy, PPOConfig(batch_size=4, mini_batch_size=4,
                                           sampling=RolloutSampling(max_new_tokens=8)))
    model = RewardModel(trainer.features.size)
    hidden = torch.randn(40, model.feature_size)
    model.fit(hidden, torch.randn(40).tolist(), [])
    rollout = trainer.rollout(PROMPTS)
    ref = policy.reference(rollout.query_response, rollout.attention_mask, rollout.context_length)
    scores = trainer.score(PROMPTS, rollout, ref.hidden, model)
    lengths = rollout.response_mask.sum(1).long().tolist()
    responses = [row[:n] for row, n in zip(rollout.responses.tolist(), lengths)]
    expected = model.score_hidden(trainer.features.of_responses(PROMPTS, responses))
    assert torch.allclose(scores, expected, atol=1e-4)
    assert scores.std() > 0


def test_the_workers_reference_features_are_featurizes(policy, tmp_path, monkeypatch):
    """Calibration, the fit and PPO's scores must all see the same features for the same prompt and response."""
    from ppo_feedback import trainer as trainer_module
    from ppo_feedback import worker as worker_module
    from ppo_feedback.adapters import AdapterStore

    store = FeedbackStore(tmp_path / "feedback.db")
    store.add_prompts(PROMPTS)
    rollouts = []

    def recording_sample(*args, **kwargs):
        rollouts.append((list(args[2]), sample(*args, **kwargs)))
        return rollouts[-1][1]

    monkeypatch.setattr(trainer_module, "sample", recording_sample)
    worker = worker_module.Worker(store, AdapterStore(tmp_path / "adapters"), policy,
                                  PPOConfig(batch_size=4, mini_batch_size=4,
                                            sampling=RolloutSampling(max_new_tokens=10)),
                                  worker_module.WorkerConfig(reference_samples=6), "tiny")
    features = worker.reference_features()
    (prompts, rollout), = rollouts
    lengths = rollout.response_mask.sum(1).long().tolist()
    assert len(prompts) == 6 and features.shape == (6, worker.trainer.features.size)
    responses = [row[:n] for row, n in zip(rollout.responses.tolist(), lengths)]
    assert torch.allclose(features, RewardFeatures(policy).of_responses(prompts, responses), atol=1e-4)
    assert worker.reference_features() is features  # computed once
    store.close()


# ------------------------------------------------------------------------------ from the store

def test_fit_reward_model_reads_the_store(policy, tmp_path, monkeypatch):
    store = FeedbackStore(tmp_path / "feedback.db")
    generation_ids = []
    for i, prompt in enumerate(PROMPTS[:3]):
        prompt_id = store.add_prompt(prompt, source="builtin")
        candidates = generate(policy.peft_model, policy.tokenizer, prompt, n=3, max_new_tokens=8, seed=i)
        stored = store.record_generations(prompt_id, 0, [NewGeneration(c.text, c.token_ids, c.logprobs)
                                                         for c in candidates])
        generation_ids.append([g.id for g in stored])
    for g in [g for group in generation_ids for g in group]:  # 9 by ann, 5 by bob
        store.rate(g, "ann", 1 + g % 5)
        if g % 2:
            store.rate(g, "bob", 5 - g % 3)
    store.rate(generation_ids[0][0], "ann", 4)  # a re-rating supersedes, it does not add
    for group in generation_ids:
        store.pick_best(group[0], group[1:], "cy")  # 2 pairs each, by a rater who only picks
    store.prefer(generation_ids[1][2], generation_ids[1][1], "ann")

    reward_features = RewardFeatures(policy)
    cache = reward_features.cache
    model, report = fit_reward_model(read_feedback(store), reward_features)
    n_bob = sum(g % 2 for group in generation_ids for g in group)
    assert report.n_ratings == 9 + n_bob
    assert (report.n_examples, report.n_scores, report.n_preferences, report.n_raters) == (9, 9, 7, 3)
    assert report.n_reference == 9  # calibrated on the base-model (version 0) generations
    assert report.held_out_score_correlation is None  # 3 prompts: too few to hold any out
    assert sorted(cache) == sorted(g for group in generation_ids for g in group)

    first = store.get_generation(generation_ids[2][1])
    features = RewardFeatures(policy).of_responses([PROMPTS[2]], [list(first.token_ids)])
    assert torch.allclose(cache[first.id], features[0], atol=1e-5)
    all_features = torch.stack([cache[g] for g in sorted(cache)])
    scores = model.score_hidden(all_features)
    assert float(scores.mean()) == pytest.approx(0.0, abs=1e-4) and float(scores.std()) == pytest.approx(1.0, abs=1e-4)

    def no_featurize(*_args, **_kwargs):
        raise AssertionError("every generation is cached; nothing should be featurised again")

    monkeypatch.setattr(reward_features, "of_responses", no_featurize)
    again, _ = fit_reward_model(read_feedback(store), reward_features)
    assert torch.equal(again.score_hidden(all_features), scores)
    store.close()


def test_read_feedback_scores_rows_and_siblings(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    a, b = store.add_prompt("prompt a", source="builtin"), store.add_prompt("prompt b", source="builtin")
    store.publish_version(1, VersionRecord(0, "tiny", Cursor(), 0, 0), "v0001")

    def record(prompt_id, version, n):
        return [g.id for g in store.record_generations(prompt_id, version, [
            NewGeneration(f"text {i}", [i + 1, 0], [-1.0, -0.5], {"temperature": 1.0}) for i in range(n)])]

    shown, later, other = record(a, 0, 3), record(a, 1, 1), record(b, 0, 2)
    for g, score in zip(shown, (5, 3, 1)):
        store.rate(g, "ann", score)
    store.rate(shown[0], "bob", 4)
    store.rate(later[0], "ann", 4)
    store.rate(other[0], "bob", 2)
    store.prefer(other[0], other[1], "bob")  # other[1] is only in a preference
    feedback = read_feedback(store)
    ids = [g.id for g in feedback.generations]
    assert ids == sorted(shown + later + other) and feedback.n_ratings == 6 and feedback.raters == {"ann", "bob"}
    z = normalize_ratings([("ann", 5), ("ann", 3), ("ann", 1), ("bob", 4), ("ann", 4), ("bob", 2)])
    expected = {shown[0]: (z[0] + z[3]) / 2, shown[1]: z[1], shown[2]: z[2], later[0]: z[4], other[0]: z[5]}
    scores = dict(zip(ids, feedback.scores.tolist()))
    assert math.isnan(scores.pop(other[1])) and scores == pytest.approx(expected)
    assert feedback.pairs == [(ids.index(other[0]), ids.index(other[1]))]
    relative = dict(zip(ids, feedback.relative_scores().tolist()))
    s0, s1, s2 = (expected[g] for g in shown)
    # candidates shown together are scored against each other's mean; a lone one keeps its score
    assert [relative[g] for g in shown] == pytest.approx([s0 - (s1 + s2) / 2, s1 - (s0 + s2) / 2, s2 - (s0 + s1) / 2])
    assert relative[later[0]] == pytest.approx(expected[later[0]]) and relative[other[0]] == pytest.approx(expected[other[0]])
    assert math.isnan(relative[other[1]])
    assert feedback.replayable(1.0) == [ids.index(g) for g in sorted(shown + later + [other[0]])]
    assert feedback.replayable(0.7) == []  # sampled at another temperature: their logprobs are not comparable
    store.close()


def test_siblings_are_the_candidates_of_one_page(tmp_path):
    """Two raters ask for the same prompt from the same version: two pages, and a rater's candidates
    are scored against what that rater saw beside them, never against the other rater's."""
    store = FeedbackStore(tmp_path / "feedback.db")
    prompt = store.add_prompt("prompt", source="builtin")

    def page(rater, scores):
        stored = store.record_generations(prompt, 0, [
            NewGeneration(f"{rater} {i}", [i + 1], [-1.0], {"temperature": 1.0}) for i in range(len(scores))],
            rater=rater)
        for g, score in zip(stored, scores):
            store.rate(g.id, rater, score)
        return [g.id for g in stored]

    ann, bob = page("ann", (5, 1)), page("bob", (4, 2))
    feedback = read_feedback(store, prior_weight=0.0)
    ids = [g.id for g in feedback.generations]
    ann_page, bob_page = (store.get_generation(g[0]).page_id for g in (ann, bob))
    assert feedback.page_ids == [ann_page, ann_page, bob_page, bob_page] and ann_page != bob_page
    assert feedback.rated_pages() == {ann_page: [0, 1], bob_page: [2, 3]}
    # k = 0: ann's 5, 1 (mean 3, std 2) and bob's 4, 2 (mean 3, std 1) are both z = +1, -1
    assert feedback.scores.tolist() == pytest.approx([1.0, -1.0, 1.0, -1.0])
    # each against its one sibling on its page: 1 - (-1) = 2; merged by (prompt, version) ann's 5
    # would have been 1 - (-1 + 1 - 1) / 3 = 4/3
    assert feedback.relative_scores().tolist() == pytest.approx([2.0, -2.0, 2.0, -2.0])
    pool = feedback.replay_pool(1.0)
    assert pool.prompts == ["prompt", "prompt"] and pool.responses == [[1], [1]] and pool.scores == pytest.approx([2.0, 2.0])
    assert ids == ann + bob
    store.close()


def test_fit_reward_model_without_feedback_refuses(policy, tmp_path):
    store = FeedbackStore(tmp_path / "empty.db")
    with pytest.raises(ValueError, match="no ratings or preferences"):
        fit_reward_model(read_feedback(store), RewardFeatures(policy))
    store.close()


def test_reward_config_validates():
    with pytest.raises(ValueError):
        RewardConfig(reward_holdout=1.0).validate()
    with pytest.raises(ValueError):
        RewardConfig(reward_l2=-1).validate()
    with pytest.raises(ValueError):
        RewardConfig(feature_batch_size=0).validate()
    RewardConfig().validate()
    RewardConfig(reward_l2=0.0).validate()
