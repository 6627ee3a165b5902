"""Tests for ppo_feedback.ppo: hand-worked examples, then hypothesis properties."""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ppo_feedback.ppo import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_per_token,
    masked_mean,
    masked_var,
    masked_whiten,
    penalized_rewards,
    policy_loss,
    truncated_importance_weights,
    value_loss,
)

NAN = float("nan")


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def close(actual, expected, **kw):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), **kw)


# ============================================================================ hand-worked units


def test_masked_mean_by_hand():
    x = t([[1, 2, 3], [4, 5, 6]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    # (1 + 2 + 4) / 3 = 7/3
    close(masked_mean(x, mask), 7 / 3)
    close(masked_mean(x, mask.bool()), 7 / 3)


def test_masked_mean_ignores_nan_on_padding_and_checks_shape():
    x = t([[1, NAN, -math.inf]])
    close(masked_mean(x, t([[1, 0, 0]])), 1.0)
    with pytest.raises(ValueError, match="shape"):
        masked_mean(x, t([[1, 0]]))


def test_masked_var_by_hand():
    x = t([[2, 4, 6, 1000]])
    mask = t([[1, 1, 1, 0]])
    # mu = 4; sum of squares (4 + 0 + 4) = 8; biased 8/3; unbiased 8/3 * 3/2 = 4
    close(masked_var(x, mask, unbiased=False), 8 / 3)
    close(masked_var(x, mask), 4.0)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, t([[1, 0, 0, 0]]))


def test_masked_whiten_by_hand():
    x = t([[2, 4, 6, NAN]])
    mask = t([[1, 1, 1, 0]])
    # mu = 4, unbiased var = 4 (see above), sigma = sqrt(4 + 1e-8) ~= 2
    # y = (x - 4)/2 = [-1, 0, 1], padding 0
    s = math.sqrt(4 + 1e-8)
    close(masked_whiten(x, mask), [[-2 / s, 0.0, 2 / s, 0.0]])
    # shift_mean=False adds mu back: [-1 + 4, 0 + 4, 1 + 4] = [3, 4, 5]
    close(masked_whiten(x, mask, shift_mean=False), [[4 - 2 / s, 4.0, 4 + 2 / s, 0.0]])


def test_kl_estimators_by_hand():
    logp = t([-1.0, -2.0])
    ref = t([-1.5, -1.0])
    # k1 = logp - ref = [0.5, -1.0]
    close(kl_per_token(logp, ref), [0.5, -1.0])
    close(kl_per_token(logp, ref, "k1"), [0.5, -1.0])
    # k3: r = ref - logp = [-0.5, 1.0]; (e^r - 1) - r = [e^-0.5 - 0.5, e - 2] = [0.10653, 0.71828]
    close(kl_per_token(logp, ref, "k3"), [math.exp(-0.5) - 0.5, math.e - 2])
    with pytest.raises(ValueError, match="estimator"):
        kl_per_token(logp, ref, "k2")


def test_penalized_rewards_by_hand():
    logp = t([[-1, -1, -1], [-2, -2, 9], [0, 0, 0]])
    ref = t([[-1.5, -1, -0.5], [-1, -2, 0], [-3, -3, -3]])
    mask = t([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    scores = t([2.0, 3.0, 5.0])
    # row 0: k1 = [0.5, 0, -0.5]; -0.1*k1 = [-0.05, 0, 0.05]; score 2 at t=2 -> [-0.05, 0, 2.05]
    # row 1: k1 = [-1, 0, pad]; -0.1*k1 = [0.1, 0, 0]; score 3 at t=1 -> [0.1, 3, 0]
    # row 2: no valid token -> no score placed, all zeros
    expected = [[-0.05, 0.0, 2.05], [0.1, 3.0, 0.0], [0.0, 0.0, 0.0]]
    close(penalized_rewards(scores, logp, ref, mask, kl_coef=0.1), expected)
    close(penalized_rewards(scores, logp, ref, mask.bool(), kl_coef=0.1), expected)


def test_penalized_rewards_k3_and_last_index_with_any_mask_layout():
    logp = t([[-1.0, -1.0, -1.0, -1.0]])
    ref = t([[-1.0, -2.0, -1.0, -1.0]])
    mask = t([[0, 1, 1, 0]])  # valid tokens not starting at 0: last valid index is 2
    # k3 at t=1: r = -2 - (-1) = -1 -> e^-1 - 1 + 1 = e^-1; at t=2: r = 0 -> 0
    # rewards: t=1: -0.5 * e^-1; t=2: 0 + score 1.5
    out = penalized_rewards(t([1.5]), logp, ref, mask, kl_coef=0.5, estimator="k3")
    close(out, [[0.0, -0.5 * math.exp(-1), 1.5, 0.0]])
    with pytest.raises(ValueError, match="scores shape"):
        penalized_rewards(t([1.0, 2.0]), logp, ref, mask, kl_coef=0.5)


def test_gae_by_hand():
    rewards = t([[1.0, 0.0, 2.0, 3.0]])  # last column is padding with garbage
    values = t([[0.5, 1.0, 1.5, 7.0]])
    mask = t([[1, 1, 1, 0]])
    # gamma = 0.9, lam = 0.8, gamma*lam = 0.72; bootstrap V = 0 after t = 2
    # t=2: delta = 2 + 0.9*0 - 1.5 = 0.5;         A2 = 0.5
    # t=1: delta = 0 + 0.9*1.5 - 1 = 0.35;        A1 = 0.35 + 0.72*0.5 = 0.71
    # t=0: delta = 1 + 0.9*1 - 0.5 = 1.4;         A0 = 1.4 + 0.72*0.71 = 1.9112
    # returns = A + V = [2.4112, 1.71, 2.0]
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(adv, [[1.9112, 0.71, 0.5, 0.0]])
    close(ret, [[2.4112, 1.71, 2.0, 0.0]])


def test_gae_padded_gap_ends_the_episode():
    rewards = t([[1.0, 5.0, 2.0]])
    values = t([[0.5, 9.0, 1.5]])
    mask = t([[1, 0, 1]])
    # t=2: delta = 2 - 1.5 = 0.5; A2 = 0.5
    # t=1: padding -> A1 = 0 and V1 counts as 0
    # t=0: delta = 1 + 0.9*0 - 0.5 = 0.5; A0 = 0.5 + 0.72*0 = 0.5
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(adv, [[0.5, 0.0, 0.5]])
    close(ret, [[1.0, 0.0, 2.0]])


def test_policy_loss_by_hand():
    logp = t([[math.log(2), 0.0, math.log(0.5), 5.0]]).requires_grad_()
    old = t([[0.0, 0.0, 0.0, -1e4]])  # padding: exp(1e4) = inf would give NaN gradients
    adv = t([[1.0, -1.0, 1.0, 100.0]])
    mask = t([[1, 1, 1, 0]])
    # eps = 0.2
    # t=0: rho = 2,   A = 1:  pg1 = -2,   pg2 = -1.2 -> max -1.2 (clipped: pg2 > pg1)
    # t=1: rho = 1,   A = -1: pg1 = 1,    pg2 = 1    -> max 1    (not clipped)
    # t=2: rho = 0.5, A = 1:  pg1 = -0.5, pg2 = -0.8 -> max -0.5 (not clipped)
    # loss = (-1.2 + 1 - 0.5)/3 = -0.7/3; clipfrac = 1/3
    # approx_kl = 0.5 * (ln2^2 + 0 + ln2^2)/3 = ln2^2/3
    loss, clipfrac, approx_kl = policy_loss(logp, old, adv, mask, cliprange=0.2)
    close(loss, -0.7 / 3)
    close(clipfrac, 1 / 3)
    close(approx_kl, math.log(2) ** 2 / 3)
    assert not clipfrac.requires_grad and not approx_kl.requires_grad
    # gradient d loss / d logp_t = -A_t * rho_t / 3 where unclipped, 0 where clipped or padded
    loss.backward()
    close(logp.grad, [[0.0, 1 / 3, -0.5 / 3, 0.0]])


def test_importance_weighted_policy_loss_by_hand():
    logp = t([[math.log(2), 0.0, math.log(0.5), 5.0]]).requires_grad_()
    old = t([[0.0, 0.0, 0.0, -1e4]])
    adv = t([[1.0, -1.0, 1.0, 100.0]])
    mask = t([[1, 1, 1, 0]])
    behaviour = t([[0.0, math.log(0.25), math.log(2.0), 7.0]])
    # w = min(1, exp(old - behaviour)): t=0 1 (equal), t=1 1 (truncated from 4), t=2 0.5, padding 0
    weights = truncated_importance_weights(old, behaviour, mask)
    close(weights, [[1.0, 1.0, 0.5, 0.0]])
    assert not weights.requires_grad
    # the clipped terms of test_policy_loss_by_hand, -1.2, 1, -0.5, weighted: (-1.2 + 1 - 0.25) / 3
    loss, clipfrac, _ = policy_loss(logp, old, adv, mask, cliprange=0.2, weights=weights)
    close(loss, -0.45 / 3)
    close(clipfrac, 1 / 3)
    loss.backward()
    close(logp.grad, [[0.0, 1 / 3, -0.25 / 3, 0.0]])
    unweighted, _, _ = policy_loss(logp, old, adv, mask, cliprange=0.2, weights=torch.ones_like(logp))
    close(unweighted, -0.7 / 3)


def test_value_loss_by_hand():
    values = t([[1.0, 2.0, 3.0, NAN]]).requires_grad_()
    old = t([[0.0, 2.0, 2.0, 9.0]])
    returns = t([[2.0, 0.0, 0.0, 9.0]])
    mask = t([[1, 1, 1, 0]])
    # eps_v = 0.2
    # t=0: unclipped (1-2)^2 = 1; v_clipped = 0 + 0.2 = 0.2 -> (0.2-2)^2 = 3.24; max 3.24 (clipped)
    # t=1: V == old -> both (2-0)^2 = 4; max 4 (not clipped)
    # t=2: unclipped (3-0)^2 = 9; v_clipped = 2.2 -> 4.84; max 9 (not clipped)
    # loss = 0.5 * (3.24 + 4 + 9)/3 = 2.70667; clipfrac = 1/3
    loss, clipfrac = value_loss(values, old, returns, mask, cliprange_value=0.2)
    close(loss, 0.5 * 16.24 / 3)
    close(clipfrac, 1 / 3)
    assert not clipfrac.requires_grad
    # d loss/dV = (V - R)/3 where the unclipped term wins, 0 where the clipped one does
    loss.backward()
    close(values.grad, [[0.0, 2 / 3, 3 / 3, 0.0]])


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    assert ctl.value == 0.2
    # err = 7/6 - 1 = 1/6 (inside +-0.2); mult = 1 + (1/6)*256/10000; value = 0.2 * mult
    ctl.update(current_kl=7.0, n_steps=256)
    assert ctl.value == pytest.approx(0.2 * (1 + (1 / 6) * 256 / 10000))
    assert ctl.value == pytest.approx(0.20085333333)


def test_adaptive_kl_controller_clips_error_to_plus_minus_0_2():
    hi = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    hi.update(torch.tensor(60.0), n_steps=256)  # err = 9 -> clipped to 0.2
    assert hi.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))  # 0.201024
    lo = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    lo.update(0.0, n_steps=256)  # err = -1 -> clipped to -0.2
    assert lo.value == pytest.approx(0.2 * (1 - 0.2 * 256 / 10000))  # 0.198976


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(init_kl_coef=-0.1, target=6, horizon=10), "init_kl_coef"),
        (dict(init_kl_coef=0.1, target=0, horizon=10), "target"),
        (dict(init_kl_coef=0.1, target=6, horizon=-1), "horizon"),
        (dict(init_kl_coef=NAN, target=6, horizon=10), "finite"),
    ],
)
def test_adaptive_kl_controller_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveKLController(**kwargs)


def test_adaptive_kl_controller_rejects_bad_updates():
    ctl = AdaptiveKLController(0.1, 6.0, 10.0)
    with pytest.raises(ValueError, match="current_kl"):
        ctl.update(NAN, 1)
    with pytest.raises(ValueError, match="n_steps"):
        ctl.update(1.0, -1)
    assert ctl.value == 0.1


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 1000)
    ctl.update(0.0, 1000)
    assert ctl.value == 0.05
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(-1.0)


# ============================================================================ properties

SETTINGS = settings(max_examples=50, deadline=None)
small = st.floats(-5, 5, allow_nan=False, allow_infinity=False)
garbage = st.floats(-1e6, 1e6) | st.sampled_from([NAN, math.inf, -math.inf])


@st.composite
def batch(draw, n_tensors, elements=small):
    """(mask, [tensor, ...]) with right padding; each tensor (B, T) float64."""
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    mask = t([[1.0] * n + [0.0] * (T - n) for n in lengths])
    n = n_tensors * B * T
    flat = t(draw(st.lists(elements, min_size=n, max_size=n)))
    return mask, list(flat.reshape(n_tensors, B, T).unbind(0))


@st.composite
def padded(draw, mask, tensors):
    """Append 1..3 columns of garbage with mask 0 to mask and each tensor."""
    B = mask.shape[0]
    P = draw(st.integers(1, 3))
    n = len(tensors) * B * P
    pads = t(draw(st.lists(garbage, min_size=n, max_size=n))).reshape(len(tensors), B, P)
    pmask = torch.cat([mask, torch.zeros(B, P, dtype=mask.dtype)], 1)
    return pmask, [torch.cat([x, pad], 1) for x, pad in zip(tensors, pads)]


def check_pad(out, out_padded, T):
    """Same values on the original columns, exactly 0 on the appended padding."""
    close(out_padded[:, :T], out)
    assert torch.all(out_padded[:, T:] == 0)


@SETTINGS
@given(batch(n_tensors=2))
def test_gae_gamma_lam_one_returns_are_reward_to_go(b):
    mask, (rewards, values) = b
    _, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    reward_to_go = (rewards * mask).flip(1).cumsum(1).flip(1) * mask
    close(ret, reward_to_go)


@SETTINGS
@given(batch(n_tensors=2), st.floats(0, 1))
def test_gae_lam_zero_is_one_step_td(b, gamma):
    mask, (rewards, values) = b
    adv, _ = gae(rewards, values, mask, gamma=gamma, lam=0.0)
    next_values = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros_like(values[:, :1])], 1)
    close(adv, (rewards + gamma * next_values - values) * mask)


@SETTINGS
@given(batch(n_tensors=1, elements=st.floats(-100, 100)), st.booleans())
def test_whiten_gives_mean_0_and_unbiased_variance_1(b, shift_mean):
    mask, (x,) = b
    assume(mask.sum() >= 2)
    var = masked_var(x, mask)
    assume(var > 1e-3)
    y = masked_whiten(x, mask, shift_mean=shift_mean)
    expected_mean = 0.0 if shift_mean else masked_mean(x, mask)
    close(masked_mean(y, mask), expected_mean, atol=1e-9, rtol=1e-9)
    close(masked_var(y, mask), 1.0, rtol=1e-4, atol=0)
    assert torch.all(y[mask == 0] == 0)


@SETTINGS
@given(batch(n_tensors=2, elements=st.floats(-5, 0)))
def test_k3_is_non_negative(b):
    _, (logp, ref) = b
    assert torch.all(kl_per_token(logp, ref, "k3") >= 0)


@SETTINGS
@given(st.data(), batch(n_tensors=4), st.sampled_from(["k1", "k3"]))
def test_padding_never_changes_rewards_or_gae(data, b, estimator):
    mask, (logp, ref, values, scores_row) = b
    T = mask.shape[1]
    scores = scores_row[:, 0]
    pmask, (plogp, pref, pvalues) = data.draw(padded(mask, [logp, ref, values]))

    rewards = penalized_rewards(scores, logp, ref, mask, 0.1, estimator)
    prewards = penalized_rewards(scores, plogp, pref, pmask, 0.1, estimator)
    check_pad(rewards, prewards, T)

    adv, ret = gae(rewards, values, mask, gamma=0.95, lam=0.9)
    padv, pret = gae(prewards, pvalues, pmask, gamma=0.95, lam=0.9)
    check_pad(adv, padv, T)
    check_pad(ret, pret, T)


@SETTINGS
@given(st.data(), batch(n_tensors=1))
def test_padding_never_changes_whitening(data, b):
    mask, (x,) = b
    assume(mask.sum() >= 2)
    T = mask.shape[1]
    pmask, (px,) = data.draw(padded(mask, [x]))
    for shift_mean in (True, False):
        check_pad(masked_whiten(x, mask, shift_mean), masked_whiten(px, pmask, shift_mean), T)
    close(masked_mean(px, pmask), masked_mean(x, mask))


@SETTINGS
@given(st.data(), batch(n_tensors=6))
def test_padding_never_changes_losses(data, b):
    mask, (logp, old_logp, adv, values, old_values, returns) = b
    assume(mask.sum() >= 1)
    tensors = [logp, old_logp, adv, values, old_values, returns]
    pmask, (plogp, pold_logp, padv, pvalues, pold_values, preturns) = data.draw(
        padded(mask, tensors)
    )
    for a, p in zip(
        policy_loss(logp, old_logp, adv, mask, 0.2),
        policy_loss(plogp, pold_logp, padv, pmask, 0.2),
    ):
        close(p, a)
    for a, p in zip(
        value_loss(values, old_values, returns, mask, 0.2),
        value_loss(pvalues, pold_values, preturns, pmask, 0.2),
    ):
        close(p, a)


@SETTINGS
@given(batch(n_tensors=2, elements=st.floats(-5, 0)))
def test_ratio_one_no_clipping_and_loss_is_minus_mean_advantage(b):
    mask, (logp, adv) = b
    assume(mask.sum() >= 1)
    loss, clipfrac, approx_kl = policy_loss(logp, logp.clone(), adv, mask, cliprange=0.2)
    assert clipfrac == 0
    assert approx_kl == 0
    close(loss, -masked_mean(adv, mask))
