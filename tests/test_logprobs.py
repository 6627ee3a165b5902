"""Tests for ppo_feedback.logprobs: hand-worked values, the gradient, and chunks that change nothing."""

import math

import pytest
import torch

import ppo_feedback.logprobs as logprobs_module
from ppo_feedback.logprobs import logprobs_and_entropy


def test_logprobs_and_entropy_by_hand():
    # row 0: uniform over 4, so log 1/4 and entropy ln 4; row 1: probs [1/4, 3/4, 0, 0]
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [math.log(1), math.log(3), -1e4, -1e4]]], dtype=torch.float64)
    logprobs, entropy = logprobs_and_entropy(logits, torch.tensor([[2, 1]]))
    h2 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert logprobs.shape == entropy.shape == (1, 2)
    torch.testing.assert_close(logprobs, torch.tensor([[math.log(0.25), math.log(0.75)]], dtype=torch.float64))
    torch.testing.assert_close(entropy, torch.tensor([[math.log(4), h2]], dtype=torch.float64))
    # far-apart logits stay finite: certain of token 0, so entropy 0 and token 1 at -1000
    logprobs, entropy = logprobs_and_entropy(torch.tensor([[1000.0, 0.0], [1000.0, 0.0]]), torch.tensor([0, 1]))
    torch.testing.assert_close(logprobs, torch.tensor([0.0, -1000.0]))
    torch.testing.assert_close(entropy, torch.tensor([0.0, 0.0]), atol=1e-6, rtol=0)


def test_gradient_by_hand_is_onehot_minus_softmax():
    logits = torch.tensor([[0.0, math.log(3)], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    logprobs, entropy = logprobs_and_entropy(logits, torch.tensor([1, 0]))
    assert not entropy.requires_grad  # a statistic: no gradient flows through it
    (2.0 * logprobs[0] + 3.0 * logprobs[1]).backward()
    # row 0: 2 * ([0, 1] - [1/4, 3/4]); row 1: 3 * ([1, 0] - [1/2, 1/2])
    torch.testing.assert_close(logits.grad, torch.tensor([[-0.5, 0.5], [1.5, -1.5]], dtype=torch.float64))


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 11 * 4, 1 << 40])  # one row, three rows (13 is not a multiple), all
def test_matches_log_softmax_gather_and_its_gradient_in_any_chunks(monkeypatch, chunk_bytes):
    monkeypatch.setattr(logprobs_module, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    logits = (torch.randn(13, 11) * 4).requires_grad_()
    tokens = torch.randint(11, (13,))
    weights = torch.randn(13)
    logprobs, entropy = logprobs_and_entropy(logits, tokens)
    (weights * logprobs).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    log_softmax = torch.log_softmax(logits, dim=-1)
    expected = log_softmax.gather(-1, tokens[:, None]).squeeze(-1)
    (weights * expected).sum().backward()
    torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(entropy, -(log_softmax.exp() * log_softmax).sum(-1).detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(ours, logits.grad, rtol=0, atol=1e-6)


def test_a_second_backward_through_the_same_graph_is_refused():
    logits = torch.randn(2, 5, requires_grad=True)
    logprobs, _ = logprobs_and_entropy(logits, torch.tensor([0, 4]))
    logprobs.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError):  # the kept probabilities became the first gradient
        logprobs.sum().backward()


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="do not match"):
        logprobs_and_entropy(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_large_logits_keep_the_entropy_precise_in_float32():
    torch.manual_seed(1)
    logits = torch.randn(6, 50) * 4 + 500  # float32 logits far from zero: no cancellation of large terms
    exact = torch.log_softmax(logits.double(), dim=-1)
    logprobs, entropy = logprobs_and_entropy(logits, torch.arange(6))
    torch.testing.assert_close(entropy.double(), -(exact.exp() * exact).sum(-1), rtol=0, atol=2e-6)
    torch.testing.assert_close(logprobs.double(), exact[torch.arange(6), torch.arange(6)], rtol=0, atol=2e-6)
