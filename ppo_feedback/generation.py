"""Sampling: batched candidates with the KV cache, and their exact behaviour log-probabilities.

Which distribution the recorded log-probabilities belong to: `log softmax(logits / temperature)`,
the whole tempered distribution, at the sampled token. Top-p truncation only narrows which tokens
may be drawn; its renormalised probabilities are not recorded, because PPO's ratio compares the
same quantity recomputed by a forward pass at the same temperature (Huang et al., detail #3; TRL
issue #2358). So a recorded log-probability always equals a fresh forward's, top-p or not.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import DynamicCache

from .policy import position_ids_for, split_causal_lm

class PromptError(ValueError):
    """A prompt that cannot be generated from: empty, or too long for the model."""


@dataclass
class Rollout:
    """A batch of sampled responses, as PPO needs them. Shapes: B rows, P prompt and R response tokens."""

    query_response: torch.Tensor  # (B, P + R) prompt (left-padded) then response token ids
    attention_mask: torch.Tensor  # (B, P + R) 1 on real prompt tokens and on every response slot
    context_length: int  # P
    response_mask: torch.Tensor  # (B, R) 1 on response tokens up to and including the first EOS
    logprobs: torch.Tensor  # (B, R) behaviour log-probs under softmax(logits / temperature); 0 on padding
    values: Optional[torch.Tensor]  # (B, R) value-head outputs at sampling time when a head was given
    temperature: float

    @property
    def responses(self) -> torch.Tensor:
        """Return the response token ids, (B, R)."""
        return self.query_response[:, self.context_length:]


@dataclass
class Candidate:
    """One sampled response: text, token ids and per-token behaviour log-probabilities."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finished: bool  # True when the response ended with EOS rather than the length limit


def format_prompt(tokenizer, prompt: str) -> str:
    """Return the model input for a user prompt: the chat template when the tokenizer has one, else the text."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    return prompt


def max_positions(model) -> int | None:
    """Return how many positions `model` can attend to, when its config says."""
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def encode_prompts(tokenizer, prompts: list[str], max_new_tokens: int, device,
                   positions: int | None = None) -> dict[str, torch.Tensor]:
    """Return left-padded `input_ids` and `attention_mask` for prompts; raise PromptError when one can't fit."""
    texts = []
    for prompt in prompts:
        if not prompt or not prompt.strip():
            raise PromptError("the prompt is empty")
        texts.append(format_prompt(tokenizer, prompt))
    templated = bool(getattr(tokenizer, "chat_template", None))
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not templated)
    limit = min(getattr(tokenizer, "model_max_length", None) or 10**9, positions or 10**9)
    if batch["input_ids"].shape[1] + max_new_tokens > limit:
        raise PromptError(f"the prompt is too long: {batch['input_ids'].shape[1]} tokens plus "
                          f"{max_new_tokens} new ones exceed the model's {limit}")
    return {k: v.to(device) for k, v in batch.items()}


def first_eos_mask(responses: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """Return (B, R) float mask, 1 on tokens up to and including each row's first EOS (all 1 without EOS)."""
    if eos_token_id is None:
        return torch.ones_like(responses, dtype=torch.float32)
    is_eos = (responses == eos_token_id).int()
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos  # EOS tokens strictly before t
    return (eos_before == 0).float()


def rollout_of(tokenizer, prompts: list[str], responses: list[list[int]], *, temperature: float, device,
               positions: int | None = None, logprobs: list[list[float]] | None = None) -> Rollout:
    """Return a Rollout of responses sampled earlier (token id lists), laid out as `sample` lays out its own.

    Prompts are encoded with `encode_prompts` (left-padded), responses right-padded; the response
    mask covers each response up to its first EOS and never its padding (an empty response has an
    empty mask). `logprobs` (one list per response, one value per token) fill the behaviour
    log-probabilities, else they are 0. Values are None.
    """
    if len(prompts) != len(responses) or (logprobs is not None and len(logprobs) != len(responses)):
        raise ValueError("prompts, responses and logprobs must have the same length")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    lengths = torch.tensor([len(r) for r in responses])
    R = max(1, int(lengths.max()) if len(responses) else 1)
    batch = encode_prompts(tokenizer, prompts, R, device, positions)
    ids = torch.full((len(responses), R), pad, dtype=torch.long)
    behaviour = torch.zeros(len(responses), R)
    for row, response in enumerate(responses):
        ids[row, :len(response)] = torch.as_tensor(list(response), dtype=torch.long)
        if logprobs is not None:
            if len(logprobs[row]) != len(response):
                raise ValueError(f"response {row} has {len(response)} tokens but {len(logprobs[row])} logprobs")
            behaviour[row, :len(response)] = torch.as_tensor(list(logprobs[row]), dtype=torch.float32)
    in_length = (torch.arange(R)[None] < lengths[:, None]).float()  # (B, R)
    mask = (first_eos_mask(ids, tokenizer.eos_token_id) * in_length).to(device)
    ids = ids.to(device)
    return Rollout(query_response=torch.cat([batch["input_ids"], ids], dim=1),
                   attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(ids)], dim=1),
                   context_length=batch["input_ids"].shape[1], response_mask=mask,
                   logprobs=behaviour.to(device) * mask, values=None, temperature=temperature)


def _cache_keyword(trunk) -> str:
    """Return the name the trunk's forward uses for the KV cache (`cache` in transformers 5.2x)."""
    params = inspect.signature(trunk.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Return probs (B, V) restricted to each row's smallest set with mass >= top_p (not renormalised)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs  # (B, V) mass of strictly likelier tokens
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return (B,) token ids, one per row drawn from unnormalised probs (B, V), by inverse CDF.

    One uniform number per row; torch.multinomial instead draws an exponential per vocabulary entry,
    which costs more than GPT-2 small's whole decoding step on a CPU.
    """
    cdf = probs.cumsum(-1)  # (B, V)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    # the first index whose cdf exceeds u; zero-probability tokens (top-p) can never be it
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=probs.shape[1] - 1)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True,
           value_head: torch.nn.Module | None = None) -> Rollout:
    """Return a Rollout of one sampled response per prompt, with behaviour logprobs (and values, given a head).

    One batch for all prompts, with the KV cache. Each step runs the trunk once and applies the LM
    head (and the value head) to the newest position only, so no (B, R, V) tensor is ever held.
    With `stop_at_eos=False` every response has exactly `max_new_tokens` tokens; otherwise rows
    that said EOS are fed padding until all have, and their later slots are masked out.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    trunk, lm_head = split_causal_lm(model)
    device = lm_head.weight.device
    batch = encode_prompts(tokenizer, prompts, max_new_tokens, device, max_positions(model))
    eos = tokenizer.eos_token_id if stop_at_eos else None
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = DynamicCache()
    cache_kw = _cache_keyword(trunk)
    attention_mask = batch["attention_mask"]
    position_ids = position_ids_for(attention_mask)
    hidden = trunk(input_ids=batch["input_ids"], attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=True, **{cache_kw: cache}).last_hidden_state[:, -1]  # (B, H)
    next_position = position_ids[:, -1:] + 1  # (B, 1)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    tokens, logprobs, values = [], [], []
    for _ in range(max_new_tokens):
        logits = lm_head(hidden).float()
        logp = torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)  # (B, V)
        probs = logp.exp()
        if top_p < 1.0:
            probs = _nucleus(probs, top_p)
        token = draw(probs, generator)  # (B,)
        token = token.masked_fill(done, tokenizer.pad_token_id)
        tokens.append(token)
        logprobs.append(logp.gather(1, token[:, None]).squeeze(1))
        if value_head is not None:
            values.append(value_head(hidden.to(value_head.weight.dtype)).squeeze(-1))
        if eos is not None:
            done |= token == eos
            if done.all():
                break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        hidden = trunk(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position,
                       use_cache=True, **{cache_kw: cache}).last_hidden_state[:, -1]
        next_position = next_position + 1
    responses = torch.stack(tokens, dim=1)  # (B, R)
    response_mask = first_eos_mask(responses, eos)
    query_response = torch.cat([batch["input_ids"], responses], dim=1)
    full_mask = torch.cat([batch["attention_mask"], torch.ones_like(responses)], dim=1)
    return Rollout(query_response=query_response, attention_mask=full_mask,
                   context_length=batch["input_ids"].shape[1], response_mask=response_mask,
                   logprobs=torch.stack(logprobs, dim=1) * response_mask,
                   values=torch.stack(values, dim=1) * response_mask if values else None, temperature=temperature)


def generate(model, tokenizer, prompt: str, n: int, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, seed: int | None = None) -> list[Candidate]:
    """Return n sampled candidates for one prompt, each with text, token ids and behaviour logprobs."""
    if n < 1:
        raise ValueError("n must be >= 1")
    rollout = sample(model, tokenizer, [prompt] * n, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_p=top_p, seed=seed)
    candidates = []
    for row in range(n):
        length = int(rollout.response_mask[row].sum())
        ids = rollout.responses[row, :length].tolist()
        finished = length > 0 and ids[-1] == tokenizer.eos_token_id
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        candidates.append(Candidate(text=text, token_ids=ids, logprobs=rollout.logprobs[row, :length].tolist(),
                                    finished=finished))
    return candidates
