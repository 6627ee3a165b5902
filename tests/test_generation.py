"""Sampling returns exact behaviour logprobs, honours EOS, seeds, and refuses bad prompts."""
from __future__ import annotations

import copy

import pytest
import torch

from ppo_feedback.config import LoraSettings, ModelConfig
from ppo_feedback.generation import PromptError, first_eos_mask, format_prompt, generate, rollout_of, sample
from ppo_feedback.modeling import add_lora, load_model
from ppo_feedback.policy import PolicyWithValueHead

PROMPTS = ["The weather today is", "I love this pizza", "Once upon a time there was a little robot"]


@pytest.fixture(scope="module")
def policy(tiny_model_dir, tmp_path_factory):
    loaded = load_model(ModelConfig(model=str(tiny_model_dir), device="cpu",
                                    cache_dir=str(tmp_path_factory.mktemp("c"))))
    peft_model = add_lora(loaded.model, LoraSettings(lora_r=4, lora_alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():  # a non-identity adapter, so policy and reference differ
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return PolicyWithValueHead(peft_model, loaded.tokenizer)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_recorded_logprobs_equal_a_fresh_forward(policy, temperature, top_p):
    rollout = sample(policy.peft_model, policy.tokenizer, PROMPTS, max_new_tokens=16,
                     temperature=temperature, top_p=top_p, seed=3, value_head=policy.value_head)
    with torch.no_grad():
        fresh = policy(rollout.query_response, rollout.attention_mask, rollout.context_length, temperature)
    mask = rollout.response_mask
    assert mask.sum() > 0
    assert torch.allclose(fresh.logprobs * mask, rollout.logprobs, atol=1e-4)
    assert torch.allclose(fresh.values * mask, rollout.values, atol=1e-4)
    # and it is the tempered distribution, not the untempered one (temperature != 1 must matter)
    if temperature != 1.0:
        with torch.no_grad():
            untempered = policy(rollout.query_response, rollout.attention_mask, rollout.context_length, 1.0)
        assert not torch.allclose(untempered.logprobs * mask, rollout.logprobs, atol=1e-3)


def test_reference_is_the_adapter_disabled_model(policy):
    rollout = sample(policy.peft_model, policy.tokenizer, PROMPTS, max_new_tokens=8, seed=1)
    ref = policy.reference(rollout.query_response, rollout.attention_mask, rollout.context_length)
    with policy.peft_model.disable_adapter(), torch.no_grad():
        logits = policy.peft_model(input_ids=rollout.query_response, attention_mask=rollout.attention_mask,
                                   position_ids=(rollout.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits
    expected = torch.log_softmax(logits[:, rollout.context_length - 1:-1], -1).gather(
        -1, rollout.responses.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(ref.logprobs, expected, atol=1e-5)
    assert not torch.allclose(ref.logprobs * rollout.response_mask, rollout.logprobs, atol=1e-3)


def test_top_p_restricts_the_tokens_drawn(policy):
    # with a tiny nucleus every drawn token must be the argmax of the tempered distribution
    rollout = sample(policy.peft_model, policy.tokenizer, PROMPTS, max_new_tokens=8, top_p=1e-6, seed=0)
    with torch.no_grad():
        out = policy(rollout.query_response, rollout.attention_mask, rollout.context_length)
        logits = policy.lm_head(out.hidden[:, :-1])  # hidden has one more state, after the last token
    assert torch.equal(logits.argmax(-1), rollout.responses)


def test_same_seed_same_candidates_and_n_rows(policy):
    a = generate(policy.peft_model, policy.tokenizer, "Hello", n=3, max_new_tokens=10, seed=7)
    b = generate(policy.peft_model, policy.tokenizer, "Hello", n=3, max_new_tokens=10, seed=7)
    assert len(a) == 3
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert all(len(c.token_ids) == len(c.logprobs) > 0 for c in a)
    assert all(lp <= 0 for c in a for lp in c.logprobs)


def test_fixed_length_sampling_without_eos_stop(policy):
    rollout = sample(policy.peft_model, policy.tokenizer, PROMPTS, max_new_tokens=12, seed=0, stop_at_eos=False)
    assert rollout.responses.shape == (3, 12)
    assert rollout.response_mask.sum() == 36


def test_first_eos_mask_includes_the_first_eos_only():
    eos = 9
    responses = torch.tensor([[1, 2, 9, 9, 9], [1, 2, 3, 4, 5], [9, 1, 9, 2, 3]])
    assert first_eos_mask(responses, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert first_eos_mask(responses, None).sum() == 15


def test_generation_stops_at_eos_and_masks_after_it(policy):
    # The random tiny model rarely says EOS, so name its most frequent token the EOS of a copy of
    # the tokenizer: then EOS really is sampled and generation must stop and mask after it.
    free = sample(policy.peft_model, policy.tokenizer, PROMPTS, max_new_tokens=20, seed=0, stop_at_eos=False)
    common = int(free.responses.flatten().mode().values)
    tok = copy.deepcopy(policy.tokenizer)
    tok.eos_token = tok.convert_ids_to_tokens(common)
    rollout = sample(policy.peft_model, tok, PROMPTS * 3, max_new_tokens=20, seed=0)
    responses, mask = rollout.responses, rollout.response_mask
    ended = (responses == common).any(1)
    assert ended.any()
    for row in torch.nonzero(ended).flatten().tolist():
        first = int((responses[row] == common).nonzero()[0])
        assert mask[row, :first + 1].all() and not mask[row, first + 1:].any()
        assert (rollout.logprobs[row, first + 1:] == 0).all()
        assert (responses[row, first + 1:] == tok.pad_token_id).all()  # generation stopped there


def test_bad_prompts_are_refused(policy):
    with pytest.raises(PromptError, match="empty"):
        generate(policy.peft_model, policy.tokenizer, "   ", n=1, max_new_tokens=4)
    with pytest.raises(PromptError, match="too long"):
        generate(policy.peft_model, policy.tokenizer, "word " * 400, n=1, max_new_tokens=4)


def test_plain_continuation_without_chat_template(policy):
    assert format_prompt(policy.tokenizer, "Hi there") == "Hi there"


def test_draw_follows_the_probabilities_and_never_picks_a_zero():
    from ppo_feedback.generation import draw

    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 2.0]]).repeat(20000, 1)  # rows unnormalised
    tokens = draw(probs, torch.Generator().manual_seed(0))
    shares = torch.bincount(tokens[0::2], minlength=4).float() / 20000
    assert torch.allclose(shares, torch.tensor([0.1, 0.0, 0.6, 0.3]), atol=0.01), shares
    assert shares[1] == 0 and (tokens[1::2] == 3).all()
    again = draw(probs, torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)  # seeded: the same draw


def test_rollout_of_stored_responses_lays_them_out_as_sampled(policy):
    # A generation stored as token ids and logprobs (what the page records) comes back as the
    # same rollout: prompt left-padded, response right-padded, mask up to the first EOS.
    rollout = sample(policy.peft_model, policy.tokenizer, PROMPTS, max_new_tokens=12, seed=5)
    lengths = rollout.response_mask.sum(1).long().tolist()
    responses = [row[:n] for row, n in zip(rollout.responses.tolist(), lengths)]
    logprobs = [row[:n] for row, n in zip(rollout.logprobs.tolist(), lengths)]
    again = rollout_of(policy.tokenizer, PROMPTS, responses, temperature=1.0, device="cpu", logprobs=logprobs)
    R = max(lengths)
    assert again.context_length == rollout.context_length
    assert torch.equal(again.response_mask, rollout.response_mask[:, :R])
    assert torch.allclose(again.logprobs, rollout.logprobs[:, :R])
    mask = again.response_mask.bool()
    assert torch.equal(again.responses[mask], rollout.responses[:, :R][mask])
    with torch.no_grad():
        fresh = policy(again.query_response, again.attention_mask, again.context_length, 1.0)
    assert torch.allclose(fresh.logprobs * again.response_mask, again.logprobs, atol=1e-4)
    # an empty response has an empty mask; logprobs must match their response
    empty = rollout_of(policy.tokenizer, PROMPTS[:2], [[], responses[1]], temperature=1.0, device="cpu")
    assert empty.response_mask[0].sum() == 0 and empty.response_mask[1].sum() == len(responses[1])
    with pytest.raises(ValueError, match="logprobs"):
        rollout_of(policy.tokenizer, PROMPTS[:1], [responses[0]], temperature=1.0, device="cpu", logprobs=[[0.0]])


def test_decode_yields_each_steps_tokens_and_returns_what_sample_returns(policy):
    from ppo_feedback.generation import decode

    steps = decode(policy.peft_model, policy.tokenizer, PROMPTS, max_new_tokens=10, seed=2, stop_at_eos=False,
                   value_head=policy.value_head)
    yielded = []
    while True:
        try:
            yielded.append(next(steps))
        except StopIteration as stop:
            rollout = stop.value
            break
    assert len(yielded) == 10 and torch.equal(torch.stack(yielded, dim=1), rollout.responses)
    again = sample(policy.peft_model, policy.tokenizer, PROMPTS, max_new_tokens=10, seed=2, stop_at_eos=False,
                   value_head=policy.value_head)
    assert torch.equal(again.query_response, rollout.query_response)
    assert torch.equal(again.logprobs, rollout.logprobs) and torch.equal(again.values, rollout.values)


def test_a_pages_candidates_share_one_prefill_and_stay_exact(policy, monkeypatch):
    """Identical prompts are prefilled once (one row), their cache copied; logprobs still equal a fresh forward's."""
    trunk = policy.trunk
    batch_sizes = []
    forward = trunk.forward

    def counting(*args, **kwargs):
        batch_sizes.append(kwargs["input_ids"].shape)
        return forward(*args, **kwargs)

    monkeypatch.setattr(trunk, "forward", counting)
    prompts = [PROMPTS[2], PROMPTS[0], PROMPTS[2], PROMPTS[2], PROMPTS[0]]
    rollout = sample(policy.peft_model, policy.tokenizer, prompts, max_new_tokens=12, seed=1, stop_at_eos=False,
                     value_head=policy.value_head)
    monkeypatch.undo()
    assert batch_sizes[0] == (2, rollout.context_length)  # the prefill: two distinct prompts
    assert all(shape == (5, 1) for shape in batch_sizes[1:])  # then one token per row a step
    assert torch.equal(rollout.query_response[:, :rollout.context_length],
                       rollout_of(policy.tokenizer, prompts, [[]] * 5, temperature=1.0,
                                  device="cpu").query_response[:, :rollout.context_length])
    assert not torch.equal(rollout.responses[0], rollout.responses[2])  # the copies sample on their own
    with torch.no_grad():
        fresh = policy(rollout.query_response, rollout.attention_mask, rollout.context_length, 1.0)
    assert torch.allclose(fresh.logprobs, rollout.logprobs, atol=1e-4)
    assert torch.allclose(fresh.values, rollout.values, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 40])
def test_skinny_linears_compute_the_same_product_and_put_the_layers_back(rows):
    from transformers.pytorch_utils import Conv1D

    from ppo_feedback.generation import _skinny_candidates, skinny_linears
    from ppo_feedback.modeling import column_major_conv1d

    torch.manual_seed(0)
    conv = Conv1D(80, 64)  # GPT-2's layer: weight (in 64, out 80)
    torch.nn.init.normal_(conv.weight)
    torch.nn.init.normal_(conv.bias)
    layers = [torch.nn.Linear(64, 96), torch.nn.Linear(64, 32, bias=False), conv]
    x = torch.randn(rows, 1, 64)
    with torch.no_grad():
        expected = [layer(x) for layer in layers]
        assert _skinny_candidates(torch.nn.Sequential(*layers)) == layers[:2]  # a row-major Conv1D does not stream
        weight = conv.weight.clone()
        assert column_major_conv1d(torch.nn.Sequential(*layers)) == 1
        assert torch.equal(conv.weight, weight) and conv.weight.t().is_contiguous()  # same values, column-major
        assert _skinny_candidates(torch.nn.Sequential(*layers)) == layers
        with skinny_linears(layers):
            assert all("forward" in vars(layer) for layer in layers)
            got = [layer(x) for layer in layers]
    assert all(g.shape == e.shape and torch.allclose(g, e, atol=1e-5) for g, e in zip(got, expected))
    assert all("forward" not in vars(layer) for layer in layers)
