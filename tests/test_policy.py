"""Rows that share a prompt have it computed once, with the same outputs and gradients as one full forward."""
from __future__ import annotations

import functools

import pytest
import torch

from ppo_feedback.config import LoraSettings, ModelConfig
from ppo_feedback.modeling import add_lora, load_model
from ppo_feedback.policy import PolicyWithValueHead, distinct_prompts

PROMPT_LENGTHS = [5, 9, 3]  # distinct prompts, each left-padded differently
SHARED_ROWS = [0, 1, 0, 2, 1, 0]  # the prompt of each row: 6 rows, 3 distinct prompts
RESPONSE_LENGTH = 7


def _perturbed(peft_model, tokenizer=None) -> PolicyWithValueHead:
    """Return a policy whose adapter and value head are not the identity and zero (so both show in outputs)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    policy = PolicyWithValueHead(peft_model, tokenizer)
    with torch.no_grad():
        policy.value_head.weight.normal_(0, 0.3)
    return policy


def _tiny_llama():
    """Return a tiny randomly initialised Llama (rotary positions, q_proj/v_proj LoRA targets)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def policy(request, tiny_model_dir, tmp_path_factory):
    if request.param == "gpt2":
        loaded = load_model(ModelConfig(model=str(tiny_model_dir), device="cpu",
                                        cache_dir=str(tmp_path_factory.mktemp("c"))))
        return _perturbed(add_lora(loaded.model, LoraSettings(lora_r=4, lora_alpha=8)), loaded.tokenizer)
    return _perturbed(add_lora(_tiny_llama(), LoraSettings(lora_r=4, lora_alpha=8)))


def batch(rows: list[int], vocab: int = 200, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Return (query_response, attention_mask, P): left-padded prompts `PROMPT_LENGTHS[row]` long, then
    right-padded responses of different lengths, laid out as `rollout_of` lays them out."""
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (n,), generator=generator) for n in PROMPT_LENGTHS]
    P, R = max(PROMPT_LENGTHS), RESPONSE_LENGTH
    ids = torch.full((len(rows), P + R), pad)
    mask = torch.zeros(len(rows), P + R, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(prompts[row])
        ids[i, P - n:P], mask[i, P - n:] = prompts[row], 1
        length = R - i % 3  # response padding too: every response slot is attended, as a rollout's
        ids[i, P:P + length] = torch.randint(3, vocab, (length,), generator=generator)
    return ids, mask, P


def full(policy: PolicyWithValueHead, monkeypatch) -> None:
    """Make `policy` run every forward as one full forward over the batch, as before prompt sharing."""
    monkeypatch.setattr(policy, "_hidden", policy._hidden_full)


def trunk_calls(policy: PolicyWithValueHead, monkeypatch) -> list[tuple[int, ...]]:
    """Return a list that receives the input_ids shape of every trunk forward from now on."""
    shapes = []
    forward = policy.trunk.forward

    @functools.wraps(forward)  # the same signature: the cache keyword is looked up on it
    def counting(*args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(policy.trunk, "forward", counting)
    return shapes


def test_distinct_prompts_index_each_rows_prompt():
    ids, mask, P = batch(SHARED_ROWS)
    prompt_ids, prompt_mask, rows = distinct_prompts(ids, mask, P)
    assert prompt_ids.shape == prompt_mask.shape == (3, P)
    assert torch.equal(prompt_ids[rows], ids[:, :P]) and torch.equal(prompt_mask[rows], mask[:, :P])
    assert prompt_mask.dtype == mask.dtype


def test_shared_prompts_are_computed_once(policy, monkeypatch):
    ids, mask, P = batch(SHARED_ROWS)
    shapes = trunk_calls(policy, monkeypatch)
    with torch.no_grad():
        policy(ids, mask, P)
    policy.reference(ids, mask, P)
    assert shapes == [(3, P), (6, RESPONSE_LENGTH)] * 2


def test_distinct_prompts_take_one_full_forward(policy, monkeypatch):
    ids, mask, P = batch([0, 1, 2])
    shapes = trunk_calls(policy, monkeypatch)
    with torch.no_grad():
        policy(ids, mask, P)
    policy.reference(ids, mask, P)
    assert shapes == [(3, P + RESPONSE_LENGTH)] * 2


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_forward_equals_the_full_forward(policy, monkeypatch, temperature):
    ids, mask, P = batch(SHARED_ROWS)
    with torch.no_grad():
        shared, shared_ref = policy(ids, mask, P, temperature), policy.reference(ids, mask, P, temperature)
        shared_hidden = policy.reference_hidden(ids, mask, P)
        full(policy, monkeypatch)
        plain, plain_ref = policy(ids, mask, P, temperature), policy.reference(ids, mask, P, temperature)
        plain_hidden = policy.reference_hidden(ids, mask, P)
    assert shared.hidden.shape == (6, RESPONSE_LENGTH + 1, plain.hidden.shape[-1])
    for a, b in [(shared.hidden, plain.hidden), (shared.logprobs, plain.logprobs), (shared.values, plain.values),
                 (shared.entropy, plain.entropy), (shared_ref.hidden, plain_ref.hidden),
                 (shared_ref.logprobs, plain_ref.logprobs), (shared_hidden, plain_hidden)]:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(shared.logprobs, shared_ref.logprobs, atol=1e-3)  # the adapter matters


def test_shared_forward_has_the_full_forwards_gradients(policy, monkeypatch):
    """Every row's response sends its gradient into its shared prompt's LoRA keys and values."""
    ids, mask, P = batch(SHARED_ROWS)
    weights = torch.randn(len(SHARED_ROWS), RESPONSE_LENGTH, generator=torch.Generator().manual_seed(2))

    def gradients() -> list[torch.Tensor]:
        policy.zero_grad(set_to_none=True)
        out = policy(ids, mask, P)
        ((out.logprobs * weights).sum() + (out.values * weights).pow(2).sum()).backward()
        return [p.grad.clone() for p in policy.trainable_parameters()]

    shared = gradients()
    full(policy, monkeypatch)
    plain = gradients()
    policy.zero_grad(set_to_none=True)
    assert len(shared) == len(plain) > 2 and all(g.abs().sum() > 0 for g in plain)
    for a, b in zip(shared, plain):
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=0)  # float32 rounding of sums


def test_bfloat16_shared_forward_is_close_to_the_full_forward(tiny_model_dir, tmp_path, monkeypatch):
    loaded = load_model(ModelConfig(model=str(tiny_model_dir), device="cpu", cache_dir=str(tmp_path),
                                    dtype="bfloat16"))
    policy = _perturbed(add_lora(loaded.model, LoraSettings(lora_r=4, lora_alpha=8)), loaded.tokenizer)
    ids, mask, P = batch(SHARED_ROWS)
    shared = policy(ids, mask, P)
    shared.logprobs.sum().backward()
    full(policy, monkeypatch)
    with torch.no_grad():
        plain = policy(ids, mask, P)
    assert shared.logprobs.dtype == torch.float32 and shared.hidden.dtype == torch.bfloat16
    torch.testing.assert_close(shared.logprobs, plain.logprobs, atol=0.1, rtol=0.05)
    lora = [p for p in policy.peft_model.parameters() if p.requires_grad]
    assert lora and all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in lora)
