"""Tests for ppo_feedback.objectives: hand-worked examples, then hypothesis properties."""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ppo_feedback.objectives import (
    above_page_mean,
    chosen_nll,
    dpo_loss,
    ipo_loss,
    kto_kl_estimate,
    kto_loss,
    kto_mismatched,
    kto_weights,
    page_pairs,
    raft_loss,
    reinforce_loss,
    rloo_advantages,
    sequence_logprobs,
)

NAN = float("nan")


def t(rows, grad=False):
    return torch.tensor(rows, dtype=torch.float64, requires_grad=grad)


def close(actual, expected, **kw):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), **kw)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def softplus(x):  # -log sigma(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


# ============================================================================ sequences


def test_sequence_logprobs_by_hand():
    logprobs = t([[-1.0, -2.0, NAN], [-0.5, math.inf, -7.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    # row 0: -1 - 2 = -3 over 2 tokens; row 1: -0.5 over 1 token; padding (NaN, inf) ignored
    close(sequence_logprobs(logprobs, mask), [-3.0, -0.5])
    close(sequence_logprobs(logprobs, mask.bool()), [-3.0, -0.5])
    close(sequence_logprobs(logprobs, mask, average=True), [-1.5, -0.5])


def test_sequence_logprobs_rejects_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        sequence_logprobs(t([[-1.0, -2.0]]), t([[1.0]]))
    with pytest.raises(ValueError, match="one shape"):
        sequence_logprobs(t([-1.0, -2.0]), t([1.0, 1.0]))
    with pytest.raises(ValueError, match="at least one response token"):
        sequence_logprobs(t([[-1.0, -2.0], [-1.0, -1.0]]), t([[1, 1], [0, 0]]))
    with pytest.raises(ValueError, match="at least one response token"):
        sequence_logprobs(torch.zeros(0, 3), torch.zeros(0, 3))


# ============================================================================ DPO


def dpo_example(grad=False):
    # pair 0: chosen -3 vs ref -4, rejected -5 vs ref -4; pair 1: chosen -6 vs -6, rejected -2 vs -3
    return t([-3.0, -6.0], grad), t([-5.0, -2.0], grad), t([-4.0, -6.0]), t([-4.0, -3.0])


def test_dpo_loss_by_hand():
    pc, pr, rc, rr = dpo_example(grad=True)
    # beta 0.5. implied rewards: chosen 0.5*[1, 0] = [0.5, 0]; rejected 0.5*[-1, 1] = [-0.5, 0.5]
    # h = [1, -0.5]; loss = mean(-log sigma(h)) = (log(1 + e^-1) + log(1 + e^0.5)) / 2
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.5)
    close(loss, (softplus(-1.0) + softplus(0.5)) / 2)
    close(stats["rewards/chosen"], 0.25)
    close(stats["rewards/rejected"], 0.0)
    close(stats["rewards/accuracies"], 0.5)
    close(stats["rewards/margins"], 0.25)
    assert not any(s.requires_grad for s in stats.values())
    # d loss / d logpi(chosen) = -beta * sigma(-h) / N; d / d logpi(rejected) is its negative
    loss.backward()
    expected = [-0.5 * sigmoid(-1.0) / 2, -0.5 * sigmoid(0.5) / 2]
    close(pc.grad, expected)
    close(pr.grad, [-g for g in expected])


def test_ipo_loss_by_hand_and_its_margin_target():
    pc, pr, rc, rr = dpo_example(grad=True)
    # log-ratios: chosen [1, 0], rejected [-1, 1]; lengths chosen [1, 2], rejected [2, 1]
    # per-token margin h = [1/1 - (-1)/2, 0/2 - 1/1] = [1.5, -1]; tau 0.5: target 1/(2*0.5) = 1
    # loss = mean((h - 1)^2) = (0.25 + 4) / 2 = 2.125; d loss / d pc_i = 2 (h_i - 1) / (N * len_c_i)
    loss, stats = ipo_loss(pc, pr, rc, rr, t([1.0, 2.0]), t([2.0, 1.0]), tau=0.5)
    close(loss, 2.125)
    close(stats["ipo/margin"], 0.25)
    close(stats["rewards/margins"], 0.5 * (2 + -1) / 2)
    close(stats["rewards/accuracies"], 0.5)
    loss.backward()
    close(pc.grad, [2 * (1.5 - 1) / 2 / 1, 2 * (-1 - 1) / 2 / 2])
    close(pr.grad, [-2 * (1.5 - 1) / 2 / 2, -2 * (-1 - 1) / 2 / 1])
    # unlike DPO's, the loss rises again past the target margin: a pair is pulled back towards the reference
    at, past = (ipo_loss(t([m]), t([0.0]), t([0.0]), t([0.0]), t([1.0]), t([1.0]), tau=0.5)[0] for m in (1.0, 3.0))
    close(at, 0.0)
    assert float(past) > float(at)
    with pytest.raises(ValueError, match="at least one token"):
        ipo_loss(pc, pr, rc, rr, t([1.0, 0.0]), t([2.0, 1.0]), tau=0.5)
    with pytest.raises(ValueError, match="tau"):
        ipo_loss(pc, pr, rc, rr, t([1.0, 2.0]), t([2.0, 1.0]), tau=0.0)


def test_chosen_nll_by_hand():
    logps = t([-2.0, -4.0]).requires_grad_()
    # over all chosen tokens: -(-2 - 4) / (1 + 3) = 1.5; d / d logpi_i = -1 / 4 for each
    nll = chosen_nll(logps, t([1.0, 3.0]))
    close(nll, 1.5)
    nll.backward()
    close(logps.grad, [-0.25, -0.25])
    with pytest.raises(ValueError, match="at least one token"):
        chosen_nll(t([-1.0, -1.0]), t([2.0, 0.0]))
    with pytest.raises(ValueError, match="one shape"):
        chosen_nll(t([-1.0, -1.0]), t([2.0]))


def test_conservative_dpo_by_hand_and_its_optimum():
    pc, pr, rc, rr = dpo_example()
    # pair 0 only, h = 1, eps = 0.1: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1)
    loss, _ = dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta=0.5, label_smoothing=0.1)
    close(loss, 0.9 * softplus(-1.0) + 0.1 * softplus(1.0))
    # d loss / dh = -(1 - eps) sigma(-h) + eps sigma(h) = 0 at h = log((1 - eps)/eps) = log 9
    chosen = t([math.log(9) / 0.5], grad=True)  # beta * (chosen - 0) - 0 = log 9
    loss, _ = dpo_loss(chosen, t([0.0]), t([0.0]), t([0.0]), beta=0.5, label_smoothing=0.1)
    loss.backward()
    close(chosen.grad, [0.0], atol=1e-12, rtol=0)


def test_dpo_reference_gets_no_gradient():
    pc, pr, _, _ = dpo_example(grad=True)
    rc, rr = t([-4.0, -6.0], grad=True), t([-4.0, -3.0], grad=True)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    loss.backward()
    assert rc.grad is None and rr.grad is None
    assert pc.grad is not None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(beta=0.0), "beta"),
        (dict(beta=-0.1), "beta"),
        (dict(beta=NAN), "beta"),
        (dict(beta=0.1, label_smoothing=0.5), "label_smoothing"),
        (dict(beta=0.1, label_smoothing=-0.1), "label_smoothing"),
    ],
)
def test_dpo_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpo_loss(*dpo_example(), **kwargs)


def test_dpo_rejects_bad_shapes():
    pc, pr, rc, rr = dpo_example()
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(pc, pr[:1], rc, rr, beta=0.1)
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(pc[None], pr[None], rc[None], rr[None], beta=0.1)
    with pytest.raises(ValueError, match="empty"):
        dpo_loss(pc[:0], pr[:0], rc[:0], rr[:0], beta=0.1)


# ============================================================================ KTO


def kto_example(grad=False):
    # r = policy - ref = [1.2, -0.4, 0.4]; row 0 desirable, rows 1 and 2 undesirable
    return t([-2.0, -5.0, -3.0], grad), t([-3.2, -4.6, -3.4]), torch.tensor([True, False, False])


def test_kto_loss_by_hand():
    policy, ref, desirable = kto_example(grad=True)
    # beta 0.5, z0 0.4, lambda_D 2, lambda_U 1
    # row 0 (D): 2 * (1 - sigma(0.5 * (1.2 - 0.4))) = 2 * sigma(-0.4)
    # row 1 (U): 1 * (1 - sigma(0.5 * (0.4 + 0.4))) = sigma(-0.4)
    # row 2 (U): 1 * (1 - sigma(0.5 * (0.4 - 0.4))) = 0.5
    loss, stats = kto_loss(policy, ref, desirable, z0=0.4, beta=0.5, lambda_d=2.0, lambda_u=1.0)
    close(loss, (3 * sigmoid(-0.4) + 0.5) / 3)
    close(stats["kl"], 0.4)
    close(stats["rewards/chosen"], 0.6)  # 0.5 * 1.2
    close(stats["rewards/rejected"], 0.0)  # 0.5 * (-0.4 + 0.4) / 2
    close(stats["rewards/margins"], 0.6)
    assert not any(s.requires_grad for s in stats.values())
    # d/dr: D: -lambda_D * beta * sigma(x) sigma(-x) at x = 0.4; U: +lambda_U * beta * sigma(y) sigma(-y)
    # at y = 0.4 and y = 0; each over N = 3
    loss.backward()
    s = sigmoid(0.4) * sigmoid(-0.4)
    close(policy.grad, [-2 * 0.5 * s / 3, 0.5 * s / 3, 0.5 * 0.25 / 3])


def test_kto_z0_is_clamped_at_zero_and_detached():
    policy, ref, desirable = kto_example()
    at_zero, _ = kto_loss(policy, ref, desirable, z0=0.0, beta=0.5)
    below_zero, stats = kto_loss(policy, ref, desirable, z0=torch.tensor(-1.0), beta=0.5)
    close(below_zero, at_zero)
    close(stats["kl"], 0.0)
    z0 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    loss, _ = kto_loss(policy.requires_grad_(), ref.requires_grad_(), desirable, z0=z0, beta=0.5)
    loss.backward()
    assert z0.grad is None and ref.grad is None
    assert policy.grad is not None


def test_kto_stats_when_one_kind_is_missing():
    policy, ref, _ = kto_example()
    _, stats = kto_loss(policy, ref, torch.tensor([True, True, True]), z0=0.0, beta=0.5)
    assert set(stats) == {"kl", "rewards/chosen"}
    close(stats["rewards/chosen"], 0.5 * (1.2 - 0.4 + 0.4) / 3)
    _, stats = kto_loss(policy, ref, [False, False, False], z0=0.0, beta=0.5)
    assert set(stats) == {"kl", "rewards/rejected"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(z0=0.0, beta=0.0), "beta"),
        (dict(z0=0.0, beta=0.1, lambda_d=0.0), "lambda_d"),
        (dict(z0=0.0, beta=0.1, lambda_u=-1.0), "lambda_u"),
        (dict(z0=NAN, beta=0.1), "z0"),
        (dict(z0=torch.tensor([0.1, 0.2]), beta=0.1), "z0"),
    ],
)
def test_kto_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kto_loss(*kto_example(), **kwargs)


def test_kto_rejects_bad_labels_and_shapes():
    policy, ref, desirable = kto_example()
    with pytest.raises(ValueError, match="bool"):
        kto_loss(policy, ref, desirable.double(), z0=0.0, beta=0.1)
    with pytest.raises(ValueError, match="one shape"):
        kto_loss(policy, ref, desirable[:2], z0=0.0, beta=0.1)
    with pytest.raises(ValueError, match="empty"):
        kto_loss(policy[:0], ref[:0], desirable[:0], z0=0.0, beta=0.1)


def test_kto_kl_estimate_by_hand():
    policy = t([-3.0, -2.0], grad=True)
    # mean(-3 + 4, -2 + 2.5) = 0.75
    z0 = kto_kl_estimate(policy, t([-4.0, -2.5]))
    close(z0, 0.75)
    assert z0.shape == () and not z0.requires_grad
    close(kto_kl_estimate(t([-5.0, -2.0]), t([-4.0, -2.5])), 0.0)  # mean -0.25, clamped
    with pytest.raises(ValueError, match="one shape"):
        kto_kl_estimate(t([-1.0]), t([-1.0, -2.0]))


def test_kto_mismatched_by_hand():
    # ordered by prompt a a b c; the largest prompt has 2 rows, so each takes the response 2 places on
    assert kto_mismatched(["a", "a", "b", "c"]) == [2, 3, 0, 1]
    # interleaved x y x y: order 0 2 1 3 -> row 0 takes 1, row 2 takes 3, row 1 takes 0, row 3 takes 2
    assert kto_mismatched(["x", "y", "x", "y"]) == [1, 0, 3, 2]
    assert kto_mismatched(torch.tensor([7, 9])) == [1, 0]
    with pytest.raises(ValueError, match="at most half"):
        kto_mismatched(["a", "a", "a", "b"])
    with pytest.raises(ValueError, match="at most half"):
        kto_mismatched(["a"])
    with pytest.raises(ValueError, match="no rows"):
        kto_mismatched([])


def test_kto_weights_by_hand():
    assert kto_weights(10, 10) == (1.0, 1.0)
    assert kto_weights(12, 10) == (1.0, 1.0)  # ratio 1.2, already in [1, 4/3]
    assert kto_weights(2, 10) == (5.0, 1.0)  # lambda_D = 10/2: ratio 5*2/10 = 1
    assert kto_weights(20, 10) == pytest.approx((1.0, 1.5))  # lambda_U = 3*20/(4*10): ratio 20/15 = 4/3
    assert kto_weights(0, 5) == (1.0, 1.0) and kto_weights(5, 0) == (1.0, 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        kto_weights(-1, 5)


# ============================================================================ RAFT


def test_raft_loss_by_hand():
    logprobs = t([[-1.0, -3.0, NAN], [-2.0, 5.0, math.inf]], grad=True)
    mask = t([[1, 1, 0], [1, 0, 0]])
    # length-normalised: row 0 (-1 - 3)/2 = -2, row 1 -2/1 = -2; loss = -mean = 2
    loss = raft_loss(logprobs, mask)
    close(loss, 2.0)
    # d loss / d logp_it = -1/(N * len_i): row 0 -1/4 per token, row 1 -1/2; padding 0
    loss.backward()
    close(logprobs.grad, [[-0.25, -0.25, 0.0], [-0.5, 0.0, 0.0]])


def test_raft_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        raft_loss(t([[-1.0]]), t([[1.0, 0.0]]))
    with pytest.raises(ValueError, match="at least one response token"):
        raft_loss(t([[-1.0, -1.0]]), t([[0.0, 0.0]]))


# pages p: 5 3 1 | q: 4 4 | r: 2 | s: 7 unrated | t: 2 3 1 3
SCORES = [5.0, 3.0, 1.0, 4.0, 4.0, 2.0, 7.0, NAN, 2.0, 3.0, 1.0, 3.0]
PAGES = ["p", "p", "p", "q", "q", "r", "s", "s", "t", "t", "t", "t"]


def test_above_page_mean_by_hand():
    # p: mean 3 -> only 5 (3 equals the mean); q: equal scores -> none; r: alone -> none;
    # s: one rated candidate -> none; t: mean 9/4 -> both 3s
    keep = above_page_mean(SCORES, PAGES)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [True, False, False, False, False, False, False, False, False, True, False, True]
    # with a floor of 4 only p's 5 remains
    floor = above_page_mean(torch.tensor(SCORES), PAGES, min_score=4.0)
    assert floor.tolist() == [True] + [False] * 11


def test_above_page_mean_equal_scores_are_never_above_their_mean():
    # (0.1 + 0.1 + 0.1)/3 is not exactly 0.1 in floating point; pairwise differences are exactly 0
    assert not above_page_mean([0.1, 0.1, 0.1], [1, 1, 1]).any()
    assert not above_page_mean([0.7] * 5, [0] * 5).any()


@pytest.mark.parametrize("function", [above_page_mean, rloo_advantages, page_pairs])
def test_page_functions_reject_bad_input(function):
    with pytest.raises(ValueError, match="one per candidate"):
        function([1.0, 2.0], ["a"])
    with pytest.raises(ValueError, match="one per candidate"):
        function([[1.0, 2.0]], ["a", "a"])
    with pytest.raises(ValueError, match="no candidates"):
        function([], [])
    with pytest.raises(ValueError, match="finite"):
        function([1.0, math.inf], ["a", "a"])


# ============================================================================ RLOO


def test_rloo_advantages_by_hand():
    # p: 5 - (3+1)/2 = 3, 3 - (5+1)/2 = 0, 1 - (5+3)/2 = -3; q: 0 0; r alone: 0; s: 7 alone rated: 0, unrated: 0
    # t: 2 - 7/3 = -1/3, 3 - 6/3 = 1, 1 - 8/3 = -5/3, 3 - 6/3 = 1
    advantages = rloo_advantages(SCORES, PAGES)
    assert advantages.dtype == torch.float64
    close(advantages, [3.0, 0.0, -3.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1 / 3, 1.0, -5 / 3, 1.0])
    pages_as_numbers = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 4, 4, 4, 4])
    close(rloo_advantages(torch.tensor(SCORES), pages_as_numbers), advantages)


def test_reinforce_loss_by_hand():
    logps = torch.tensor([-2.0, -3.0], requires_grad=True)  # float32, as the policy's
    advantages = t([1.5, -0.5], grad=True)  # float64, as rloo_advantages gives
    # -(1.5 * -2 + -0.5 * -3)/2 = -(-3 + 1.5)/2 = 0.75; gradient -A/N = [-0.75, 0.25]
    loss = reinforce_loss(logps, advantages)
    assert loss.dtype == torch.float32
    close(loss, 0.75)
    loss.backward()
    close(logps.grad, [-0.75, 0.25])
    assert advantages.grad is None
    with pytest.raises(ValueError, match="one shape"):
        reinforce_loss(logps, advantages[:1])
    with pytest.raises(ValueError, match="empty"):
        reinforce_loss(logps[:0], advantages[:0])


# ============================================================================ pairs


def test_page_pairs_from_ratings_by_hand():
    scores = [5.0, 3.0, 3.0, NAN, 2.0, 4.0]
    pages = [0, 0, 0, 0, 1, 1]
    # page 0: 5 over each 3; the two 3s tie; the unrated one makes no pair. page 1: 4 over 2
    assert page_pairs(scores, pages) == [(0, 1), (0, 2), (5, 4)]


def test_page_pairs_with_a_good_chosen_by_hand():
    scores = [5.0, 3.0, 2.0, NAN, 2.0, 4.0]
    pages = [0, 0, 0, 0, 1, 1]
    # only pairs whose higher candidate scores at least 4: 5 over 3 and 2, 4 over 2; 3 over 2 is left out
    assert page_pairs(scores, pages, min_chosen=4.0) == [(0, 1), (0, 2), (5, 4)]
    assert page_pairs(scores, pages, min_chosen=5.0) == [(0, 1), (0, 2)]
    assert page_pairs(scores, pages, picks=[4], min_chosen=9.0) == [(4, 5)]  # a pick needs no minimum


def test_page_pairs_with_picks_by_hand():
    scores = [5.0, 3.0, 3.0, NAN, 2.0, 4.0, 1.0]
    pages = [0, 0, 0, 0, 1, 1, 2]
    # pick 2 on page 0 contradicts 5 > 3: the pick wins, (0, 2) becomes (2, 0); the pick also beats
    # the tie (2, 1) and the unrated (2, 3). A pick on a page of one candidate adds nothing.
    assert page_pairs(scores, pages, picks=[2, 6]) == [(0, 1), (2, 0), (2, 1), (2, 3), (5, 4)]
    # a pick the ratings agree with adds only what they did not say: (0, 3)
    assert page_pairs(scores, pages, picks=[torch.tensor(0)]) == [(0, 1), (0, 2), (0, 3), (5, 4)]


def test_page_pairs_rejects_bad_picks():
    scores, pages = [1.0, 2.0, 3.0], ["a", "a", "b"]
    with pytest.raises(ValueError, match="at most one best"):
        page_pairs(scores, pages, picks=[0, 1])
    with pytest.raises(ValueError, match="not a candidate"):
        page_pairs(scores, pages, picks=[3])
    with pytest.raises(ValueError, match="not a candidate"):
        page_pairs(scores, pages, picks=[-1])
    with pytest.raises(ValueError, match="integer"):
        page_pairs(scores, pages, picks=[1.0])


# ============================================================================ properties

SETTINGS = settings(max_examples=50, deadline=None)
logp = st.floats(-30, 0, allow_nan=False)
ratings = st.integers(1, 5)


@st.composite
def pairs_of_logps(draw):
    n = draw(st.integers(1, 5))
    return [t(draw(st.lists(logp, min_size=n, max_size=n))) for _ in range(4)]


@st.composite
def pages_of_ratings(draw):
    """(scores, page ids): 1..12 candidates on 1..4 pages, scores 1..5 or NaN (unrated)."""
    n = draw(st.integers(1, 12))
    scores = draw(st.lists(ratings.map(float) | st.just(NAN), min_size=n, max_size=n))
    pages = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    return scores, pages


@SETTINGS
@given(pairs_of_logps(), st.floats(0.01, 2), st.sampled_from([0.0, 0.1, 0.3]))
def test_dpo_swapping_chosen_and_rejected_changes_the_loss_by_the_margin(b, beta, eps):
    pc, pr, rc, rr = b
    loss, stats = dpo_loss(pc, pr, rc, rr, beta, eps)
    swapped, _ = dpo_loss(pr, pc, rr, rc, beta, eps)
    # per pair: L(h) - L(-h) = -(1 - 2 eps) h
    close(loss - swapped, -(1 - 2 * eps) * stats["rewards/margins"])


@SETTINGS
@given(pairs_of_logps(), st.floats(0.01, 2), st.floats(-10, 10))
def test_dpo_is_invariant_to_shifts_that_leave_the_implied_rewards_margin(b, beta, c):
    pc, pr, rc, rr = b
    loss, _ = dpo_loss(pc, pr, rc, rr, beta)
    close(dpo_loss(pc + c, pr, rc + c, rr, beta)[0], loss)  # same shift of policy and reference
    close(dpo_loss(pc + c, pr + c, rc, rr, beta)[0], loss)  # same shift of both responses


@SETTINGS
@given(pairs_of_logps(), st.floats(0.01, 2))
def test_dpo_gradient_raises_chosen_and_lowers_rejected(b, beta):
    pc, pr, rc, rr = b
    pc, pr = pc.requires_grad_(), pr.requires_grad_()
    loss, _ = dpo_loss(pc, pr, rc, rr, beta)
    loss.backward()
    assert torch.all(pc.grad <= 0) and torch.all(pr.grad >= 0)
    close(pc.grad, -pr.grad)
    assert loss > 0


@SETTINGS
@given(st.data(), st.integers(1, 6), st.floats(0.01, 2), st.floats(0.0, 3.0),
       st.floats(0.5, 3), st.floats(0.5, 3))
def test_kto_gradient_signs_and_bounds(data, n, beta, z0, lambda_d, lambda_u):
    policy = t(data.draw(st.lists(logp, min_size=n, max_size=n)), grad=True)
    ref = t(data.draw(st.lists(logp, min_size=n, max_size=n)))
    desirable = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    loss, _ = kto_loss(policy, ref, desirable, z0, beta, lambda_d, lambda_u)
    loss.backward()
    assert torch.all(policy.grad[desirable] <= 0) and torch.all(policy.grad[~desirable] >= 0)
    assert 0 <= float(loss.detach()) <= max(lambda_d, lambda_u)


@SETTINGS
@given(st.integers(1, 6), st.floats(0.01, 2), st.floats(0.5, 3), st.floats(0.5, 3))
def test_kto_at_the_reference_point_every_output_loses_half_its_weight(n, beta, lambda_d, lambda_u):
    r, z0 = t([0.7] * n), 0.7  # r = z0 everywhere: lambda_y - lambda_y * sigma(0) = lambda_y / 2
    desirable = torch.arange(n) % 2 == 0
    loss, _ = kto_loss(r, torch.zeros(n, dtype=torch.float64), desirable, z0, beta, lambda_d, lambda_u)
    expected = (lambda_d * int(desirable.sum()) + lambda_u * int((~desirable).sum())) / (2 * n)
    close(loss, expected)


@SETTINGS
@given(st.lists(st.integers(0, 4), min_size=2, max_size=12))
def test_kto_mismatched_is_a_permutation_that_never_meets_its_own_prompt(prompts):
    assume(2 * max(prompts.count(p) for p in prompts) <= len(prompts))
    partner = kto_mismatched(prompts)
    assert sorted(partner) == list(range(len(prompts)))
    assert all(prompts[i] != prompts[j] for i, j in enumerate(partner))


@SETTINGS
@given(st.integers(1, 500), st.integers(1, 500))
def test_kto_weights_land_in_range_and_never_below_one(n_d, n_u):
    lambda_d, lambda_u = kto_weights(n_d, n_u)
    ratio = lambda_d * n_d / (lambda_u * n_u)
    assert 1 - 1e-12 <= ratio <= 4 / 3 + 1e-12
    assert min(lambda_d, lambda_u) == 1.0 and max(lambda_d, lambda_u) >= 1.0


@SETTINGS
@given(pages_of_ratings())
def test_above_page_mean_matches_exact_means(b):
    scores, pages = b
    keep = above_page_mean(scores, pages).tolist()
    for i, (s, p) in enumerate(zip(scores, pages)):
        page = [Fraction(x) for x, q in zip(scores, pages) if q == p and not math.isnan(x)]
        assert keep[i] == (not math.isnan(s) and len(page) >= 2 and Fraction(s) > sum(page) / len(page))


@SETTINGS
@given(pages_of_ratings(), st.floats(-10, 10))
def test_rloo_advantages_sum_to_zero_per_page_and_ignore_shifts(b, c):
    scores, pages = b
    advantages = rloo_advantages(scores, pages)
    for p in set(pages):
        close(advantages[torch.tensor(pages) == p].sum(), 0.0, atol=1e-9, rtol=0)
    close(rloo_advantages([s + c for s in scores], pages), advantages, atol=1e-9, rtol=1e-9)
    for i, (s, p) in enumerate(zip(scores, pages)):  # A_i = k/(k-1) (s_i - mean) where k >= 2
        page = [x for x, q in zip(scores, pages) if q == p and not math.isnan(x)]
        k = len(page)
        expected = 0.0 if math.isnan(s) or k < 2 else k / (k - 1) * (s - sum(page) / k)
        assert float(advantages[i]) == pytest.approx(expected, abs=1e-9)


@SETTINGS
@given(pages_of_ratings(), st.data())
def test_page_pairs_are_within_a_page_ordered_and_never_both_ways(b, data):
    scores, pages = b
    candidates = {p: [i for i, q in enumerate(pages) if q == p] for p in set(pages)}
    picks = [data.draw(st.sampled_from(rows)) for rows in candidates.values() if data.draw(st.booleans())]
    pairs = page_pairs(scores, pages, picks)
    assert pairs == sorted(set(pairs))
    assert not any((j, i) in pairs for i, j in pairs)
    for i, j in pairs:
        assert pages[i] == pages[j] and i != j
        assert i in picks or j not in picks  # a pick is never the rejected one
        assert i in picks or scores[i] > scores[j]
    if not picks:
        ordered = sum(1 for i, j in zip(*torch.triu_indices(len(scores), len(scores), 1).tolist())
                      if pages[i] == pages[j] and (scores[i] > scores[j] or scores[j] > scores[i]))
        assert len(pairs) == ordered


@SETTINGS
@given(st.data(), st.integers(1, 3), st.integers(1, 5))
def test_padding_never_changes_sequence_logprobs(data, B, R):
    lengths = data.draw(st.lists(st.integers(1, R), min_size=B, max_size=B))
    mask = t([[1.0] * n + [0.0] * (R - n) for n in lengths])
    values = t(data.draw(st.lists(logp, min_size=B * R, max_size=B * R))).reshape(B, R)
    garbage = data.draw(st.sampled_from([NAN, math.inf, -math.inf, 1e6]))
    padded = torch.where(mask.bool(), values, garbage)
    for average in (False, True):
        close(sequence_logprobs(padded, mask, average), sequence_logprobs(values, mask, average))
